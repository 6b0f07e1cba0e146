"""torch's CUDA allocator peaks per phase, beside the NVML readings.

``max_memory_allocated`` is what tensors occupied; ``max_memory_reserved`` what the caching allocator holds from
the driver. NVML's process-used minus torch's reserved is the CUDA context, cuBLAS workspaces and fragmentation
slack, which torch does not see; a profile reports both so that difference is visible. Silent (all None) on CPU.
"""

from __future__ import annotations

from .hooks import PhaseTracker


class TorchAllocatorPeaks(PhaseTracker):
    def __init__(self, device: str = "cpu"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self.phase: str | None = None
        self.allocated_peak: dict[str, int] = {}
        self.reserved_peak: dict[str, int] = {}
        self.allocated_idle_bytes: int | None = None

    def set_phase(self, phase: str) -> None:
        if not self.enabled:
            return
        cuda = self.torch.cuda
        if self.phase is not None:  # close the running phase: its peaks since the last reset
            a = cuda.max_memory_allocated(self.device)
            r = cuda.max_memory_reserved(self.device)
            self.allocated_peak[self.phase] = max(a, self.allocated_peak.get(self.phase, 0))
            self.reserved_peak[self.phase] = max(r, self.reserved_peak.get(self.phase, 0))
        if phase == "idle" and self.allocated_idle_bytes is None:
            self.allocated_idle_bytes = cuda.memory_allocated(self.device)
        cuda.reset_peak_memory_stats(self.device)
        self.phase = phase

    def summary(self, phases: tuple[str, ...] = ("vision", "prefill", "decode")) -> dict:
        if not self.enabled:
            return {
                "torch_allocated_idle_bytes": None,
                "torch_allocated_peak_bytes": None,
                "torch_reserved_peak_bytes": None,
            }

        def peak(d: dict[str, int]) -> int | None:
            vals = [d[p] for p in phases if p in d]
            return max(vals) if vals else None

        return {
            "torch_allocated_idle_bytes": self.allocated_idle_bytes,
            "torch_allocated_peak_bytes": peak(self.allocated_peak),
            "torch_reserved_peak_bytes": peak(self.reserved_peak),
            "torch_allocated_prefill_peak_bytes": peak(
                {k: v for k, v in self.allocated_peak.items() if k in ("vision", "prefill")}
            ),
            "torch_allocated_decode_peak_bytes": self.allocated_peak.get("decode"),
        }
