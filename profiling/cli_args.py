"""Command-line flags shared by ``profile`` and ``eval``: where the model comes from, and the experiment grid.

Unlike ``glm4v_edge.options.add_model_arguments`` (one model, one precision), these take comma lists: each tool
runs a grid of configurations. No torch import here, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

from quant import PRECISIONS

from .matrix import comma_list, precision_list, size_list, vision_precision_list

__all__ = ["add_grid", "add_model_source", "comma_list"]


def add_model_source(p: argparse.ArgumentParser, synthetic: bool = True) -> None:
    p.add_argument("--model", help="GLM-4V-9B checkpoint folder (official layout)")
    if synthetic:
        p.add_argument(
            "--synthetic",
            metavar="NAME",
            help="random weights instead of a checkpoint, built straight on the device and quantized layer by "
            "layer: 'full' (the real 13.9B architecture; needs a GPU with room for the precision), 'mid', "
            "'tiny', or a config.json path",
        )


def add_grid(p: argparse.ArgumentParser, precision_default: str) -> None:
    p.add_argument(
        "--precision",
        type=precision_list,
        default=precision_list(precision_default),
        help=f"comma list of language-model precisions (default: {precision_default})",
    )
    p.add_argument(
        "--vision-precision",
        type=vision_precision_list,
        default=[None],
        help="comma list of vision-tower precisions, 'same' = as --precision (default: same)",
    )
    p.add_argument(
        "--vision-size",
        type=size_list,
        default=[None],
        help="comma list of vision resolutions, multiples of 28 up to the trained size "
        "(default: the checkpoint's, 1120 for GLM-4V-9B)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=("bf16", "fp16", "fp32"),
        help="activation dtype of bitsandbytes layers (default bf16)",
    )
    p.add_argument("--no-double-quant", action="store_true", help="4-bit: keep absmax statistics in fp32")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    add_low_vram(p)


def add_low_vram(p: argparse.ArgumentParser, what: str = "") -> None:
    """``--offload`` / ``--lm-head-precision`` (the 8 GB / 6 GB configurations), applied to every configuration."""
    p.add_argument(
        "--offload",
        help=f"{what}parts kept in host memory: vision (streamed per image), embeddings, both comma-separated, or none",
    )
    p.add_argument(
        "--lm-head-precision",
        choices=PRECISIONS,
        help=f"{what}LM head precision (default: 16-bit); eval shows its cost in KL / top-1",
    )


def model_config(args):
    """(config, source text) for ``--model`` or ``--synthetic``; raises ValueError naming the problem."""
    model, synthetic = args.model, getattr(args, "synthetic", None)
    if model and synthetic:
        raise ValueError("give --model DIR or --synthetic NAME, not both")
    if not model and not synthetic:
        raise ValueError("--model DIR is required" + (" (or --synthetic NAME)" if hasattr(args, "synthetic") else ""))
    if synthetic:
        from quant.synthetic import synthetic_config

        return synthetic_config(synthetic), f"synthetic:{synthetic}"
    from glm4v.checkpoint import load_config

    return load_config(model), model


def check_sizes(sizes: list[int | None], trained: int) -> None:
    from quant.loader import check_vision_size

    for n in sizes:
        if n is not None:
            check_vision_size(n, trained)
