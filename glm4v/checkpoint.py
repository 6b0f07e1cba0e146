"""Checks a checkpoint folder before any weight is read, with errors that name what is wrong.

Reads only ``config.json`` and the safetensors headers, so a bad 28 GB folder fails in milliseconds: missing files,
a folder of ``.bin`` pickles (refused — they can execute code when loaded), shards named in the index but absent,
and missing, unexpected or mis-shaped weights compared with the network the config describes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ChatGLMConfig

IGNORED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    pass


@dataclass
class CheckpointInfo:
    path: Path
    config: ChatGLMConfig
    weight_files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def num_parameters(self) -> int:
        n = 0
        for k, s in self.shapes.items():
            if k not in IGNORED_KEYS:
                p = 1
                for d in s:
                    p *= d
                n += p
        return n


def load_config(model_dir: str | Path) -> ChatGLMConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: is this a GLM-4V-9B checkpoint folder?")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if raw.get("model_type") != "chatglm":
        raise CheckpointError(
            f"{cfg_path}: model_type is {raw.get('model_type')!r}, expected 'chatglm' (THUDM/glm-4v-9b). "
            "GLM-4.1V and later ('glm4v') are different models."
        )
    if "vision_config" not in raw:
        raise CheckpointError(f"{cfg_path} has no vision_config: this is a text-only ChatGLM/GLM-4, not GLM-4V")
    config = ChatGLMConfig.from_pretrained(str(model_dir))
    try:
        config.validate_for_model()
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return config


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir} is missing shard(s) named in {INDEX_NAME}: {', '.join(missing)}")
        return [model_dir / n for n in names]
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only PyTorch pickle weights "
            f"({', '.join(pickles[:3])}{'…' if len(pickles) > 3 else ''}). "
            "Pickles can run arbitrary code when loaded, so glm4v-edge reads safetensors only; download the "
            "safetensors files of THUDM/glm-4v-9b (or convert the pickles in a trusted environment)."
        )
    raise CheckpointError(f"{model_dir} has no {SINGLE_NAME} and no {INDEX_NAME}")


def expected_shapes(config: ChatGLMConfig) -> dict[str, tuple[int, ...]]:
    """Every weight name and shape the network needs, from a model built on the meta device (no memory)."""
    from .modeling import ChatGLMForConditionalGeneration

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def inspect_checkpoint(model_dir: str | Path, check_keys: bool = True) -> CheckpointInfo:
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    files = weight_files(model_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    shapes[k] = tuple(sl.get_shape())
                    dtypes[k] = sl.get_dtype()
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    info = CheckpointInfo(model_dir, config, files, shapes, dtypes)
    if check_keys:
        check_against_config(info)
    return info


def check_against_config(info: CheckpointInfo) -> None:
    want = expected_shapes(info.config)
    have = {k: v for k, v in info.shapes.items() if k not in IGNORED_KEYS}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    problems = []

    def listing(keys, fmt=str):
        shown = ", ".join(fmt(k) for k in keys[:8])
        return shown + (f" … and {len(keys) - 8} more" if len(keys) > 8 else "")

    if missing:
        problems.append(f"missing weights: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {listing(unexpected)}")
    if mismatched:
        problems.append(
            "wrong shapes: " + listing(mismatched, lambda k: f"{k} {list(have[k])} (config needs {list(want[k])})")
        )
    if problems:
        raise CheckpointError(f"{info.path} does not match its config.json: " + "; ".join(problems))
