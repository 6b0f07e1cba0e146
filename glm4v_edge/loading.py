"""Turn the shared model flags (``--model --precision --vision-precision ...``) into a loaded model."""

from __future__ import annotations

import logging

DEMO_WARNING = (
    "No --model given: using the built-in TINY DEMO checkpoint with RANDOM weights ({path}). "
    "Its answers are random text. Pass --model /path/to/glm-4v-9b for the real model."
)


def resolve_model_dir(model: str | None, log: logging.Logger) -> tuple[str, bool]:
    """(checkpoint folder, is_demo)."""
    if model:
        return model, False
    from glm4v.tiny import ensure_demo_checkpoint

    path = ensure_demo_checkpoint()
    log.warning(DEMO_WARNING.format(path=path))
    return str(path), True


def load_from_args(args, log: logging.Logger):
    import quant
    from quant.auto import choose_precision

    model_dir, _ = resolve_model_dir(args.model, log)
    device = args.device or str(quant.default_device())
    precision = args.precision
    if precision == "auto":
        precision, reason = choose_precision(model_dir, device, vision_size=args.vision_size)
        log.info("--precision auto → %s (%s)", precision, reason)
    return quant.load(
        model_dir,
        precision=precision,
        vision_precision=args.vision_precision,
        device=device,
        vision_size=args.vision_size,
        compute_dtype=args.compute_dtype,
        double_quant=not args.no_double_quant,
    )
