"""Prometheus metrics and memory readings, one registry per app (tests run several apps in one process).

Every request-level series carries the ``precision`` label (``nf4``, ``int8+vision-bf16`` …), so dashboards can
compare precisions served side by side. Memory: torch's allocator counters and, when NVML is present, the device's
own used/total for CUDA; the process resident set otherwise (and always, via the process collector).
"""

from __future__ import annotations

import logging

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from engine import EngineStats, RequestHandle

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


def _nvml_device_memory(index: int) -> tuple[int, int] | None:
    """(used, total) bytes of one GPU as the driver sees it (other processes included), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return int(info.used), int(info.total)
    except Exception:  # no driver, no NVML library, MIG without access: fall back to torch's numbers
        return None


def vram_snapshot(device: torch.device) -> dict[str, int] | None:
    """Memory of the serving GPU in bytes, or None on a CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    snap = {
        "allocated_bytes": torch.cuda.memory_allocated(index),
        "reserved_bytes": torch.cuda.memory_reserved(index),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(index),
    }
    nvml = _nvml_device_memory(index)
    if nvml is not None:
        snap["device_used_bytes"], snap["device_total_bytes"] = nvml
    else:
        free, total = torch.cuda.mem_get_info(index)
        snap["device_used_bytes"], snap["device_total_bytes"] = total - free, total
    return snap


