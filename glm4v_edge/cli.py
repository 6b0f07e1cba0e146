"""``glm4v-edge``: one command, one subcommand per job.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up.
The modules are imported here plainly (the import-layer test sees every arrow); each keeps its heavy imports
(torch, transformers, FastAPI) inside ``run``, so ``glm4v-edge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from profiling import estimate_cli, eval_cli, gpu_check, profile_cli, report_cli
from profiling.bench import decode as bench_decode
from profiling.bench import grammar as bench_grammar
from profiling.bench import serve_cli as bench_serve

from . import __version__, chat, info, make_tiny, quantize, serve, serve_cluster

COMMANDS = {
    # name: (module, one-line help)
    "serve": (serve, "serve the OpenAI-compatible API (the built-in demo model when --model is not given)"),
    "serve-cluster": (serve_cluster, "the same API as replicas on Ray Serve: one per GPU, across machines ([cluster])"),
    "chat": (chat, "one-shot question about an image, streamed to the terminal"),
    "info": (info, "check a checkpoint folder and print what it holds"),
    "quantize": (quantize, "write a pre-quantized (int8/nf4/fp4) checkpoint that loads without re-quantizing"),
    "make-tiny": (make_tiny, "write a small random checkpoint in the official layout"),
    "estimate": (estimate_cli, "predict weights, KV cache, activations and total memory per precision"),
    "profile": (profile_cli, "measure VRAM and latency per precision, against the fp16 baseline"),
    "eval": (eval_cli, "measure quality per precision against a reference precision"),
    "report": (report_cli, "join profile and eval results into the memory-versus-quality table"),
    "bench-serve": (bench_serve, "load-test any OpenAI-compatible server: TTFT, TPOT, ITL, throughput"),
    "bench-decode": (bench_decode, "time the decode step alone: ordinary, fixed-shape and --compile"),
    "bench-grammar": (bench_grammar, "measure the structured-output grammar engines: mask time per step, compile time"),
    "gpu-check": (gpu_check, "every GPU claim measured in one budgeted run on a bare GPU box (docs/GPU.md)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="glm4v-edge",
        description="Quantized, low-VRAM, OpenAI-compatible server and tools for GLM-4V-9B.",
    )
    parser.add_argument("--version", action="version", version=f"glm4v-edge {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().split("\n\n")[0])
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        return 130
