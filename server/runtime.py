"""What one app serves: the loaded model, its engine, and the facts /v1/models reports — loaded off the event loop.

The model loads in a background thread at startup, so the port answers at once: ``/health`` says 503 while loading
(llama.cpp's pattern) and 200 when ready. A load that fails leaves the runtime ``failed`` and calls ``on_failure``
(the CLI uses it to stop the server with a non-zero exit).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from engine import Engine
from quant import LoadedModel
from quant.loader import check_vision_size

from .errors import ServiceUnavailable
from .images import ImageLoader
from .metrics import Metrics, vram_snapshot
from .protocol import ModelCard
from .settings import ServerSettings
from .version import __version__

log = logging.getLogger(__name__)

Loader = Callable[[], LoadedModel]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def low_detail_size(requested: int, served: int, trained: int) -> int:
    """``--low-detail-size`` made valid for this checkpoint: a multiple of 28, no larger than the served size."""
    low_bound = min(224, trained // 2)
    size = max(low_bound, min(served, requested // 28 * 28))
    size = -(-size // 28) * 28  # low_bound itself may not be a multiple of 28
    check_vision_size(size, trained)
    return size


DEFAULT_NAMES = ("glm-4v-9b", "glm-4v")  # what the seed article, THUDM's example client and Dify send


def default_model_names(model_dir, asked: str | None = None) -> list[str]:
    """The model ids served without --served-model-name: glm-4v-9b, glm-4v, the hub id ``--model`` named, the
    checkpoint's ``_name_or_path`` (THUDM/glm-4v-9b in the official config.json) and the folder's name — clients send
    any of them."""
    import json

    from quant.hub import describe_source

    names = list(DEFAULT_NAMES)
    if asked and describe_source(asked) != "folder":
        names.append(asked.removeprefix("modelscope://").split("@")[0])
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        if isinstance(raw.get("_name_or_path"), str):
            names.append(raw["_name_or_path"])
    except (OSError, ValueError):
        pass  # a synthetic model has no folder
    if (Path(model_dir) / "config.json").is_file():
        names.append(Path(model_dir).name)
    return list(dict.fromkeys(n for n in names if n.strip()))


def sampling_defaults(model_dir) -> dict:
    """``temperature`` / ``top_p`` of the checkpoint's generation_config.json (used when a request omits them)."""
    import json

    try:
        raw = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(raw[k]) for k in ("temperature", "top_p") if isinstance(raw.get(k), (int, float))}


