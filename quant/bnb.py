"""bitsandbytes as a transformation applied to a float model: swap ``nn.Linear`` for a quantized layer.

Used where ``from_pretrained(quantization_config=...)`` cannot express the wish — a vision tower quantized with a
different method than the language model — and for the full-size synthetic model of the profiler. Layers are
converted one at a time, so the float copy of only one layer exists at once. The network in :mod:`glm4v` knows
nothing about any of this.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .precision import PrecisionSpec

log = logging.getLogger(__name__)


def _bnb():
    import bitsandbytes as bnb

    return bnb


def quantized_linear(linear: nn.Linear, precision: str, spec: PrecisionSpec, device: torch.device) -> nn.Module:
    """A bnb layer holding ``linear``'s weights quantized on ``device`` (quantization happens in the move)."""
    bnb = _bnb()
    weight = linear.weight.data
    bias = linear.bias
    if precision == "int8":
        new = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias is not None,
            has_fp16_weights=False,
            threshold=spec.int8_threshold,
            device="meta",
        )
        # bitsandbytes quantizes Int8Params only on a move *from* the CPU (transformers' loader does the same).
        new.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    elif precision in ("nf4", "fp4"):
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias is not None,
            compute_dtype=spec.dtype,
            compress_statistics=spec.double_quant,
            quant_type=precision,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=precision, compress_statistics=spec.double_quant, module=new
        )
    else:
        raise ValueError(f"{precision!r} is not a bitsandbytes precision")
    if bias is not None:
        new.bias = nn.Parameter(bias.data.to(spec.dtype), requires_grad=False)
    return new.to(device)


def quantize_linears(
    root: nn.Module, precision: str, spec: PrecisionSpec, device: torch.device | str, prefix: str = ""
) -> int:
    """Replace every plain ``nn.Linear`` under ``root`` in place; returns how many were converted."""
    device = torch.device(device)
    # Names only: holding the modules in a list would keep every replaced float layer alive until the end.
    names = [n for n, m in root.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        setattr(parent, child_name, quantized_linear(getattr(parent, child_name), precision, spec, device))
    count = len(names)
    log.debug("quantized %d Linear layers under %s to %s", count, prefix or type(root).__name__, precision)
    return count


def fix_cpu_4bit_layers(model: nn.Module) -> int:
    """Work around bitsandbytes' CPU 4-bit repacking (docs/MODEL.md §8.5), which needs out_features % 32 == 0 and
    in_features % blocksize (64) == 0.

    Affected layers fall back to the unpacked CPU kernel (about 2× slower, same results). Real GLM-4V layers all
    qualify, so this only ever touches odd test sizes.
    """
    bnb = _bnb()
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and (m.out_features % 32 or m.in_features % m.weight.blocksize):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def layer_types(model: nn.Module, prefix: str = "") -> dict[str, int]:
    """Counts of Linear-like layer classes under ``prefix`` (e.g. {"Linear4bit": 80, "Linear": 1})."""
    counts: dict[str, int] = {}
    for name, m in model.named_modules():
        if not name.startswith(prefix):
            continue
        if isinstance(m, nn.Linear):  # bnb layers subclass nn.Linear
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts
