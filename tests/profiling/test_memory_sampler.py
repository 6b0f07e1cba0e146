"""The memory sampler: graceful without NVML (this machine has none), exact against a scripted fake NVML."""

from __future__ import annotations

import os
import types

import pytest

from profiling.memory_sampler import MemorySampler, open_source
from profiling.system_info import gpu_info

MiB = 2**20


class FakeNvml(types.SimpleNamespace):
    """A stand-in for ``pynvml`` whose readings the test scripts: device-used and per-process lists."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def __init__(self, device_used=1000 * MiB, process_used=600 * MiB, pid=None, fail_init=False):
        super().__init__()
        self.device_used = device_used
        self.process_used = process_used
        self.pid = os.getpid() if pid is None else pid
        self.fail_init = fail_init
        self.calls = []

    def nvmlInit(self):
        self.calls.append("init")
        if self.fail_init:
            raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByIndex(self, i):
        self.calls.append(f"index:{i}")
        return ("handle", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append(f"uuid:{uuid}")
        return ("handle", uuid)

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=self.device_used, total=24 * 1024 * MiB, free=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [
            types.SimpleNamespace(pid=self.pid, usedGpuMemory=self.process_used),
            types.SimpleNamespace(pid=self.pid + 1, usedGpuMemory=123 * MiB),
        ]

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA GeForce RTX 4090"

    def nvmlSystemGetDriverVersion(self):
        return "560.35.03"


def _real_nvml_works() -> bool:
    return bool(gpu_info())


def test_no_nvml_records_host_rss_and_says_so():
    # On a machine without an NVIDIA driver the real pynvml raises NVMLError_LibraryNotFound at init.
    if _real_nvml_works():
        pytest.skip("this machine has a working NVML; the fake-NVML tests cover the fallback")
    s = MemorySampler("cuda", interval_s=0.005).start()
    s.set_phase("idle")
    s.set_phase("prefill")
    block = bytearray(200 * MiB)  # touched, so resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    s.sample()
    del block
    s.set_phase("decode")
    s.stop()
    out = s.summary()
    assert out["memory_source"] == "rss"
    assert "NVML" in out["memory_source_note"]
    assert out["prefill_peak_bytes"] - out["idle_memory_bytes"] >= 180 * MiB
    assert out["peak_memory_bytes"] == max(out["prefill_peak_bytes"], out["decode_peak_bytes"])
    assert "device_used_peak_bytes" not in out


def test_cpu_device_uses_rss_even_when_nvml_exists():
    fake = FakeNvml()
    source, note = open_source("cpu", nvml=fake)
    assert source.name == "rss" and "cpu" in note and fake.calls == []


def test_fake_nvml_phases_peaks_and_both_readings():
    fake = FakeNvml(device_used=1000 * MiB, process_used=600 * MiB)
    s = MemorySampler("cuda:0", interval_s=3600, nvml=fake).start()  # samples only at phase changes
    s.set_phase("idle")
    fake.device_used, fake.process_used = 1900 * MiB, 1500 * MiB
    s.set_phase("vision")
    fake.device_used, fake.process_used = 1700 * MiB, 1300 * MiB
    s.set_phase("prefill")
    fake.device_used, fake.process_used = 1200 * MiB, 800 * MiB
    s.on_event("first_token")  # → decode, through the hooks interface
    fake.device_used, fake.process_used = 2500 * MiB, 2100 * MiB  # after the request: neither idle nor a peak
    s.on_event("end")
    s.stop()
    out = s.summary()
    assert out["memory_source"] == "nvml"
    assert out["idle_memory_bytes"] == 600 * MiB
    assert out["vision_peak_bytes"] == 1500 * MiB
    assert out["prefill_peak_bytes"] == 1500 * MiB  # the vision encode is part of the image prefill
    assert out["decode_peak_bytes"] == 800 * MiB
    assert out["peak_memory_bytes"] == 1500 * MiB
    assert out["device_used_idle_bytes"] == 1000 * MiB and out["device_used_peak_bytes"] == 1900 * MiB
    assert out["process_used_peak_bytes"] == 1500 * MiB
    assert s.device_info == {
        "gpu_name": "NVIDIA GeForce RTX 4090",
        "gpu_driver": "560.35.03",
        "gpu_memory_bytes": 24 * 1024 * MiB,
    }
    assert fake.calls[0] == "init" and fake.calls[-1] == "shutdown"


def test_fake_nvml_without_our_pid_falls_back_to_device_used():
    fake = FakeNvml(pid=os.getpid() + 100)  # e.g. a container whose PID namespace hides the host PID
    s = MemorySampler("cuda", interval_s=3600, nvml=fake).start()
    s.set_phase("decode")
    s.stop()
    out = s.summary()
    assert out["peak_memory_bytes"] == 1000 * MiB and out["process_used_peak_bytes"] is None


def test_fake_nvml_init_failure_degrades_to_rss():
    fake = FakeNvml(fail_init=True)
    s = MemorySampler("cuda", nvml=fake).start()
    s.set_phase("prefill")
    s.stop()
    assert s.memory_source == "rss" and "NVML Shared Library Not Found" in s.note
    assert s.summary()["peak_memory_bytes"] > 0


def test_background_thread_samples_between_events():
    import time

    s = MemorySampler("cpu", interval_s=0.005).start()
    s.set_phase("decode")
    time.sleep(0.15)
    s.stop()
    assert sum(x.phase == "decode" for x in s.samples) >= 10


@pytest.mark.parametrize(
    "visible,device,expected",
    [
        ("2,3", "cuda:1", "index:3"),
        ("GPU-abc", "cuda:0", "uuid:GPU-abc"),
        ("", "cuda:1", "index:1"),
    ],
)
def test_cuda_visible_devices_maps_to_the_physical_gpu(monkeypatch, visible, device, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    fake = FakeNvml()
    source, _ = open_source(device, nvml=fake)
    source.close()
    assert expected in fake.calls


def test_gpu_info_is_empty_without_nvml_and_filled_with_it():
    if not _real_nvml_works():
        assert gpu_info() == {}
    info = gpu_info(FakeNvml())
    assert info["gpu_name"] == "NVIDIA GeForce RTX 4090" and info["gpu_count"] == 4