class Runtime:
    def __init__(
        self, settings: ServerSettings, metrics: Metrics, loaded: LoadedModel | Loader | None = None, hooks=None
    ):
        self.settings = settings
        self.metrics = metrics
        self.hooks = hooks
        self._loader = loaded if callable(loaded) else None
        self.loaded: LoadedModel | None = loaded if isinstance(loaded, LoadedModel) else None
        self.engine: Engine | None = None
        self.demo = False
        self.state = "loading"  # loading → ready | failed; ready → stopping
        self.error: str | None = None
        self.created = int(time.time())
        self.low_detail_size = 0
        self.description: dict = {}
        self.on_failure: Callable[[], None] | None = None
        self.served_names: list[str] = settings.model_names or list(DEFAULT_NAMES)
        self.sampling_defaults: dict = {}
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="glm4v-preprocess")
        self.images = ImageLoader(settings, self.pool)
        self._thread: threading.Thread | None = None
        # serve-cluster (server.cluster): which replica this is and how many serve, for /v1/models
        self.cluster_info: Callable[[], dict] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Ready at once around an already loaded model; otherwise load in the background."""
        if self.loaded is not None:
            self._load()
            return
        self._thread = threading.Thread(target=self._load, name="glm4v-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            if self.loaded is None:
                self.loaded = self._loader() if self._loader is not None else self._load_from_settings()
            lm, s = self.loaded, self.settings
            self.demo = lm.demo
            self.served_names = s.model_names or default_model_names(lm.model_dir, s.model)
            self.sampling_defaults = sampling_defaults(lm.model_dir)
            self.low_detail_size = low_detail_size(s.low_detail_size, lm.vision_size, lm.config.vision.image_size)
            if self.low_detail_size != s.low_detail_size:
                log.info(
                    "--low-detail-size %d → %d (what this checkpoint allows)", s.low_detail_size, self.low_detail_size
                )
            self.engine = Engine.for_model(lm, s.engine_config(), hooks=self.hooks).start()
            self.metrics.set_model(
                lm.spec.label(),
                lm.spec.vision_precision,
                device_name(lm.device),
                lm.vision_size,
                self.demo,
                lm.weight_bytes.get("total", 0),
            )
            self.description = lm.describe()  # walks every module: once, not per /v1/models call
            self.created = int(time.time())
            self.state = "ready"
            log.log(
                logging.WARNING if self.demo else logging.INFO,
                "ready: %s at %s on %s, max_model_len %d%s",
                ", ".join(self.served_names),
                lm.spec.label(),
                device_name(lm.device),
                self.engine.max_model_len,
                " — the DEMO model, not GLM-4V-9B (pass --model)" if self.demo else "",
            )
        except Exception as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.exception("loading the model failed")
            if self.on_failure is not None:
                self.on_failure()

    def _load_from_settings(self) -> LoadedModel:
        from quant.request import open_model

        return open_model(self.settings.load_request())

    def drain(self, timeout: float) -> None:
        """Stop taking requests and let running ones finish for up to ``timeout`` s (then they are cut)."""
        if self.engine is not None:
            if self.state == "ready":
                self.state = "stopping"
            self.engine.shutdown(timeout)

    def close(self) -> None:
        self.drain(self.settings.shutdown_timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- queries --------------------------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "loading":
            raise ServiceUnavailable(
                "the model is still loading; retry shortly", code="model_loading", headers={"Retry-After": "5"}
            )
        if self.state == "stopping":
            raise ServiceUnavailable("the server is shutting down", code="shutting_down")
        raise ServiceUnavailable("the model failed to load; see the server log", code="model_load_failed")

    def _compile_ignored(self) -> dict | None:
        if self.settings.compile == "off":
            return None
        return {
            "mode": self.settings.compile,
            "active": False,
            "batch_buckets": [],
            "warmup_s": None,
            "error": f"ignored on {self.loaded.device.type}: the compiled decode step is slower there",
        }

    @property
    def max_prompt_chars(self) -> int:
        """Characters of message text that could still fit the context: a token covers at most
        ``max_token_bytes`` bytes (so characters), so more text than this cannot fit — refused before tokenizing."""
        return self.engine.max_model_len * self.loaded.tokenizer.max_token_bytes

    @property
    def system_fingerprint(self) -> str:
        label = self.loaded.spec.label() if self.loaded else self.settings.precision
        return f"glm4v-edge-{__version__}-{label}"

    def _caches(self) -> dict:
        """The multi-turn caches' settings and use (engine.prefix_cache), for /v1/models."""
        st = self.engine.stats()
        return {
            "prefix_cache": {
                "enabled": self.engine.prefix.enabled,
                "kept_rows": st.prefix_kept_rows,
                "hits": st.prefix_hits,
                "reused_tokens": st.prefix_reused_tokens,
            },
            "image_cache": {
                "max_bytes": self.engine.image_cache.max_bytes,
                "bytes": st.image_cache_bytes,
                "entries": st.image_cache_entries,
                "hits": st.image_cache_hits,
                "where": "host",
            },
        }

    def model_cards(self) -> list[ModelCard]:
        """/v1/models entries, one per served name: the OpenAI fields plus what an operator needs to trust the
        setup."""
        lm, eng, d = self.loaded, self.engine, self.description
        facts = dict(
            root=Path(lm.model_dir).name,
            max_model_len=eng.max_model_len,
            precision=d["precision"],
            vision_precision=d["vision_precision"],
            dtype=d["dtype"],
            quantization=d["quantization"],
            layers=d["layers"],
            vision_size=d["vision_size"],
            image_tokens=d["image_tokens"],
            low_detail_vision_size=self.low_detail_size,
            low_detail_image_tokens=lm.image_tokens(self.low_detail_size),
            device=device_name(lm.device),
            weight_bytes=d["weight_bytes"],
            num_parameters=d["num_parameters"],
            kv_cache_bytes=eng.stats().kv_cache_bytes,
            vram=vram_snapshot(lm.device),
            max_batch_size=eng.max_batch_size,
            max_queue=eng.max_queue,
            compile=eng.compile_status() or self._compile_ignored(),
            offload=d["offload"],
            multi_image=self.settings.multi_image,
            caches=self._caches(),
            cluster=self.cluster_info() if self.cluster_info is not None else None,
            sampling_defaults={"temperature": 1.0, "top_p": 1.0, **self.sampling_defaults},
            max_tokens_policy=self.settings.max_tokens_policy,
            notes=d["notes"],
            demo=self.demo,
        )
        return [ModelCard(id=name, created=self.created, **facts) for name in self.served_names]
