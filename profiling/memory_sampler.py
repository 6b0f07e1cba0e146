"""Memory over time, sampled in a background thread: NVML on a GPU, host RSS (psutil) otherwise.

NVML sees what torch's allocator statistics cannot: the CUDA context, cuBLAS workspaces and allocator slack, so it
is what decides whether a model fits a card. Two readings are kept per sample: *device used* (everything on the GPU,
other processes included) and *process used* (this PID's share, from the compute-process list; unavailable in some
containers, whose PID namespace hides the host PID). The primary reading is process-used when NVML reports it,
device-used otherwise.

Without a GPU, without the NVML library, or for a CPU run, the sampler says so (``memory_source="rss"`` and a
``memory_source_note``) and records the resident set size of this process instead; it never fails for lack of a
GPU. Samples are tagged with the phase running when they were taken (see :mod:`profiling.hooks`); each phase
change also takes one sample at once, so a phase shorter than the interval is still seen.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from .hooks import REQUEST_PHASES, PhaseTracker
from .stats import median


@dataclass
class Sample:
    t_s: float
    phase: str
    primary_bytes: int
    device_used_bytes: int | None
    process_used_bytes: int | None


class RssSource:
    """Resident set size of this process (host memory): the CPU stand-in for VRAM."""

    name = "rss"

    def __init__(self):
        import psutil

        self._proc = psutil.Process(os.getpid())

    def read(self) -> tuple[int, int | None, int | None]:
        rss = self._proc.memory_info().rss
        return rss, None, rss

    def info(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class NvmlSource:
    """Device-used and this-process-used memory of one GPU through NVML (``nvidia-ml-py``'s ``pynvml``)."""

    name = "nvml"

    def __init__(self, nvml, device_index: int = 0):
        self.nvml = nvml
        nvml.nvmlInit()
        try:
            self.handle = _nvml_handle(nvml, device_index)
        except Exception:
            nvml.nvmlShutdown()
            raise
        self.pid = os.getpid()

    def process_used(self) -> int | None:
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.nvml.NVMLError:
            return None
        used = [p.usedGpuMemory for p in procs if p.pid == self.pid and p.usedGpuMemory is not None]
        return sum(used) if used else None

    def read(self) -> tuple[int, int | None, int | None]:
        device = int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        process = self.process_used()
        return (process if process is not None else device), device, process

    def info(self) -> dict:
        n = self.nvml
        return {
            "gpu_name": _text(n.nvmlDeviceGetName(self.handle)),
            "gpu_driver": _text(n.nvmlSystemGetDriverVersion()),
            "gpu_memory_bytes": int(n.nvmlDeviceGetMemoryInfo(self.handle).total),
        }

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nvml_handle(nvml, device_index: int):
    """NVML numbers GPUs physically; CUDA numbers the visible ones. Map through CUDA_VISIBLE_DEVICES when set."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if device_index < len(visible):
        entry = visible[device_index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(device_index)


def open_source(device: str = "cpu", nvml=None) -> tuple[NvmlSource | RssSource, str]:
    """(source, note). ``nvml`` injects a module standing in for ``pynvml`` (tests use a fake one)."""
    dev_type, _, idx = str(device).partition(":")
    if dev_type != "cuda":
        return RssSource(), f"device is {device}: recording host RSS (psutil)"
    try:
        if nvml is None:
            import pynvml as nvml
        return NvmlSource(nvml, int(idx or 0)), "NVML device and per-process used memory"
    except ImportError as e:
        return RssSource(), f"no NVML ({e}; install nvidia-ml-py): recording host RSS instead of VRAM"
    except Exception as e:  # pynvml.NVMLError and its subclasses (no library, no GPU, no permission)
        if nvml is not None and isinstance(e, getattr(nvml, "NVMLError", ())):
            return RssSource(), f"no NVML ({e}): recording host RSS instead of VRAM"
        raise


def rss_breakdown() -> dict:
    """Linux only: this process's resident memory split into anonymous pages (allocations) and file pages
    (memory-mapped files, e.g. a checkpoint still mapped after loading: clean, reclaimable by the kernel)."""
    try:
        status = open("/proc/self/status").read()
    except OSError:
        return {}
    out = {}
    for key, name in (("RssAnon", "rss_anon_bytes"), ("RssFile", "rss_file_bytes")):
        for line in status.splitlines():
            if line.startswith(key + ":"):
                out[name] = int(line.split()[1]) * 1024
    return out


class MemorySampler(PhaseTracker):
    """Background sampler; use as a hooks listener (phases follow generation events) or call :meth:`set_phase`."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.01, nvml=None):
        self.source, self.note = open_source(device, nvml)
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.phase = "start"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()
        try:
            self.device_info = self.source.info()  # GPU name, driver, total memory (empty for RSS)
        except Exception as e:  # an NVML query failing must not cost the measurement
            self.device_info = {"gpu_info_error": str(e)}

    @property
    def memory_source(self) -> str:
        return self.source.name

    def sample(self) -> Sample:
        primary, device, process = self.source.read()
        s = Sample(time.perf_counter() - self._t0, self.phase, primary, device, process)
        with self._lock:
            self.samples.append(s)
        return s

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "MemorySampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        self.source.close()

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- results ------------------------------------------------------------------------------------------
    def _peak(self, phases: tuple[str, ...], attr: str = "primary_bytes") -> int | None:
        vals = [getattr(s, attr) for s in self.samples if s.phase in phases and getattr(s, attr) is not None]
        return max(vals) if vals else None

    def _idle(self, attr: str = "primary_bytes") -> int | None:
        vals = [getattr(s, attr) for s in self.samples if s.phase == "idle" and getattr(s, attr) is not None]
        return int(median(vals)) if vals else None

    def summary(self) -> dict:
        """Idle-after-load (median over the idle window before the first request), peaks during the image prefill
        (vision encode included) and during decode, for the primary reading and for both NVML readings."""
        out = {
            "memory_source": self.memory_source,
            "memory_source_note": self.note,
            "idle_memory_bytes": self._idle(),
            "peak_memory_bytes": self._peak(REQUEST_PHASES),
            "vision_peak_bytes": self._peak(("vision",)),
            "prefill_peak_bytes": self._peak(("vision", "prefill")),
            "decode_peak_bytes": self._peak(("decode",)),
            "load_peak_bytes": self._peak(("load",)),
            "memory_samples": len(self.samples),
            "sample_interval_s": self.interval_s,
        }
        if self.memory_source == "nvml":
            out["device_used_idle_bytes"] = self._idle("device_used_bytes")
            out["device_used_peak_bytes"] = self._peak(REQUEST_PHASES, "device_used_bytes")
            out["process_used_idle_bytes"] = self._idle("process_used_bytes")
            out["process_used_peak_bytes"] = self._peak(REQUEST_PHASES, "process_used_bytes")
        return out
