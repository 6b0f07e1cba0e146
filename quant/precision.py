"""Precision specs: which numeric format each part of GLM-4V-9B runs in, and how to describe that to a user.

A :class:`PrecisionSpec` is the one settings object for precision. It is built from user words
(``precision="nf4", vision_precision="bf16"``), resolved against the device (bf16 → fp16 on GPUs without bf16),
turned into a ``BitsAndBytesConfig`` for loading, and described back as plain JSON for ``/v1/models``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from . import PRECISIONS

log = logging.getLogger(__name__)

FLOAT_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT_PRECISIONS = {"int8": 8, "nf4": 4, "fp4": 4}
assert tuple(FLOAT_PRECISIONS) + tuple(QUANT_PRECISIONS) == PRECISIONS
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

LM_HEAD = "transformer.output_layer"
VISION = "transformer.vision"


def precision_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → "bf16": the short name the flags and the estimator use (the inverse of FLOAT_PRECISIONS)."""
    return {d: n for n, d in FLOAT_PRECISIONS.items()}[dtype]


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    dt = getattr(torch, name, None)
    if dt not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r} (use bf16, fp16 or fp32)")
    return dt


def check_precision(name: str, what: str = "precision") -> str:
    if name not in PRECISIONS:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(PRECISIONS)}")
    return name


def device_supports_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True  # CPU: supported everywhere by torch (fast with AVX512-BF16/AMX, emulated otherwise)


