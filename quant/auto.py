"""``--precision auto``: the best precision that fits the free memory of the device, decided from the estimate.

On a GPU the order is bf16 (fp16 without bf16 support) → int8 → nf4; the first whose estimated total (weights,
KV cache for the requested context, activation peak, CUDA context) fits the free VRAM wins. On a CPU the answer
is bf16 where the processor computes it natively (AVX512-BF16 or AMX), fp32 otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm4v.checkpoint import load_config
from glm4v.config import ChatGLMConfig

from .estimate import best_fitting
from .precision import device_supports_bf16


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
    """(precision, human-readable reason) for a checkpoint folder or a config."""
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
