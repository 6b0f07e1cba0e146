"""What to load, described once, and the one function that opens it.

Every front door — ``serve``, ``chat``, ``profile``, ``eval``, the benchmarks — builds a :class:`LoadRequest` from
its flags and calls :func:`open_model`, which makes the decisions in one order, in one place:

1. the source: a checkpoint folder, random weights of an architecture (``synthetic``), or — neither given — the
   shipped demo model (a 5 M-parameter GLM-4V-architecture model trained on drawn shapes, said loudly: not GLM-4V-9B);
2. the device (``cuda`` when available, pinned to the current index);
3. ``--precision auto`` → the best precision whose estimate fits the free memory for ``context`` × ``batch``;
4. the load (:func:`quant.load`) or the synthetic build (:func:`quant.synthetic.build`), both of which end in the
   same finishing step (:func:`quant.loader.finish_model`).

The estimator takes the same object (:meth:`LoadRequest.estimate`), so a prediction is made for exactly what would
be loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from .offload import parse_offload

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "No --model given: serving the built-in DEMO model ({path}), a 5 M-parameter model of the GLM-4V architecture "
    "trained on drawn shapes, words, clocks and charts — NOT GLM-4V-9B. "
    "Pass --model THUDM/glm-4v-9b (or a folder) for the real model."
)
AUTO_CONTEXT = 2048  # what --precision auto sizes for when no context is given (the context then fills the rest)


@dataclass(frozen=True)
class LoadRequest:
    model: str | None = None  # checkpoint folder or hub id; None (and no synthetic) = the shipped demo model
    synthetic: str | None = None  # "full" | "mid" | "tiny" | a config.json: random weights built on the device
    precision: str = "auto"
    vision_precision: str | None = None  # None = same as precision
    compute_dtype: str | None = None
    double_quant: bool = True
    vision_size: int | None = None  # None = the checkpoint's
    device: str | None = None  # None = cuda when available
    lm_head_precision: str | None = None  # None = 16-bit (the compute dtype)
    # Parts kept in host memory: "vision" (streamed), "embeddings" (quant.offload); None = not given (all on the
    # device, unless --precision auto chooses the low-VRAM placement), () = explicitly none.
    offload: tuple[str, ...] | None = None
    # What `auto` sizes the KV cache for: None = min(seq_length, AUTO_CONTEXT) tokens per sequence.
    context: int | None = None
    batch: int = 1
    seed: int = 0  # synthetic weights only

    @classmethod
    def from_args(cls, args, **overrides) -> LoadRequest:
        """From the shared model flags (``--model --precision --vision-precision --compute-dtype --no-double-quant
        --vision-size --device``, and ``--synthetic`` where a command has it)."""
        values = dict(
            model=getattr(args, "model", None),
            synthetic=getattr(args, "synthetic", None),
            precision=getattr(args, "precision", "auto"),
            vision_precision=getattr(args, "vision_precision", None),
            compute_dtype=getattr(args, "compute_dtype", None),
            double_quant=not getattr(args, "no_double_quant", False),
            vision_size=getattr(args, "vision_size", None),
            device=getattr(args, "device", None),
            lm_head_precision=getattr(args, "lm_head_precision", None),
            offload=None if getattr(args, "offload", None) is None else parse_offload(args.offload),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def is_demo(self) -> bool:
        return not self.model and not self.synthetic

    def source_label(self) -> str:
        if self.synthetic:
            return f"synthetic {self.synthetic} (random weights)"
        return self.model or "the built-in demo model (not GLM-4V-9B)"

    def config(self):
        """The architecture this request loads (reads only config.json)."""
        if self.synthetic:
            from .synthetic import synthetic_config

            return synthetic_config(self.synthetic)
        from glm4v.checkpoint import load_config

        return load_config(self.model_dir())

    def model_dir(self) -> str:
        """The local checkpoint folder: ``--model`` itself, or a hub id resolved (downloaded, or found in the
        cache) by :func:`quant.hub.resolve_model_path`; the shipped demo model when there is none."""
        if self.model:
            from .hub import resolve_model_path

            return resolve_model_path(self.model)
        if self.synthetic:
            raise ValueError("a synthetic model has no checkpoint folder")
        from glm4v.tiny import demo_model_dir

        return str(demo_model_dir())

    def resolve(self, config=None) -> LoadRequest:
        """The same request with the device made concrete and ``auto`` decided (logged with its reason), and the host
        checked for room for the offloaded parts before anything is loaded.

        On a GPU, ``auto`` may also choose the low-VRAM placement (:mod:`quant.auto`): ``vision_precision``,
        ``offload`` and ``lm_head_precision`` — but only where the request left them at their defaults (None, none,
        None); what was given explicitly is kept, and ``auto`` picks the precision around it."""
        from .loader import resolve_device
        from .prequantized import held_quantization

        device = resolve_device(self.device)
        request = replace(self, device=str(device))
        held = None if self.synthetic else held_quantization(self.model_dir())
        if held is not None and self.precision == "auto":  # a pre-quantized folder: what it holds
            log.info("--precision auto → %s (a pre-quantized checkpoint)", held.label())
            return replace(
                request,
                precision=held.precision,
                vision_precision=self.vision_precision or held.vision_precision,
                lm_head_precision=self.lm_head_precision
                or (held.lm_head_precision if held.lm_head_precision != held.float_dtype else None),
            )
        if self.precision == "auto":
            from .auto import choose_auto

            config = config or self.config()
            context = self.context or min(config.seq_length, AUTO_CONTEXT)
            choice = choose_auto(
                config,
                device,
                vision_size=self.vision_size,
                context=context,
                batch=self.batch,
                vision_precision=self.vision_precision,
                offload=None if self.offload is None else tuple(self.offload),
                lm_head_precision=self.lm_head_precision,
                compute_dtype=self.compute_dtype,
                double_quant=self.double_quant,
            )
            log.info("--precision auto → %s (%s)", choice.flags(), choice.reason)
            request = replace(
                request,
                precision=choice.precision,
                vision_precision=self.vision_precision if self.vision_precision else choice.vision_precision,
                offload=tuple(self.offload) if self.offload is not None else choice.offload,
                lm_head_precision=self.lm_head_precision if self.lm_head_precision else choice.lm_head_precision,
            )
        if request.offload:
            from .fit import check_host_memory

            check_host_memory(request.estimate(config))
        return request

    def estimate(self, config=None, **kw):
        """:func:`quant.estimate.estimate` for this request (``auto`` must be resolved first)."""
        from .estimate import estimate

        if self.precision == "auto":
            raise ValueError("resolve --precision auto before estimating")
        config = config or self.config()
        kw.setdefault("context", self.context or min(config.seq_length, AUTO_CONTEXT))
        kw.setdefault("batch", self.batch)
        if self.device is not None:
            kw.setdefault("device", str(self.device))
        return estimate(
            config,
            precision=self.precision,
            vision_precision=self.vision_precision,
            vision_size=self.vision_size,
            double_quant=self.double_quant,
            compute_dtype=self.compute_dtype,
            lm_head_precision=self.lm_head_precision,
            offload=tuple(self.offload or ()),
            **kw,
        )


def open_model(request: LoadRequest):
    """Load (or build) what ``request`` describes → :class:`quant.LoadedModel` (with ``demo`` set)."""
    if request.is_demo:
        path = request.model_dir()
        log.warning(DEMO_WARNING.format(path=path))
        request = replace(request, model=path)
        demo = True
    else:
        demo = bool(request.synthetic)
        if request.model:
            request = replace(request, model=request.model_dir())  # a hub id: resolved once, a folder from here on
    if request.synthetic:
        log.warning("--synthetic %s: RANDOM weights (real memory and speed, meaningless answers)", request.synthetic)
    config = request.config()
    request = request.resolve(config)
    kw = dict(
        lm_head_precision=request.lm_head_precision,
        offload=request.offload or (),
        precision=request.precision,
        vision_precision=request.vision_precision,
        device=request.device,
        vision_size=request.vision_size,
        compute_dtype=request.compute_dtype,
        double_quant=request.double_quant,
    )
    if request.synthetic:
        from .synthetic import build

        lm = build(config, seed=request.seed, name=request.synthetic, **kw)
    else:
        from .loader import load

        lm = load(request.model, **kw)
    lm.demo = demo
    return lm
