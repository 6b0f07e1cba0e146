"""Load-test any OpenAI-compatible server, like ``vllm bench serve``: TTFT, TPOT, ITL, end-to-end latency,
request and output-token throughput, at several concurrency levels.

    glm4v-edge bench-serve --base-url http://127.0.0.1:8000 --concurrency 1,4,8 --requests 32 \\
        --synthetic-images --prompt-tokens 256 --max-tokens 128 --out bench/

Each level sends ``--requests`` streaming chat completions with at most ``concurrency`` in flight (all queued at
once, as vLLM's ``--max-concurrency`` with an infinite request rate). Times come from the client's clock:
TTFT = first content chunk − send; ITL = gaps between content chunks; TPOT = (e2e − TTFT) / (output tokens − 1).
Output tokens are the server's ``usage.completion_tokens`` when it reports usage (``stream_options.include_usage``),
else the number of content chunks. Synthetic images are random noise, different for every request, so a server
cannot cache them. Works against ours, vLLM, Xinference, llama.cpp or anything else speaking the API.

``--base-url`` may be given with or without ``/v1``. Without it, it benchmarks this project on one machine, side
by side in one run: the plain decode loop, the in-process batching engine, and the same engine behind HTTP
(``--model DIR`` or the demo checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..cli_args import add_low_vram, comma_list
from .http_load import benchmark_http
from .results import markdown


def add_arguments(p) -> None:
    p.add_argument(
        "--base-url",
        help="server to test, e.g. http://127.0.0.1:8000; omit to benchmark this project "
        "in-process and over HTTP side by side",
    )
    p.add_argument("--api-key", help="Bearer key for the server")
    p.add_argument("--model-name", help="model id to request (default: the first of /v1/models)")
    p.add_argument("--concurrency", default="1,4,8", help="comma list of max in-flight requests (default 1,4,8)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default 16)")
    img = p.add_mutually_exclusive_group()
    img.add_argument("--image", help="send this image file with every request")
    img.add_argument("--synthetic-images", action="store_true", help="a different random-noise image per request")
    p.add_argument("--image-side", type=int, default=512, help="side of synthetic images in pixels (default 512)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length in words (default 128)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        help="every request asks for JSON valid against this JSON Schema (response_format json_schema): the cost of "
        "constrained decoding (without --base-url: the engine and HTTP rows; the plain loop stays unconstrained)",
    )
    p.add_argument(
        "--turns",
        type=int,
        default=1,
        help="> 1: multi-turn mode — --requests conversations of this many turns about one image each, the history "
        "resent every turn; reports TTFT per turn (without --base-url: the server process only)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--model", help="(without --base-url) checkpoint folder; default the tiny demo checkpoint")
    p.add_argument(
        "--synthetic",
        help="(without --base-url) random weights of this architecture instead of a "
        "checkpoint: full (the real 13.9B, on a GPU), mid, tiny or a config.json",
    )
    p.add_argument("--precision", default="bf16", help="(without --base-url) precision to load (default bf16)")
    p.add_argument("--device", help="(without --base-url) cpu or cuda")
    add_low_vram(p, "(without --base-url) ")
    p.add_argument("--max-batch-size", type=int, default=8, help="(without --base-url) engine batch size")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="(without --base-url) prompt entries prefilled per engine step (default 512)",
    )
    p.add_argument(
        "--vision-layers-per-step",
        type=int,
        default=8,
        help="(without --base-url) ViT layers run per engine step (default 8)",
    )
    p.add_argument(
        "--prefix-cache", default="on", choices=("on", "off"), help="(without --base-url) serve's --prefix-cache"
    )
    p.add_argument("--image-cache-mb", type=float, default=256.0, help="(without --base-url) serve's --image-cache-mb")
    p.add_argument(
        "--compile",
        default="off",
        nargs="?",
        const="reduce-overhead",
        choices=("off", "reduce-overhead", "cudagraphs", "default"),
        help="(without --base-url) serve's --compile, for the engine and the server (GPU only)",
    )


def run(args) -> int:
    import logging
    import platform
    import sys

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would swamp the report

    try:
        args.concurrency = comma_list(args.concurrency, int)
    except ValueError:
        args.concurrency = []
    if not args.concurrency or min(args.concurrency) < 1:
        print("error: --concurrency needs positive integers, e.g. 1,4,8", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "glm4v-edge " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.turns < 1:
        print("error: --turns must be at least 1", file=sys.stderr)
        return 2
    if args.turns > 1:
        from .multi_turn import benchmark_multi_turn
        from .multi_turn import markdown as turns_markdown

        if args.base_url:
            levels = benchmark_multi_turn(args, args.base_url)
            meta["base_url"] = args.base_url
        else:
            from .local import serve_for_bench

            with serve_for_bench(args, meta) as url:
                levels = benchmark_multi_turn(args, url)
        (out / "results.json").write_text(json.dumps(levels, indent=2) + "\n")
        (out / "results.md").write_text(turns_markdown(levels, meta))
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
        return 0
    if args.base_url:
        levels = benchmark_http(args, args.base_url)
        meta["base_url"] = args.base_url
        (out / "results.json").write_text(json.dumps(levels, indent=2) + "\n")
        (out / "results.md").write_text(markdown(levels, "bench-serve", meta))
    else:
        from .local import benchmark_local

        report = benchmark_local(args, meta)
        (out / "results.json").write_text(json.dumps(report["http"], indent=2) + "\n")
        (out / "local.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "results.md").write_text(report["markdown"])
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0
