"""Command-line options that also read an environment variable (``--precision`` ↔ ``GLM4V_PRECISION``).

The flag wins over the variable, the variable over the default, and ``--help`` shows all three.
"""

from __future__ import annotations

import argparse
import os

ENV_PREFIX = "GLM4V_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def add(parser: argparse.ArgumentParser, flag: str, *, env: bool = True, default=None, type=str, help: str = "", **kw):
    """``parser.add_argument`` whose default comes from ``GLM4V_<FLAG>`` when that is set."""
    name = env_name(flag)
    if env and name in os.environ:
        raw = os.environ[name]
        if kw.get("action") == "store_true":
            default = parse_bool(raw)
        else:
            try:
                default = type(raw) if type is not None else raw
            except (TypeError, ValueError) as e:
                raise SystemExit(f"environment variable {name}={raw!r} is invalid: {e}") from None
            if "choices" in kw and default not in kw["choices"]:
                allowed = ", ".join(map(str, kw["choices"]))
                raise SystemExit(f"environment variable {name}={raw!r} is invalid: choose from {allowed}")
    shown = "" if default in (None, False, "") else f" (default: {default})"
    env_note = f" [env: {name}]" if env else ""
    if kw.get("action") == "store_true":
        parser.add_argument(flag, default=default, help=help + shown + env_note, **kw)
    else:
        parser.add_argument(flag, default=default, type=type, help=help + shown + env_note, **kw)


def add_model_arguments(parser: argparse.ArgumentParser, env: bool = True, precision_default: str = "auto") -> None:
    from quant import PRECISIONS  # no torch import: keeps --help fast

    add(
        parser,
        "--model",
        env=env,
        help="GLM-4V-9B checkpoint: a folder, a Hugging Face id (THUDM/glm-4v-9b[@revision]) or a ModelScope id "
        "(modelscope://ZhipuAI/glm-4v-9b; or a bare id with GLM4V_USE_MODELSCOPE=1); none = the built-in demo model",
    )
    add(
        parser,
        "--precision",
        env=env,
        default=precision_default,
        choices=("auto",) + PRECISIONS,
        help="language-model precision",
    )
    add(
        parser,
        "--vision-precision",
        env=env,
        choices=PRECISIONS,
        help="vision tower precision (default: same as --precision)",
    )
    add(
        parser,
        "--compute-dtype",
        env=env,
        choices=("bf16", "fp16", "fp32"),
        help="activation dtype for bitsandbytes layers (default bf16, fp16 on GPUs without bf16)",
    )
    add(
        parser,
        "--no-double-quant",
        env=env,
        action="store_true",
        help="4-bit: keep absmax statistics in fp32 instead of quantizing them",
    )
    add(
        parser,
        "--vision-size",
        env=env,
        type=int,
        help="vision resolution, a multiple of 28 from 224 to 1120 (default: the checkpoint's 1120)",
    )
    add(parser, "--device", env=env, help="cuda, cuda:1 or cpu (default: cuda when available)")
    add_low_vram_arguments(parser, env=env)


def add_low_vram_arguments(parser: argparse.ArgumentParser, env: bool = True) -> None:
    """``--offload`` and ``--lm-head-precision``: the 8 GB / 6 GB configurations (quant/offload.py)."""
    from quant import PRECISIONS

    add(
        parser,
        "--offload",
        env=env,
        help="parts kept in host memory: 'vision' (streamed to the GPU layer by layer per image), 'embeddings' "
        "(rows copied per step), both comma-separated, or 'none' (default: none; --precision auto may choose it "
        "when nothing else fits)",
    )
    add(
        parser,
        "--lm-head-precision",
        env=env,
        choices=PRECISIONS,
        help="LM head precision (default: 16-bit, the compute dtype); int8/nf4 save 0.6-0.9 GB on GLM-4V-9B",
    )
