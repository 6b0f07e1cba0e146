"""What a loaded model's weights really occupy, per part, quantization state included.

``get_memory_footprint()`` leaves out bitsandbytes' quantization state (the 4-bit absmax and codebooks, the int8
row scales), which is 1/8 of an nf4 model's weight bytes. This walks every tensor, state included, once.
The part names are shared with the estimator (:mod:`quant.estimate`), which must predict the same numbers.
"""

from __future__ import annotations

import re

import torch
from torch import nn

PARTS = (
    ("lm_head", re.compile(r"^transformer\.output_layer\.")),
    ("embeddings", re.compile(r"^transformer\.embedding\.")),
    ("lm_linears", re.compile(r"^transformer\.encoder\.layers\.\d+\.(self_attention|mlp)\.")),
    ("lm_norms", re.compile(r"^transformer\.encoder\.")),
    ("vision_linears", re.compile(r"^transformer\.vision\.transformer\.layers\.\d+\.(attention|mlp)\.")),
    ("vision_other", re.compile(r"^transformer\.vision\.(patch_embedding|transformer)\.")),
    ("projector", re.compile(r"^transformer\.vision\.")),
)
PART_NAMES = tuple(p for p, _ in PARTS) + ("quant_state", "other")


def part_of(name: str) -> str:
    for part, pattern in PARTS:
        if pattern.match(name):
            return part
    return "other"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def module_quant_state(module: nn.Module, int8_weight: bool = False):
    """The bitsandbytes tensors of one layer that live beside its weight rather than as parameters: 4-bit absmax,
    codebook and offset (and the nested statistics of double quantization), int8 row scales (``SCB``; with
    ``int8_weight`` also ``CB``, the int8 weight itself). Int8Params holds CB/SCB until the layer's first forward
    moves them to the layer's ``MatmulLtState``, so both places are looked at."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    while state is not None:  # QuantState, then its nested state2
        for name in ("absmax", "code", "offset"):
            t = getattr(state, name, None)
            if isinstance(t, torch.Tensor):
                yield t
        state = getattr(state, "state2", None)
    names = ("CB", "SCB") if int8_weight else ("SCB",)
    for holder in (weight, getattr(module, "state", None)):
        for name in names:
            t = getattr(holder, name, None)
            if isinstance(t, torch.Tensor):
                yield t


def quantization_state_tensors(model: nn.Module):
    """Every such tensor of a model (int8 weights included): what a compiled decode step must mark static, or a CUDA
    graph would copy them — ~150 MB of absmax for the full model in nf4 — into its own buffers at every replay."""
    for module in model.modules():
        yield from module_quant_state(module, int8_weight=True)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """{part: bytes} for every parameter, persistent buffer and quantization-state tensor, plus ``total``."""
    seen: set[tuple[int, int]] = set()
    parts = dict.fromkeys(PART_NAMES, 0)

    def add(part: str, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            parts[part] += _nbytes(t)
            return
        key = (t.data_ptr(), _nbytes(t))  # views into one packed host buffer (quant.offload) are distinct
        if key in seen:
            return
        seen.add(key)
        parts[part] += _nbytes(t)

    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            add(part_of(f"{mname}.{pname}"), p)
        for bname, b in module.named_buffers(recurse=False):
            if bname in module._non_persistent_buffers_set:
                continue
            add(part_of(f"{mname}.{bname}"), b)
        for t in module_quant_state(module):
            add("quant_state", t)
    parts["total"] = sum(parts.values())
    return parts
