"""The one settings object of the server: every ``serve`` flag, each with its ``GLM4V_<FLAG>`` environment variable.

``add_arguments`` builds the flags (through :func:`glm4v_edge.options.add`, so flag > env > default everywhere) and
:meth:`ServerSettings.from_args` turns the parsed namespace into a :class:`ServerSettings`. Tests and embedding code
build a ``ServerSettings`` directly. Nothing here imports torch or FastAPI, so ``glm4v-edge serve --help`` is fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from glm4v_edge.options import add, add_model_arguments

MIB = 1 << 20
MULTI_IMAGE_POLICIES = ("reject", "first")
COMPILE_CHOICES = ("off", "reduce-overhead", "cudagraphs", "default")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerSettings:
    # --- the model (shared with `chat`: --model --precision --vision-precision ... --device) ---
    model: str | None = None  # None = the built-in tiny demo checkpoint (random answers)
    synthetic: str | None = None  # "full" | "mid" | "tiny" | config.json: random weights built on the device
    precision: str = "auto"
    vision_precision: str | None = None
    compute_dtype: str | None = None
    double_quant: bool = True
    vision_size: int | None = None
    device: str | None = None
    # --- network ---
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str = "glm-4v-9b"  # comma-separated aliases; the first is the primary id
    cors_origins: str = ""  # comma-separated; "" = no CORS headers, "*" = any origin
    allowed_hosts: str = ""  # comma-separated Host names; "" = loopback names only when key-less on loopback
    max_connections: int = 128  # open HTTP connections; more are answered 503 and closed
    header_timeout: float = 10.0  # seconds to send a request's headers (slowloris)
    body_timeout: float = 60.0  # seconds to send a request's body once its headers arrived
    # --- the engine ---
    max_batch_size: int = 8
    max_model_len: int | None = None  # None = the checkpoint's seq_length
    max_queue: int = 64
    prefill_chunk: int = 512
    vision_layers_per_step: int = 8
    compile: str = "off"  # a COMPILE_CHOICES entry; GPU only
    # --- requests ---
    default_max_tokens: int = 1024
    request_timeout: float = 600.0  # seconds from arrival to the last token (upload included); 0 = no limit
    shutdown_timeout: float = 30.0
    max_request_bytes: int = 24 * MIB  # one --max-image-bytes image in base64 (21.3 MiB) and text to spare
    max_preparing: int = 8  # requests read, parsed and preprocessed at once; the rest wait (or 429)
    # --- images ---
    low_detail_size: int = 448
    multi_image: str = "reject"
    max_image_bytes: int = 16 * MIB
    max_image_pixels: int = 4096 * 4096  # 16.8 MP: a 12 MP photo passes; the model sees 1120² anyway
    image_fetch_timeout: float = 10.0
    image_max_redirects: int = 3
    allow_private_urls: bool = False
    allowed_local_media_path: str | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None:
            if not self.api_key.strip():
                raise ValueError("the API key (--api-key / GLM4V_API_KEY) is set but empty: set a real key, or "
                                 "unset the variable to serve without authentication")
            self.api_key = self.api_key.strip()  # clients' tokens are compared stripped
        if self.multi_image not in MULTI_IMAGE_POLICIES:
            raise ValueError(f"multi_image must be one of {MULTI_IMAGE_POLICIES}, not {self.multi_image!r}")
        for name in ("max_batch_size", "max_queue", "prefill_chunk", "vision_layers_per_step", "default_max_tokens",
                     "max_request_bytes", "max_image_bytes", "max_image_pixels", "max_connections",
                     "max_preparing"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}, not {self.compile!r}")
        if not self.model_names:
            raise ValueError("served_model_name must name at least one model")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")

    def engine_config(self):
        from engine import EngineConfig

        return EngineConfig(max_batch_size=self.max_batch_size, max_model_len=self.max_model_len,
                            max_queue=self.max_queue, prefill_chunk=self.prefill_chunk,
                            vision_layers_per_step=self.vision_layers_per_step, compile=self.compile)

    @property
    def model_names(self) -> list[str]:
        return [n.strip() for n in self.served_model_name.split(",") if n.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def allowed_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    @property
    def checks_host(self) -> bool:
        """Whether the Host header is checked: always with --allowed-hosts (unless '*'), and by default on a
        key-less loopback server, which any web page could otherwise reach through DNS rebinding."""
        hosts = self.allowed_host_list
        if hosts:
            return "*" not in hosts
        return not self.api_key and self.is_loopback

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["double_quant"] = not args.no_double_quant
        return cls(**values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags. Defaults come from :class:`ServerSettings`, so the two cannot drift apart."""
    d = ServerSettings()
    add_model_arguments(p, env=True, precision_default=d.precision)
    add(p, "--synthetic", help="serve random weights of this architecture instead of a checkpoint: full (the real "
        "13.9B GLM-4V-9B, built straight on the GPU), mid, tiny or a config.json — for memory and speed tests")
    add(p, "--host", default=d.host, help="address to bind; a non-loopback address without --api-key logs a warning")
    add(p, "--port", default=d.port, type=int, help="TCP port")
    add(p, "--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route (prefer the env variable: "
        "flags show up in `ps`)")
    add(p, "--served-model-name", default=d.served_model_name,
        help="model id clients send and /v1/models lists; comma-separated aliases are all accepted")
    add(p, "--cors-origins", default=d.cors_origins,
        help="comma-separated origins allowed by CORS, '*' for any; empty = no CORS headers")
    add(p, "--allowed-hosts", default=d.allowed_hosts,
        help="comma-separated Host names this server answers besides loopback ones ('*' = any); without it a "
        "key-less server on a loopback address answers only localhost/127.0.0.1/[::1] (DNS-rebinding defence)")
    add(p, "--max-connections", default=d.max_connections, type=int,
        help="open HTTP connections at once; more are answered 503 and closed (kept below the open-file limit)")
    add(p, "--header-timeout", default=d.header_timeout, type=float,
        help="seconds a client has to send a request's headers; slower connections are closed")
    add(p, "--body-timeout", default=d.body_timeout, type=float,
        help="seconds a client has to send a request's body once its headers arrived; slower gets 408")
    add(p, "--max-batch-size", default=d.max_batch_size, type=int, help="sequences decoded together")
    add(p, "--max-model-len", type=int, help="context length: prompt (image embeddings included) + completion "
        "(default: the checkpoint's seq_length; on a GPU capped to what the memory left after loading holds for "
        "--max-batch-size sequences)")
    add(p, "--max-queue", default=d.max_queue, type=int,
        help="requests allowed to wait for a batch slot; more answer 429 with Retry-After")
    add(p, "--prefill-chunk", default=d.prefill_chunk, type=int,
        help="prompt tokens prefilled per engine step (bounds how long one prompt stalls other streams)")
    add(p, "--vision-layers-per-step", default=d.vision_layers_per_step, type=int,
        help="ViT layers of a new image encoded per engine step, between decode steps of the running streams")
    add(p, "--compile", default=d.compile, nargs="?", const="reduce-overhead", choices=COMPILE_CHOICES,
        help="GPU: compile the decode step per batch size before serving — 'reduce-overhead' (the flag alone: "
        "inductor kernels replayed as CUDA graphs), 'cudagraphs' (CUDA graphs without code generation) or "
        "'default' (inductor only); takes minutes at startup; ignored on CPU, where it is slower")
    add(p, "--default-max-tokens", default=d.default_max_tokens, type=int,
        help="completion limit when a request sends neither max_tokens nor max_completion_tokens "
        "(never more than what fits the context)")
    add(p, "--request-timeout", default=d.request_timeout, type=float,
        help="seconds a request may take from arrival to its last token, upload and preparation included; "
        "0 = no limit")
    add(p, "--shutdown-timeout", default=d.shutdown_timeout, type=float,
        help="on SIGINT/SIGTERM, seconds running requests may take to finish before they are cut")
    add(p, "--max-request-bytes", default=d.max_request_bytes, type=int,
        help="largest request body accepted (base64 images included); larger answers 413")
    add(p, "--max-preparing", default=d.max_preparing, type=int,
        help="requests whose body is read, parsed and preprocessed at once (bounds their memory); others wait, "
        "and past --max-queue waiting answer 429")
    add(p, "--low-detail-size", default=d.low_detail_size, type=int,
        help="vision resolution for image_url.detail='low' (a multiple of 28, clamped to what the checkpoint "
        "allows and to the server's vision size)")
    add(p, "--multi-image", default=d.multi_image, choices=MULTI_IMAGE_POLICIES,
        help="GLM-4V-9B sees one image per conversation: 'reject' answers 400 to more, 'first' keeps the first")
    add(p, "--max-image-bytes", default=d.max_image_bytes, type=int, help="largest encoded image (any source)")
    add(p, "--max-image-pixels", default=d.max_image_pixels, type=int,
        help="largest image in width×height pixels, checked before decoding (decompression bombs)")
    add(p, "--image-fetch-timeout", default=d.image_fetch_timeout, type=float,
        help="seconds to fetch one http(s) image, redirects included")
    add(p, "--image-max-redirects", default=d.image_max_redirects, type=int, help="redirects followed per image")
    add(p, "--allow-private-urls", action="store_true", default=False,
        help="allow image URLs that resolve to private, loopback, link-local or reserved addresses")
    add(p, "--allowed-local-media-path",
        help="folder from which file:// image URLs may be read (default: file:// is refused)")
