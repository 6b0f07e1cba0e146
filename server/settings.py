"""The one settings object of the server: one field per ``serve`` flag (each also read from ``GLM4V_<FLAG>``).

The flags themselves are defined by the CLI (:mod:`glm4v_edge.serve`, flag > env > default, defaults taken from
this class); :meth:`ServerSettings.from_args` turns the parsed namespace into a :class:`ServerSettings`. Tests and
embedding code build one directly. Nothing here imports torch or FastAPI, so ``glm4v-edge serve --help`` is fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

MIB = 1 << 20
MULTI_IMAGE_POLICIES = ("newest", "first", "reject")
MAX_TOKENS_POLICIES = ("clamp", "reject")
COMPILE_CHOICES = ("off", "reduce-overhead", "cudagraphs", "default")
OFFLOAD_CHOICES = ("vision", "embeddings", "none")  # quant.offload.OFFLOAD_PARTS + none (no torch import here)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerSettings:
    # --- the model (shared with `chat`: --model --precision --vision-precision ... --device) ---
    model: str | None = None  # None = the shipped demo model (docs/DEMO.md)
    synthetic: str | None = None  # "full" | "mid" | "tiny" | config.json: random weights built on the device
    precision: str = "auto"
    vision_precision: str | None = None
    compute_dtype: str | None = None
    double_quant: bool = True
    vision_size: int | None = None
    device: str | None = None
    offload: str | None = None  # "vision", "embeddings", both comma-separated, "none"; None = not given (auto may)
    lm_head_precision: str | None = None
    # --- network ---
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # comma-separated aliases, the first the primary id; None = the defaults
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
    prefix_cache: str = "on"  # on | off: keep finished rows and reuse the longest matching prefix
    image_cache_mb: float = 256.0  # image-feature cache in host memory (MiB); 0 = off
    # --- requests ---
    default_max_tokens: int | None = None  # None = the rest of the context
    max_tokens_policy: str = "clamp"  # clamp | reject: a max_tokens larger than the room left
    request_timeout: float = 600.0  # seconds from arrival to the last token (upload included); 0 = no limit
    shutdown_timeout: float = 30.0
    max_request_bytes: int = 24 * MIB  # one --max-image-bytes image in base64 (21.3 MiB) and text to spare
    max_preparing: int = 8  # requests read, parsed and preprocessed at once; the rest wait (or 429)
    # --- images ---
    low_detail_size: int = 448
    multi_image: str = "newest"
    max_image_bytes: int = 16 * MIB
    max_image_pixels: int = 4096 * 4096  # 16.8 MP: a 12 MP photo passes; the model sees 1120² anyway
    image_fetch_timeout: float = 10.0
    image_max_redirects: int = 3
    allow_private_urls: bool = False
    allowed_local_media_path: str | None = None

    def __post_init__(self) -> None:
        bad = [p for p in (self.offload or "").replace(" ", "").split(",") if p and p not in OFFLOAD_CHOICES]
        if bad:
            raise ValueError(f"--offload takes vision, embeddings (comma-separated) or none, not {bad[0]!r}")
        if self.api_key is not None:
            if not self.api_key.strip():
                raise ValueError(
                    "the API key (--api-key / GLM4V_API_KEY) is set but empty: set a real key, or "
                    "unset the variable to serve without authentication"
                )
            self.api_key = self.api_key.strip()  # clients' tokens are compared stripped
        if self.multi_image not in MULTI_IMAGE_POLICIES:
            raise ValueError(f"multi_image must be one of {MULTI_IMAGE_POLICIES}, not {self.multi_image!r}")
        for name in (
            "max_batch_size",
            "max_queue",
            "prefill_chunk",
            "vision_layers_per_step",
            "max_request_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_connections",
            "max_preparing",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.prefix_cache not in ("on", "off"):
            raise ValueError(f"prefix_cache must be 'on' or 'off', not {self.prefix_cache!r}")
        if not self.image_cache_mb >= 0:
            raise ValueError("image_cache_mb must be >= 0 (0 turns the image-feature cache off)")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}, not {self.compile!r}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if self.served_model_name is not None and not self.model_names:
            raise ValueError("served_model_name must name at least one model")
        if self.max_tokens_policy not in MAX_TOKENS_POLICIES:
            raise ValueError(f"max_tokens_policy must be one of {MAX_TOKENS_POLICIES}, not {self.max_tokens_policy!r}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")

    def load_request(self):
        """What to load: the model flags, with the context and batch ``--precision auto`` must leave room for
        (without --max-model-len the context is sized to the memory left after loading, so auto decides for a
        modest 2048 tokens per sequence)."""
        from quant.offload import parse_offload
        from quant.request import LoadRequest

        return LoadRequest(
            model=self.model,
            synthetic=self.synthetic,
            precision=self.precision,
            vision_precision=self.vision_precision,
            compute_dtype=self.compute_dtype,
            double_quant=self.double_quant,
            vision_size=self.vision_size,
            device=self.device,
            context=self.max_model_len,
            batch=self.max_batch_size,
            lm_head_precision=self.lm_head_precision,
            offload=None if self.offload is None else parse_offload(self.offload),
        )

    def engine_config(self):
        from engine import EngineConfig

        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_model_len=self.max_model_len,
            max_queue=self.max_queue,
            prefill_chunk=self.prefill_chunk,
            vision_layers_per_step=self.vision_layers_per_step,
            compile=self.compile,
            prefix_cache=self.prefix_cache == "on",
            image_cache_mb=self.image_cache_mb,
        )

    @property
    def model_names(self) -> list[str]:
        """The names given with --served-model-name ([] = the defaults, decided once the model is loaded)."""
        return [n.strip() for n in (self.served_model_name or "").split(",") if n.strip()]

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
