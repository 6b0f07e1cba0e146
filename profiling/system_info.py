"""Where a number was measured: machine, GPU, driver, library versions and the exact command.

Every result row carries this, because a tokens/s figure without its GPU and bitsandbytes version cannot be
compared with anything. Nothing here imports torch or initialises CUDA: the ``profile`` parent process must not
create a CUDA context of its own, or its NVML readings would include it.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "bitsandbytes", "glm4v-edge")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_info(nvml=None, index: int = 0) -> dict:
    """Name, driver and memory of GPU ``index`` by NVML; ``{}`` when there is no GPU or no NVML."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception:  # ImportError, or pynvml.NVMLError when the library or the GPU is missing
        return {}
    try:
        from .memory_sampler import _nvml_handle, _text

        h = _nvml_handle(nvml, index)
        return {
            "gpu_name": _text(nvml.nvmlDeviceGetName(h)),
            "gpu_driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "gpu_memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).total),
            "gpu_count": int(nvml.nvmlDeviceGetCount()),
        }
    except Exception:
        return {}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def machine_info(nvml=None) -> dict:
    import psutil

    flags = cpu_flags()
    info = {
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "gpu_name": None,
        "gpu_driver": None,
    }
    for pkg in PACKAGES:
        info[pkg.replace("-", "_")] = package_version(pkg)
    info.update(gpu_info(nvml))
    return info


def current_command(args=None, argv: list[str] | None = None) -> str:
    """The command line as a user would retype it (``glm4v-edge profile ...``), shell-quoted.

    From ``sys.argv`` when this process was started as that command; when the command runs in-process (tests,
    notebooks calling ``glm4v_edge.cli.main([...])``) it is rebuilt from the parsed ``args`` instead.
    """
    argv = list(sys.argv if argv is None else argv)
    command = getattr(args, "command", None)
    if args is None or (command and command in argv[1:2]):
        return shlex.join(["glm4v-edge"] + argv[1:])
    words = ["glm4v-edge", command or ""]
    for name, value in vars(args).items():
        if name in ("command", "log_level") or value is None or value is False or value == [None]:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            for v in value if name == "task" else [",".join("same" if x is None else str(x) for x in value)]:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def device_total_bytes(device: str, nvml=None) -> int | None:
    """Memory the device offers in total: the GPU's (NVML) or the host's RAM for ``cpu``."""
    if str(device).startswith("cuda"):
        idx = int(str(device).partition(":")[2] or 0)
        return gpu_info(nvml, idx).get("gpu_memory_bytes")
    import psutil

    return psutil.virtual_memory().total


def guess_device(nvml=None) -> str:
    """``cuda`` when NVML sees a GPU and torch was built with CUDA, else ``cpu`` — without touching CUDA."""
    if not gpu_info(nvml):
        return "cpu"
    try:
        import torch

        return "cuda" if torch.version.cuda else "cpu"
    except ImportError:
        return "cpu"
