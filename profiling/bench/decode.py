"""Time the engine's decode step alone — ordinary, fixed-shape, and compiled — to decide whether ``--compile`` pays.

    glm4v-edge bench-decode --synthetic full --precision nf4 --device cuda --batch 1,8 --context 1024 \\
        --modes off,reduce-overhead,cudagraphs --out bench-decode/

For each mode and batch size it fills ``batch`` cache rows to ``--context`` entries (their contents do not change
the time: the same bytes are read), runs ``--warmup`` steps, then times ``--steps`` decode steps the way the engine
runs them: one forward for the whole batch and the greedy tokens read back to the host each step (so GPU time is
fully counted). Modes: ``off`` = the ordinary step (attends over the filled entries); ``static`` = the fixed-shape
step uncompiled (attends over the whole row, masked); ``reduce-overhead`` / ``cudagraphs`` / ``default`` = that step
compiled as ``serve --compile MODE`` does (compile time reported separately). Unlike ``serve``, it runs every mode
on a CPU too, which is how ``--compile`` was found to be slower there. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..cli_args import add_low_vram, comma_list

log = logging.getLogger(__name__)

MODES = ("off", "static", "reduce-overhead", "cudagraphs", "default")


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint folder (default: --synthetic mid)")
    src.add_argument(
        "--synthetic", help="random weights of this architecture: full (the real 13.9B), mid, tiny or a config.json"
    )
    p.add_argument("--precision", default="bf16", help="precision to load (default bf16)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_low_vram(p)
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--context", type=int, default=1024, help="cache entries already filled per row (default 1024)")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="cache row length (default: --context + warm-up + steps + 1, rounded up to 256)",
    )
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per batch size (default 64)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--modes", default="off,static", help=f"comma list of {', '.join(MODES)} (default off,static)")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")


def time_mode(lm, mode: str, batches: list[int], context: int, max_len: int, steps: int, warmup: int) -> dict:
    import torch

    from engine.cuda_graphs import DecodeGraphs

    model, device = lm.model, lm.device
    cache = model.new_cache(max_len=max_len, max_batch=max(batches))
    compile_s, graphs = 0.0, None
    if mode != "off":
        graphs = DecodeGraphs(model, cache, None if mode == "static" else mode)
        compile_s = graphs.warmup()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    with torch.inference_mode():
        for b in batches:
            cache.reset()
            for r in range(b):
                cache.lengths[r] = cache.next_positions[r] = context
            tokens = [100 + r for r in range(b)]
            times = []
            for i in range(warmup + steps):
                sync()
                t0 = time.perf_counter()
                if graphs is not None:
                    logits = graphs.decode(tokens)
                else:
                    ids = torch.tensor(tokens, device=device)[:, None]
                    logits = model(ids, cache=cache, cache_row=0, logits_to_keep=1).logits[:, -1]
                tokens = logits.argmax(-1).tolist()  # the host read the engine does every step
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            step = sorted(times)[len(times) // 2]
            rows.append(
                {
                    "batch": b,
                    "step_ms_p50": step * 1e3,
                    "step_ms_mean": sum(times) / len(times) * 1e3,
                    "tokens_per_s": b / step,
                }
            )
            log.info("%s batch %d: %.2f ms/step, %.1f tok/s", mode, b, step * 1e3, b / step)
    del graphs, cache, logits
    if mode not in ("off", "static"):
        import gc

        torch._dynamo.reset()  # drops the compiled code and its CUDA graphs' memory pools before the next mode
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"mode": mode, "compile_s": compile_s, "batches": rows}


def markdown(results: list[dict], meta: dict) -> str:
    base = {r["batch"]: r["tokens_per_s"] for r in results[0]["batches"]}
    lines = [
        f"# bench-decode: {meta['model']} at {meta['precision']} on {meta['device_name']}",
        "",
        f"context {meta['context']} entries per row, {meta['steps']} timed steps, torch {meta['torch']}, "
        f"{meta['date']}",
        "",
        f"| mode | batch | ms/step (p50) | tok/s | vs {results[0]['mode']} | compile + warm-up |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["batches"]:
            lines.append(
                f"| {res['mode']} | {r['batch']} | {r['step_ms_p50']:.2f} | {r['tokens_per_s']:.1f} | "
                f"{r['tokens_per_s'] / base[r['batch']]:.2f}× | {res['compile_s']:.1f} s |"
            )
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import datetime
    import platform
    import sys

    import torch

    from quant.request import LoadRequest, open_model

    try:
        modes, batches = comma_list(args.modes), comma_list(args.batch, int)
    except ValueError:
        modes, batches = [], []
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        print(f"error: --modes takes {', '.join(MODES)}; got {args.modes!r}", file=sys.stderr)
        return 2
    if not batches or min(batches) < 1:
        print("error: --batch needs positive integers, e.g. 1,8", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0 or args.context < 0:
        print("error: --steps must be at least 1, --warmup and --context at least 0", file=sys.stderr)
        return 2
    max_len = args.max_model_len or -(-(args.context + args.warmup + args.steps + 1) // 256) * 256
    if args.context + args.warmup + args.steps >= max_len:
        print(f"error: --max-model-len {max_len} has no room for --context + --warmup + --steps", file=sys.stderr)
        return 2
    request = LoadRequest.from_args(args, synthetic=None if args.model else (args.synthetic or "mid"))
    lm, label = open_model(request), request.source_label()
    dev = lm.device
    meta = {
        "model": label,
        "precision": lm.spec.label(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
        "context": args.context,
        "max_model_len": max_len,
        "steps": args.steps,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "glm4v-edge bench-decode " + " ".join(sys.argv[2:]),
    }
    torch.set_grad_enabled(False)
    results = [time_mode(lm, m, batches, args.context, max_len, args.steps, args.warmup) for m in modes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = markdown(results, meta)
    (out / "results.md").write_text(md)
    print(md)
    return 0
