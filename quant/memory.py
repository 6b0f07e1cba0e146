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


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    w = getattr(module, "weight", None)
    out = []
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # 4-bit: absmax (+ nested absmax/code when double-quantized), codebook, offset
        for attr in ("absmax", "code", "offset"):
            t = getattr(qs, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        s2 = getattr(qs, "state2", None)
        if s2 is not None:
            for attr in ("absmax", "code"):
                t = getattr(s2, attr, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
    scb = getattr(w, "SCB", None)
    if isinstance(scb, torch.Tensor):  # int8: one fp32 scale per output row
        out.append(scb)
    return out


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """{part: bytes} for every parameter, persistent buffer and quantization-state tensor, plus ``total``."""
    seen: set[tuple[int, int]] = set()
    parts = dict.fromkeys(PART_NAMES, 0)

    def add(part: str, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            parts[part] += _nbytes(t)
            return
        key = (t.untyped_storage().data_ptr(), _nbytes(t))
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
        for t in _quant_state_tensors(module):
            add("quant_state", t)
    parts["total"] = sum(parts.values())
    return parts