@dataclass(frozen=True)
class PrecisionSpec:
    """Numeric formats of one loaded model.

    precision         the language model's Linear layers (bf16, fp16, fp32, int8, nf4, fp4)
    vision_precision  the vision tower's and projector's Linear layers (same choices; default = precision)
    compute_dtype     dtype of activations and of every non-quantized tensor (embeddings, norms, LM head, convs)
    double_quant      4-bit only: quantize the absmax statistics too (~0.37 bit/param saved)
    int8_threshold    LLM.int8 outlier threshold
    quantize_lm_head  also quantize ``output_layer`` at ``precision`` (kept for callers; prefer ``lm_head_precision``)
    lm_head_precision ``output_layer`` (the largest single read of a decode step): None = 16-bit (compute dtype),
                      or any precision — ``int8``/``nf4`` save 0.6–0.9 GB on GLM-4V-9B, at a quality cost ``eval``
                      measures
    """

    precision: str = "bf16"
    vision_precision: str | None = None
    compute_dtype: torch.dtype | None = None
    double_quant: bool = True
    int8_threshold: float = 6.0
    quantize_lm_head: bool = False
    lm_head_precision: str | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        check_precision(self.precision)
        if self.quantize_lm_head and self.lm_head_precision is None:
            object.__setattr__(self, "lm_head_precision", self.precision)
        if self.lm_head_precision is not None:
            check_precision(self.lm_head_precision, "lm_head_precision")
        if self.vision_precision is None:
            object.__setattr__(self, "vision_precision", self.precision)
        check_precision(self.vision_precision, "vision_precision")
        object.__setattr__(self, "compute_dtype", parse_dtype(self.compute_dtype))

    # ---- derived facts ------------------------------------------------------------------------------------
    @staticmethod
    def is_quantized_name(p: str) -> bool:
        return p in QUANT_PRECISIONS

    @property
    def lm_quantized(self) -> bool:
        return self.precision in QUANT_PRECISIONS

    @property
    def vision_quantized(self) -> bool:
        return self.vision_precision in QUANT_PRECISIONS

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of non-quantized tensors and activations."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.precision in FLOAT_PRECISIONS:
            return FLOAT_PRECISIONS[self.precision]
        if self.vision_precision in FLOAT_PRECISIONS:
            return FLOAT_PRECISIONS[self.vision_precision]
        return torch.bfloat16

    def vision_dtype(self) -> torch.dtype:
        return FLOAT_PRECISIONS.get(self.vision_precision, self.dtype)

    @property
    def head_quantized(self) -> bool:
        return self.lm_head_precision in QUANT_PRECISIONS

    def head_dtype(self) -> torch.dtype:
        """The LM head's float dtype when it is not quantized (the compute dtype unless asked otherwise)."""
        return FLOAT_PRECISIONS.get(self.lm_head_precision, self.dtype)

    def skipped_modules(self) -> list[str]:
        """Linear layers left unquantized by the language-model quantization pass."""
        skip = [] if self.lm_head_precision == self.precision and self.lm_quantized else [LM_HEAD]
        if self.vision_precision != self.precision:
            skip.append(VISION)
        return skip

    def resolve(self, device: torch.device | str) -> "PrecisionSpec":
        """Adapt to the device: bf16 becomes fp16 (with a logged reason) on GPUs without bf16 support."""
        if device_supports_bf16(device):
            return self
        notes = list(self.notes)

        def swap(p):
            return "fp16" if p == "bf16" else p

        new = replace(
            self,
            precision=swap(self.precision),
            vision_precision=swap(self.vision_precision),
            lm_head_precision=swap(self.lm_head_precision),
            compute_dtype=torch.float16 if self.dtype == torch.bfloat16 else self.compute_dtype,
        )
        if new != self:
            msg = f"{torch.cuda.get_device_name(torch.device(device))} has no bf16 support: using fp16 instead of bf16"
            log.warning(msg)
            notes.append(msg)
            new = replace(new, notes=tuple(notes))
        return new

    # ---- loading ------------------------------------------------------------------------------------------
    def bnb_config(self, for_precision: str | None = None, skip: list[str] | None = None, cpu_offload: bool = False):
        """The ``BitsAndBytesConfig`` that quantizes ``for_precision`` (default: the LM's), or None for floats.
        ``cpu_offload``: some modules are placed in host memory (left unquantized; transformers requires the flag)."""
        from transformers import BitsAndBytesConfig

        p = for_precision or self.precision
        if p not in QUANT_PRECISIONS:
            return None
        skip = self.skipped_modules() if skip is None else skip
        if p == "int8":
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=self.int8_threshold,
                llm_int8_skip_modules=skip,
                llm_int8_enable_fp32_cpu_offload=cpu_offload,
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=p,
            bnb_4bit_compute_dtype=self.dtype,
            bnb_4bit_use_double_quant=self.double_quant,
            llm_int8_skip_modules=skip,
            llm_int8_enable_fp32_cpu_offload=cpu_offload,
        )

    # ---- reporting ----------------------------------------------------------------------------------------
    def _part(self, p: str) -> dict:
        if p in FLOAT_PRECISIONS:
            return {
                "method": "none",
                "bits": torch.finfo(FLOAT_PRECISIONS[p]).bits,
                "dtype": DTYPE_NAMES[FLOAT_PRECISIONS[p]],
            }
        d = {"method": "bitsandbytes", "bits": QUANT_PRECISIONS[p], "quant_type": "llm_int8" if p == "int8" else p}
        d["compute_dtype"] = DTYPE_NAMES[self.dtype]
        if p == "int8":
            d["outlier_threshold"] = self.int8_threshold
        else:
            d["double_quant"] = self.double_quant
            d["blocksize"] = 64
        return d

    def describe(self) -> dict:
        """Plain-JSON description (what ``/v1/models`` reports)."""
        lm = self._part(self.precision)
        return {
            "precision": self.precision,
            "vision_precision": self.vision_precision,
            "dtype": DTYPE_NAMES[self.dtype],
            "quantization": {
                **lm,
                "skipped_modules": self.skipped_modules() if self.lm_quantized else [],
                "vision": self._part(self.vision_precision),
                "lm_head": self._part(self.lm_head_precision or precision_name(self.head_dtype())),
            },
            "notes": list(self.notes),
        }

    def label(self) -> str:
        label = (
            self.precision
            if self.vision_precision == self.precision
            else f"{self.precision}+vision-{self.vision_precision}"
        )
        if self.lm_head_precision is not None and self.lm_head_precision != precision_name(self.dtype):
            label += f"+head-{self.lm_head_precision}"
        return label
