"""Pre-quantized checkpoints: ``glm4v-edge quantize`` writes them, :func:`quant.loader.load` reads them as they are.

A 12 GB card's user should not download 28 GB of bf16 and quantize it at every start. ``quantize`` loads the
checkpoint at an int8/nf4/fp4 precision and writes it back in the layout ``transformers`` + bitsandbytes use for
serialized bitsandbytes models: safetensors with the packed weights and their quantization state (``.absmax``,
``.quant_map``, ``.quant_state.bitsandbytes__nf4`` …, ``.SCB`` for int8), and ``config.json`` with its
``quantization_config`` — so the folder also loads with ``AutoModelForCausalLM.from_pretrained`` once ``glm4v`` is
imported (it registers the class; the ``auto_map`` to THUDM's remote code is not shipped) — plus the
tokenizer and generation files, and a ``glm4v_edge`` entry saying what it holds and where it came from.

What one ``quantization_config`` can say is what can be written: the language model at one bitsandbytes method, the
vision tower at that method or left in 16-bit, the LM head at that method or in 16-bit. Loading such a folder refuses
a requested precision that differs from what it holds, with a message saying what it holds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from glm4v.checkpoint import IGNORED_KEYS, CheckpointError, CheckpointInfo, expected_shapes

from .precision import LM_HEAD, QUANT_PRECISIONS, VISION, precision_name

# Tensors bitsandbytes serializes beside a quantized weight.
QUANT_STATE_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
    ".SCB",
    ".weight_format",
)
COPIED_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass(frozen=True)
class Held:
    """What a pre-quantized folder holds."""

    precision: str  # int8 | nf4 | fp4 (the language model's Linear layers)
    vision_precision: str  # the same, or the float dtype it was left in
    lm_head_precision: str  # the same, or the float dtype
    double_quant: bool
    float_dtype: str  # bf16 | fp16 | fp32: everything not quantized

    def label(self) -> str:
        parts = [self.precision]
        if self.vision_precision != self.precision:
            parts.append(f"vision {self.vision_precision}")
        if self.lm_head_precision != self.precision:
            parts.append(f"head {self.lm_head_precision}")
        return parts[0] + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


def held_quantization(model_dir: str | Path) -> Held | None:
    """The folder's pre-quantization (from ``config.json``'s ``quantization_config``), None for a float checkpoint."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # load_config reports it
    q = raw.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "bitsandbytes":
        raise CheckpointError(
            f"{path}: quantization_config uses {q.get('quant_method')!r}; glm4v-edge reads bitsandbytes "
            "(int8/nf4/fp4) pre-quantized checkpoints, or the bf16 original"
        )
    if q.get("load_in_8bit"):
        precision = "int8"
    elif q.get("load_in_4bit"):
        precision = q.get("bnb_4bit_quant_type", "fp4")
    else:
        raise CheckpointError(f"{path}: quantization_config loads neither 8-bit nor 4-bit")
    floats = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    float_dtype = floats.get(str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"), "bf16")
    skip = q.get("llm_int8_skip_modules")

    def skipped(module: str) -> bool:
        # transformers' rule: an entry skips every module whose name contains it; no list at all keeps the output
        # layer (its get_keys_to_not_convert) and quantizes the rest.
        if skip is None:
            return module == LM_HEAD
        return any(entry and entry in f"{module}." for entry in skip)

    return Held(
        precision=precision,
        vision_precision=float_dtype if skipped(VISION) else precision,
        lm_head_precision=float_dtype if skipped(LM_HEAD) else precision,
        double_quant=bool(q.get("bnb_4bit_use_double_quant", False)),
        float_dtype=float_dtype,
    )


def check_request(
    held: Held,
    model_dir,
    precision: str,
    vision_precision: str | None,
    lm_head_precision: str | None,
    offload,
    compute_dtype: str | None = None,
) -> None:
    """Refuse a load whose precisions differ from what the folder holds (re-quantizing packed weights is not
    possible), saying what it holds."""
    asked_vision = vision_precision or precision
    asked_head = lm_head_precision or held.float_dtype
    wrong = []
    if compute_dtype is not None and compute_dtype != held.float_dtype:
        wrong.append(f"--compute-dtype {compute_dtype} (its unquantized tensors are {held.float_dtype})")
    if precision != held.precision:
        wrong.append(f"--precision {precision}")
    if asked_vision != held.vision_precision:
        wrong.append(f"vision {asked_vision}")
    if asked_head != held.lm_head_precision:
        wrong.append(f"LM head {asked_head}")
    if wrong:
        flags = f"--precision {held.precision}"
        if held.vision_precision != held.precision:
            flags += f" --vision-precision {held.vision_precision}"
        if held.lm_head_precision != held.float_dtype:
            flags += f" --lm-head-precision {held.lm_head_precision}"
        raise CheckpointError(
            f"{model_dir} is a pre-quantized checkpoint holding {held.label()}, not {', '.join(wrong)}: "
            f"load it with {flags} (or --precision auto), or quantize the bf16 original for another precision"
        )
    if offload:
        raise CheckpointError(
            f"{model_dir} is pre-quantized: --offload needs the bf16 checkpoint (its parts are packed for streaming "
            "as they load)"
        )


def check_keys(info: CheckpointInfo) -> CheckpointInfo:
    """The key check of a pre-quantized folder: every weight the network needs is there, quantized weights carry
    their state, nothing else is; returns the info with the network's logical shapes (packed ones say nothing)."""
    want = expected_shapes(info.config)
    have = {k for k in info.shapes if k not in IGNORED_KEYS}
    missing = sorted(set(want) - have)
    unexpected = sorted(k for k in have - set(want) if not k.endswith(QUANT_STATE_SUFFIXES))
    if missing or unexpected:
        problems = [f"missing weights: {', '.join(missing[:8])}"] if missing else []
        problems += [f"unexpected weights: {', '.join(unexpected[:8])}"] if unexpected else []
        raise CheckpointError(f"{info.path} (pre-quantized) does not match its config.json: " + "; ".join(problems))
    dtypes = {k: v for k, v in info.dtypes.items() if k in want}
    return CheckpointInfo(info.path, info.config, info.weight_files, want, dtypes)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("glm4v-edge")
    except Exception:
        return "unknown"


def save_quantized(lm, out_dir: str | Path, source: str) -> dict:
    """Write ``lm`` (just loaded at a bitsandbytes precision, never run: bitsandbytes repacks 4-bit weights in place
    on a CPU's first forward) as a pre-quantized checkpoint in ``out_dir``; returns what was written."""
    spec = lm.spec
    if spec.precision not in QUANT_PRECISIONS:
        raise ValueError(f"quantize writes int8, nf4 or fp4 checkpoints, not {spec.precision}")
    if spec.vision_quantized and spec.vision_precision != spec.precision:
        raise ValueError(
            f"a pre-quantized checkpoint holds the vision tower at the language model's method ({spec.precision}) "
            f"or in 16-bit, not {spec.vision_precision} (one quantization_config describes the folder)"
        )
    if spec.head_quantized and spec.lm_head_precision != spec.precision:
        raise ValueError(f"the LM head can be {spec.precision} or 16-bit in a pre-quantized checkpoint")
    if not spec.vision_quantized and spec.vision_dtype() != spec.dtype:
        raise ValueError(
            f"a 16-bit vision tower is written in the compute dtype ({precision_name(spec.dtype)}): use "
            f"--vision-precision {precision_name(spec.dtype)} or --compute-dtype {spec.vision_precision}"
        )
    if lm.offload:
        raise ValueError("quantize without --offload: the whole model is written")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    lm.model.config.glm4v_edge = {
        "prequantized": spec.label(),
        "source": source,
        "quantized_by": f"glm4v-edge {_version()}",
    }
    lm.model.save_pretrained(str(out), safe_serialization=True, max_shard_size="4GB")
    for name in COPIED_FILES:
        src = Path(lm.model_dir) / name
        if src.is_file():
            shutil.copy2(src, out / name)
    files = sorted(p for p in out.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    return {
        "path": str(out),
        "files": [p.name for p in files],
        "weight_bytes_on_disk": sum(p.stat().st_size for p in weights),
        "held": held_quantization(out),
    }
