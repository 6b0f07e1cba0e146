"""What the engine is asked to be, and how big its KV cache can be on this device.

:class:`EngineConfig` is the engine's half of the server's settings (batch, context, queue, prefill units,
``--compile``). :func:`choose_max_model_len` sizes the context: ``--max-model-len`` if given; else the checkpoint's
``seq_length`` — on a GPU, as much of it as the memory left after loading holds for ``max_batch_size`` sequences
(a 12 GB card with nf4 has room for ~5k tokens × 8, not 8192 × 8), like vLLM sizing its cache from free memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quant import LoadedModel
from quant.fit import max_context_that_fits, serving_context
from quant.precision import precision_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    max_model_len: int | None = None  # None = the checkpoint's seq_length (on a GPU: what fits, see below)
    max_queue: int = 64
    prefill_chunk: int = 512
    vision_layers_per_step: int = 8
    compile: str = "off"  # off | reduce-overhead | cudagraphs | default (engine.cuda_graphs.COMPILE_MODES); GPU only
    prefix_cache: bool = True  # keep finished rows for prefix reuse (engine.prefix_cache)
    image_cache_mb: float = 256  # image-feature cache in host memory; 0 = off


def compile_mode(requested: str, device: torch.device) -> str | None:
    """``--compile`` as the engine takes it: None when off, and on a CPU, where the compiled step measured slower
    (docs/PERFORMANCE.md, "--compile")."""
    if requested == "off":
        return None
    if device.type != "cuda":
        log.warning(
            "--compile %s ignored on %s: the compiled decode step is slower there (docs/PERFORMANCE.md)",
            requested,
            device.type,
        )
        return None
    return requested


def choose_max_model_len(lm: LoadedModel, config: EngineConfig, free_bytes: int | None = None) -> int:
    """The context length to allocate the KV cache for (see the module docstring)."""
    if config.max_model_len:
        return config.max_model_len
    seq_length = lm.config.seq_length
    if free_bytes is None:
        if lm.device.type != "cuda":
            return seq_length
        free_bytes, _ = torch.cuda.mem_get_info(lm.device)
    spec = lm.spec
    # --compile keeps CUDA-graph memory pools and compiled-kernel workspaces beside the cache: an allowance of
    # 512 MiB on top of the usual headroom (an estimate — decode activations are small — not a measurement).
    headroom = (512 + (512 if config.compile != "off" and lm.device.type == "cuda" else 0)) * 2**20
    fits = max_context_that_fits(
        free_bytes,
        lm.config,
        config.max_batch_size,
        spec.precision,
        spec.vision_precision,
        lm.vision_size,
        prefill_tokens=config.prefill_chunk,
        headroom_bytes=headroom,
        compute_dtype=precision_name(spec.dtype),
        lm_head_precision=spec.lm_head_precision,
    )
    need = lm.image_tokens() + 256
    if fits < need:
        raise MemoryError(
            f"{free_bytes / 2**30:.2f} GiB left after loading cannot hold a KV cache of {config.max_batch_size} × "
            f"{need} tokens (one image and a short exchange) next to the activations: lower --max-batch-size, use a "
            "smaller --precision or --vision-size, or set --max-model-len explicitly"
        )
    chosen = serving_context(fits, seq_length)
    if chosen < seq_length:
        log.warning(
            "max_model_len %d (of the checkpoint's %d): what %.2f GiB of free memory holds for %d sequences; "
            "set --max-model-len / --max-batch-size to choose differently",
            chosen,
            seq_length,
            free_bytes / 2**30,
            config.max_batch_size,
        )
    return chosen
