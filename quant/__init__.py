"""Load GLM-4V-9B at a chosen precision (bf16/fp16/fp32, bitsandbytes int8/nf4/fp4), vision tower separately."""

import logging


class _QuietBitsandbytes(logging.Filter):
    """Drop two bitsandbytes messages that are noise here: the optional HF-Hub CPU kernel it cannot fetch (it falls
    back to its built-in kernel) and the int8 dtype-cast note it logs on *every* matmul with fp32/bf16 inputs."""

    NOISE = ("Failed to load CPU gemm_4bit_forward", "MatMul8bitLt: inputs will be cast")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
    logging.getLogger(_name).addFilter(_QuietBitsandbytes())

PRECISIONS = ("bf16", "fp16", "fp32", "int8", "nf4", "fp4")  # float formats, then bitsandbytes formats

_LAZY = {
    "LoadedModel": "loader",
    "default_device": "loader",
    "load": "loader",
    "weight_bytes": "memory",
    "PrecisionSpec": "precision",
    "LoadRequest": "request",
    "open_model": "request",
}


def __getattr__(name: str):
    # Lazy, so `glm4v-edge --help` and the estimator do not pay for importing transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRECISIONS",
    "LoadRequest",
    "LoadedModel",
    "PrecisionSpec",
    "default_device",
    "load",
    "open_model",
    "weight_bytes",
]