class Metrics:
    def __init__(self, model: str, precision: str, replica: str | None = None):
        """``replica``: serve-cluster's replica id, a label on every series (one Prometheus target per replica)."""
        self.registry = CollectorRegistry()
        self.labels = {"model": model, "precision": precision}
        lab = ("model", "precision")
        if replica is not None:
            self.labels["replica"] = replica
            lab += ("replica",)
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "glm4v_requests", "Chat completion requests answered, by HTTP status", lab + ("status",), registry=r
        )
        self.finished = Counter(
            "glm4v_request_finish",
            "Generations ended, by finish reason (stop, length, cancelled, timeout, error)",
            lab + ("finish_reason",),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "glm4v_prompt_tokens", "Prompt tokens processed (image embeddings included)", lab, registry=r
        )
        self.generation_tokens = Counter("glm4v_generation_tokens", "Completion tokens generated", lab, registry=r)
        self.ttft = Histogram(
            "glm4v_time_to_first_token_seconds",
            "Arrival to first token (queue + prefill)",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "glm4v_time_per_output_token_seconds",
            "Time between consecutive tokens of a request",
            lab,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "glm4v_queue_time_seconds", "Time waiting for a batch slot", lab, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "glm4v_e2e_request_latency_seconds", "Arrival to last token", lab, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.waiting = Gauge(
            "glm4v_requests_waiting", "Requests queued for a batch slot (queue depth)", lab, registry=r
        )
        self.running = Gauge("glm4v_requests_running", "Requests decoding or prefilling", lab, registry=r)
        self.queue_limit = Gauge(
            "glm4v_queue_limit", "Waiting requests allowed before 429 (--max-queue)", lab, registry=r
        )
        self.kv_cache = Gauge("glm4v_kv_cache_bytes", "Preallocated KV cache", lab, registry=r)
        self.weights = Gauge("glm4v_model_weight_bytes", "Model weights incl. quantization state", lab, registry=r)
        self.vram = Gauge(
            "glm4v_vram_bytes",
            "GPU memory (allocated/reserved/peak_allocated by torch; device_used/device_total by the driver)",
            lab + ("kind",),
            registry=r,
        )
        self.info = Gauge(
            "glm4v_model_info",
            "Always 1; the labels describe what is served",
            lab + ("vision_precision", "device", "vision_size", "demo"),
            registry=r,
        )
        # engine.prefix_cache: counters mirrored from the engine's own (EngineStats), gauges set on each scrape
        self.cache_counters = {
            name: Counter(f"glm4v_{name}", doc, lab, registry=r)
            for name, doc in (
                ("image_cache_hits", "Images whose features came from the image-feature cache (no decode, no ViT)"),
                ("image_cache_misses", "Images looked up in the image-feature cache and encoded"),
                ("prefix_hits", "Prefills that reused a kept KV-cache row (prefix reuse)"),
                ("prefix_misses", "Prefills that started on an empty row"),
                ("prefix_reused_tokens", "Prompt tokens not prefilled because a kept row held them"),
            )
        }
        self._cache_seen = dict.fromkeys(self.cache_counters, 0)
        self.cache_gauges = {
            name: Gauge(f"glm4v_{name}", doc, lab, registry=r)
            for name, doc in (
                ("image_cache_bytes", "Host memory held by the image-feature cache (--image-cache-mb bounds it)"),
                ("image_cache_entries", "Images in the image-feature cache"),
                ("prefix_kept_rows", "KV-cache rows kept for prefix reuse (given back as soon as a request needs one)"),
            )
        }
        self._latency_ema: float | None = None

    def set_model(
        self, precision: str, vision_precision: str, device: str, vision_size: int, demo: bool, weight_bytes: int
    ) -> None:
        self.labels["precision"] = precision
        self.info.labels(
            **self.labels,
            vision_precision=vision_precision,
            device=device,
            vision_size=str(vision_size),
            demo=str(demo).lower(),
        ).set(1)
        self.weights.labels(**self.labels).set(weight_bytes)

    def count_status(self, status: int) -> None:
        self.requests.labels(**self.labels, status=str(status)).inc()

    def observe(self, handle: RequestHandle, finish_reason: str) -> None:
        """Record one ended generation from its handle's counters and timestamps."""
        lab = self.labels
        self.finished.labels(**lab, finish_reason=finish_reason).inc()
        self.prompt_tokens.labels(**lab).inc(handle.prompt_tokens)
        self.generation_tokens.labels(**lab).inc(handle.completion_tokens)
        t = handle.timings
        if t.started is not None:
            self.queue_time.labels(**lab).observe(t.started - t.submitted)
        if t.first_token is not None:
            self.ttft.labels(**lab).observe(t.first_token - t.submitted)
        tpot = self.tpot.labels(**lab)
        for a, b in zip(t.token_times, t.token_times[1:], strict=False):
            tpot.observe(b - a)
        end = t.finished or (t.token_times[-1] if t.token_times else None)
        if end is not None:
            e2e = end - t.submitted
            self.e2e.labels(**lab).observe(e2e)
            self._latency_ema = e2e if self._latency_ema is None else 0.8 * self._latency_ema + 0.2 * e2e

    def retry_after_s(self, stats: EngineStats) -> int:
        """A Retry-After for a full queue: the queue's length in batches × the recent request latency."""
        per_batch = self._latency_ema or 1.0
        batches = max(1, -(-stats.waiting // max(1, stats.max_batch_size)))
        return int(min(60, max(1, round(per_batch * batches))))

    def render(self, stats: EngineStats | None, max_queue: int, device: torch.device | None) -> bytes:
        lab = self.labels
        if stats is not None:
            self.waiting.labels(**lab).set(stats.waiting)
            self.running.labels(**lab).set(stats.running + stats.prefilling)
            self.kv_cache.labels(**lab).set(stats.kv_cache_bytes)
            for name, counter in self.cache_counters.items():
                now = getattr(stats, name)
                counter.labels(**lab).inc(max(0, now - self._cache_seen[name]))
                self._cache_seen[name] = now
            for name, gauge in self.cache_gauges.items():
                gauge.labels(**lab).set(getattr(stats, name))
        self.queue_limit.labels(**lab).set(max_queue)
        snap = vram_snapshot(device) if device is not None else None
        for kind, value in (snap or {}).items():
            self.vram.labels(**lab, kind=kind.removesuffix("_bytes")).set(value)
        return generate_latest(self.registry)
