"""``--precision auto``: the most faithful configuration that fits the free memory of the device, decided from the
estimate.

On a GPU the ladder is, most faithful first (:func:`auto_ladder`):

1. bf16 (fp16 without bf16 support) → int8 → nf4, everything on the GPU;
2. nf4 with the vision tower streamed from host memory and the embedding table on the host (``--offload
   vision,embeddings``), the vision tower kept in 16-bit when the host has the RAM for it, else in nf4;
3. the same with a 4-bit LM head;
4. (when 2–3 streamed a 16-bit tower) nf4 vision streamed, 16-bit head; then with the 4-bit head — the smallest.

The first rung whose estimated GPU total (resident weights, streaming slots, KV cache for the requested context,
activation peak, CUDA context) fits the free VRAM — and whose host part, plus a margin, fits the available host RAM —
wins. What the user set explicitly (``--vision-precision``, ``--offload``, ``--lm-head-precision``) is kept on every
rung. :func:`choose_for_memory` is the pure decision (free VRAM and host RAM given as numbers); :func:`choose_auto`
reads them from the machine. On a CPU the answer is bf16 where the processor computes it natively (AVX512-BF16 or AMX),
fp32 otherwise, and nothing else changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from glm4v.checkpoint import load_config
from glm4v.config import ChatGLMConfig

from .estimate import Estimate, config_flags
from .fit import HOST_MARGIN_BYTES, LOW_VRAM_OFFLOAD, Rung, best_fitting, low_vram_rungs
from .precision import device_supports_bf16

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(
    model: str | Path | ChatGLMConfig,
    device: str | torch.device,
    vision_size: int | None = None,
    context: int = 2048,
    batch: int = 1,
) -> tuple[str, str]:
    """(precision, human-readable reason) for a checkpoint folder or a config: only the resident rungs
    (bf16 → int8 → nf4). :func:`choose_auto` also decides the low-VRAM placement."""
    device = torch.device(device)
    if device.type != "cuda":
        if cpu_has_native_bf16():
            return "bf16", "CPU with native bf16 (AVX512-BF16/AMX)"
        return "fp32", "CPU without native bf16"
    free, total = torch.cuda.mem_get_info(device)
    config = model if isinstance(model, ChatGLMConfig) else load_config(model)
    first = "bf16" if device_supports_bf16(device) else "fp16"
    pick = best_fitting(
        [(first, None), ("int8", None), ("nf4", None)],
        gpu_bytes=free,
        config=config,
        vision_size=vision_size,
        context=context,
        batch=batch,
        device="cuda",
    )
    gib = free / 2**30
    if pick is None:
        return "nf4", f"nothing fits {gib:.1f} GiB free by the estimate; nf4 is the smallest"
    p, _, est = pick
    return p, f"estimated {est.total_bytes / 2**30:.1f} GiB fits {gib:.1f} GiB free"


@dataclass(frozen=True)
class AutoChoice:
    """What ``--precision auto`` decided. ``vision_precision``/``lm_head_precision`` None = the defaults (same as the
    LM; 16-bit); ``estimate`` is None on a CPU."""

    precision: str
    vision_precision: str | None
    offload: tuple[str, ...]
    lm_head_precision: str | None
    reason: str
    estimate: Estimate | None = None

    def flags(self) -> str:
        return config_flags(self.precision, self.vision_precision, self.offload, self.lm_head_precision)


def auto_ladder(first: str = "bf16", stream_vision: str | None = None) -> list[Rung]:
    """The rungs tried, most faithful first. ``first`` is the GPU's 16-bit format; ``stream_vision`` the precision of
    a streamed vision tower on the first low-VRAM rungs (default ``first``; nf4 when the host lacks the RAM)."""
    rungs = [Rung(first), Rung("int8"), Rung("nf4")]
    low = low_vram_rungs(stream_vision or first)
    return rungs + [r for i, r in enumerate(low) if r not in low[:i]]


def _apply_fixed(rung: Rung, vision_precision, offload, lm_head_precision, first: str) -> Rung | None:
    """The rung with the user's explicit choices put in. A streamed tower cannot be int8: on the int8 rung with
    ``--offload vision`` given, the tower streams in ``first`` (16-bit) — or the rung is skipped when the user asked
    for an int8 tower."""
    if vision_precision is not None:
        rung = replace(rung, vision_precision=vision_precision)
    if offload is not None:  # given explicitly — `none` included
        rung = replace(rung, offload=tuple(offload))
    if lm_head_precision is not None:
        rung = replace(rung, lm_head_precision=lm_head_precision)
    if "vision" in rung.offload and (rung.vision_precision or rung.precision) == "int8":
        if vision_precision is not None:
            return None
        rung = replace(rung, vision_precision=first)
    return rung


def choose_for_memory(
    config: ChatGLMConfig,
    free_bytes: int,
    host_available_bytes: int | None,
    *,
    vision_size: int | None = None,
    context: int = 2048,
    batch: int = 1,
    first: str = "bf16",
    vision_precision: str | None = None,
    offload: tuple[str, ...] | None = None,
    lm_head_precision: str | None = None,
    compute_dtype: str | None = None,
    double_quant: bool = True,
    host_margin_bytes: int = HOST_MARGIN_BYTES,
) -> AutoChoice:
    """The first rung of :func:`auto_ladder` that fits ``free_bytes`` of VRAM (and whose host part plus
    ``host_margin_bytes`` fits ``host_available_bytes``; None = do not check the host). ``vision_precision``,
    ``offload`` and ``lm_head_precision`` are the user's explicit choices (None / empty = left to auto): kept on every
    rung. Nothing fits: the smallest rung, said in the reason."""
    kw = dict(
        config=config,
        vision_size=vision_size,
        context=context,
        batch=batch,
        compute_dtype=compute_dtype,
        double_quant=double_quant,
        device="cuda",
    )

    def host_ok(est: Estimate) -> bool:
        return host_available_bytes is None or est.host_bytes + host_margin_bytes <= host_available_bytes

    # The streamed tower stays 16-bit when the host can hold it (with the embedding table), else nf4.
    full = Rung("nf4", first, tuple(offload) if offload else LOW_VRAM_OFFLOAD).estimate(**kw)
    stream_vision = first if host_ok(full) else "nf4"
    tried, seen, skipped = [], set(), []
    for rung in auto_ladder(first, stream_vision):
        rung = _apply_fixed(rung, vision_precision, offload, lm_head_precision, first)
        if rung is None or rung in seen:
            continue
        seen.add(rung)
        est = rung.estimate(**kw)
        est.gpu_bytes = free_bytes
        tried.append((rung, est))
        if est.fits and host_ok(est):
            return _choice(rung, est, _reason(est, free_bytes, host_available_bytes, host_margin_bytes, skipped))
        gib = 2**30
        skipped.append(
            f"{est.label()} ({est.total_bytes / gib:.2f} GiB)"
            if not est.fits
            else f"{est.label()} ({est.host_bytes / gib:.2f} GiB of host memory)"
        )
    if not tried:
        raise ValueError("--offload vision cannot stream an int8 vision tower: use --vision-precision bf16 or nf4")
    rung, est = min(tried, key=lambda t: (not host_ok(t[1]), t[1].total_bytes))
    reason = (
        f"nothing fits {free_bytes / 2**30:.2f} GiB free by the estimate; the smallest, {est.label()}, needs "
        f"{est.total_bytes / 2**30:.2f} GiB"
    )
    if not host_ok(est):
        reason += f" and {est.host_bytes / 2**30:.2f} GiB of host memory"
    return _choice(rung, est, reason)


def _choice(rung: Rung, est: Estimate, reason: str) -> AutoChoice:
    return AutoChoice(rung.precision, rung.vision_precision, rung.offload, rung.lm_head_precision, reason, est)


def _reason(est: Estimate, free: int, host: int | None, margin: int, skipped: list[str]) -> str:
    gib = 2**30
    why = f"{est.label()}: estimated {est.total_bytes / gib:.2f} GiB fits {free / gib:.2f} GiB free"
    if est.host_bytes:
        why += f", {est.host_bytes / gib:.2f} GiB in host memory"
        if host is not None:
            why += f" (+{margin / gib:.0f} GiB margin, {host / gib:.1f} GiB available)"
    if skipped:
        why += "; too big: " + ", ".join(skipped)
    return why


def choose_auto(
    config: ChatGLMConfig,
    device: str | torch.device,
    vision_size: int | None = None,
    context: int = 2048,
    batch: int = 1,
    vision_precision: str | None = None,
    offload: tuple[str, ...] | None = None,
    lm_head_precision: str | None = None,
    compute_dtype: str | None = None,
    double_quant: bool = True,
) -> AutoChoice:
    """``--precision auto`` on this machine: free VRAM from ``torch.cuda.mem_get_info``, available host RAM from
    ``psutil``; on a CPU only the precision (:func:`choose_precision`), the rest as given."""
    device = torch.device(device)
    if device.type != "cuda":
        precision, reason = choose_precision(config, device, vision_size=vision_size, context=context, batch=batch)
        return AutoChoice(precision, vision_precision, tuple(offload or ()), lm_head_precision, reason)
    import psutil

    free, _ = torch.cuda.mem_get_info(device)
    return choose_for_memory(
        config,
        free,
        psutil.virtual_memory().available,
        vision_size=vision_size,
        context=context,
        batch=batch,
        first="bf16" if device_supports_bf16(device) else "fp16",
        vision_precision=vision_precision,
        offload=None if offload is None else tuple(offload),
        lm_head_precision=lm_head_precision,
        compute_dtype=compute_dtype,
        double_quant=double_quant,
    )
