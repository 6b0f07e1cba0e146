"""What fits: the fallback ladder (``--precision auto``, ``estimate --gpu-gb``), the host-RAM check for offloaded parts,
and the longest context a GPU's free memory holds — all decided from :func:`quant.estimate.estimate`.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm4v.config import ChatGLMConfig

from .estimate import Estimate, config_flags, config_label, estimate


@dataclass(frozen=True)
class Rung:
    """One configuration of a fallback ladder (``--precision auto``, ``estimate --gpu-gb``)."""

    precision: str
    vision_precision: str | None = None  # None = same as precision
    offload: tuple[str, ...] = ()
    lm_head_precision: str | None = None  # None = 16-bit

    def flags(self) -> str:
        return config_flags(self.precision, self.vision_precision, self.offload, self.lm_head_precision)

    def label(self) -> str:
        return config_label(self.precision, self.vision_precision, self.offload, self.lm_head_precision)

    def estimate(self, **kw) -> Estimate:
        return estimate(
            precision=self.precision,
            vision_precision=self.vision_precision,
            offload=self.offload,
            lm_head_precision=self.lm_head_precision,
            **kw,
        )


LOW_VRAM_OFFLOAD = ("vision", "embeddings")


def low_vram_rungs(vision_float: str = "bf16") -> list[Rung]:
    """The rungs below "everything resident in nf4": the vision tower streamed from host memory at full precision
    (``vision_float``) with the embedding table on the host; then also a 4-bit LM head; then the streamed tower in
    nf4 too (a third of the host memory and of the PCIe traffic)."""
    return [
        Rung("nf4", vision_float, LOW_VRAM_OFFLOAD),
        Rung("nf4", vision_float, LOW_VRAM_OFFLOAD, "nf4"),
        Rung("nf4", "nf4", LOW_VRAM_OFFLOAD),
        Rung("nf4", "nf4", LOW_VRAM_OFFLOAD, "nf4"),
    ]


def best_fitting(candidates: list, gpu_bytes: int, **kw) -> tuple[str, str, Estimate] | None:
    """The first candidate — a :class:`Rung` or a ``(precision, vision_precision)`` pair — whose estimate fits
    ``gpu_bytes``: (precision, vision_precision, estimate); the estimate carries the offload and head as well."""
    for cand in candidates:
        rung = cand if isinstance(cand, Rung) else Rung(*cand)
        est = rung.estimate(**kw)
        est.gpu_bytes = gpu_bytes
        if est.fits:
            return est.precision, est.vision_precision, est
    return None


# Host RAM is part of the budget: the offloaded parts live in pinned (unswappable) host memory, and the process itself
# (Python, torch, the CUDA runtime, tokenizer, server) needs room beside them. An assumption, stated.
HOST_MARGIN_BYTES = 2 * 2**30


def check_host_memory(request_or_estimate, available_bytes: int | None = None, margin_bytes: int = HOST_MARGIN_BYTES):
    """Refuse, before loading, a placement whose host part does not fit the host: ``host_bytes + margin_bytes`` must
    not exceed ``available_bytes`` (default: ``psutil.virtual_memory().available``). Takes an :class:`Estimate` or a
    resolved :class:`quant.request.LoadRequest`; returns the estimate. The ValueError names the numbers and what to
    change."""
    est = request_or_estimate if isinstance(request_or_estimate, Estimate) else request_or_estimate.estimate()
    if not est.host_bytes:
        return est
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    need = est.host_bytes + margin_bytes
    if need <= available_bytes:
        return est
    parts = " + ".join(f"{k} {n / 1e9:.2f} GB" for k, n in est.host.items())
    fixes = []
    if "vision" in est.offload and est.vision_precision not in ("nf4", "fp4"):
        nf4 = est.variant(vision_precision="nf4")
        fixes.append(
            f"--vision-precision nf4 (the streamed tower then takes {nf4.host['vision'] / 1e9:.2f} GB of host memory "
            f"instead of {est.host['vision'] / 1e9:.2f} GB)"
        )
    for part in est.offload:
        kept = est.variant(offload=tuple(p for p in est.offload if p != part))
        fixes.append(
            f"drop {part} from --offload ({est.host[part] / 1e9:.2f} GB less on the host, "
            f"{(kept.total_bytes - est.total_bytes) / 1e9:.2f} GB more on the GPU)"
        )
    raise ValueError(
        f"--offload {','.join(est.offload)} keeps {est.host_bytes / 1e9:.2f} GB in host (pinned) memory ({parts}), "
        f"plus a {margin_bytes / 1e9:.2f} GB margin for the process = {need / 1e9:.2f} GB, but only "
        f"{available_bytes / 1e9:.2f} GB of host RAM is available. Use " + "; or ".join(fixes) + "; or free host memory"
    )


def max_context_that_fits(
    free_bytes: int,
    config: ChatGLMConfig,
    batch: int,
    precision: str,
    vision_precision: str | None = None,
    vision_size: int | None = None,
    prefill_tokens: int = 512,
    compute_dtype: str | None = None,
    headroom_bytes: int = 512 * 2**20,
    lm_head_precision: str | None = None,
) -> int:
    """The longest context (tokens per sequence) whose KV cache for ``batch`` sequences fits ``free_bytes`` — the
    memory left after the weights are loaded — while keeping room for the activation peak of a ``prefill_tokens``
    prefill chunk or of the vision encoder, and ``headroom_bytes`` for allocator fragmentation. Capped at the
    config's ``seq_length``; 0 when nothing fits."""
    est = estimate(
        config,
        precision=precision,
        vision_precision=vision_precision,
        vision_size=vision_size,
        context=prefill_tokens,
        prompt_tokens=prefill_tokens,
        compute_dtype=compute_dtype,
        batch=batch,
        lm_head_precision=lm_head_precision,
    )
    budget = free_bytes - est.activation_peak_bytes - headroom_bytes
    tokens = budget // (est.kv_cache_bytes_per_token * batch) if budget > 0 else 0
    return int(min(config.seq_length, tokens))


def serving_context(fits: int, seq_length: int) -> int:
    """The context a server configures from ``max_context_that_fits``: all of ``seq_length`` when it fits, else
    rounded down to a multiple of 256 tokens."""
    return fits if fits >= seq_length else fits // 256 * 256
