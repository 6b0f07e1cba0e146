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

Without ``--base-url`` it benchmarks this project on one machine, side by side in one run: the plain decode loop,
the in-process batching engine, and the same engine behind HTTP (``--model DIR`` or the demo checkpoint).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

WORDS = ("the quick brown fox jumps over a lazy dog while red green blue shapes count five small words in one "
         "picture of edge devices").split()


def synthetic_prompt(n_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return "Describe this: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def synthetic_image_url(seed: int, size: int = 512) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_image_url(path: str) -> str:
    import mimetypes

    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def summarize(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    s = sorted(values)
    p99 = s[min(len(s) - 1, max(0, round(0.99 * (len(s) - 1))))]
    return {"mean": statistics.fmean(s), "p50": statistics.median(s), "p99": p99}


def level_summary(concurrency: int, results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "output_tokens": out_tokens,
        "prompt_tokens_mean": statistics.fmean([r.prompt_tokens for r in ok]) if ok else None,
        "output_tokens_per_s": out_tokens / duration_s if duration_s > 0 else 0.0,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "ttft_s": summarize([r.ttft_s for r in ok]),
        "tpot_s": summarize([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_s": summarize([x for r in ok for x in r.itl_s]),
        "e2e_s": summarize([r.e2e_s for r in ok]),
    }


async def one_request(client, url: str, headers: dict, body: dict) -> RequestResult:
    t0 = time.perf_counter()
    first = last = None
    itl, chunks, usage = [], 0, None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                return RequestResult(False, error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("usage"):
                    usage = msg["usage"]
                for ch in msg.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            itl.append(now - last)
                        last = now
                        chunks += 1
    except Exception as e:  # network errors count as failed requests, not as a crashed benchmark
        return RequestResult(False, error=f"{type(e).__name__}: {e}"[:200])
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, error="no content received")
    out = usage.get("completion_tokens", chunks) if usage else chunks
    return RequestResult(True, ttft_s=first - t0, e2e_s=end - t0, output_tokens=out,
                         prompt_tokens=(usage or {}).get("prompt_tokens", 0), itl_s=itl)


def build_bodies(args, n: int, offset: int) -> list[dict]:
    bodies = []
    for i in range(n):
        seed = offset + i
        content = [{"type": "text", "text": synthetic_prompt(args.prompt_tokens, seed)}]
        if args.image:
            content.append({"type": "image_url", "image_url": {"url": file_image_url(args.image)}})
        elif args.synthetic_images:
            content.append({"type": "image_url", "image_url": {"url": synthetic_image_url(seed, args.image_side)}})
        bodies.append({
            "model": args.model_name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # vLLM's extension, also ours: every request produces max_tokens
        })
    return bodies


async def run_level(base_url: str, api_key: str | None, concurrency: int, bodies: list[dict], timeout_s: float):
    import httpx

    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:

        async def guarded(body):
            async with sem:
                return await one_request(client, url, headers, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(b) for b in bodies))
        return list(results), time.perf_counter() - t0


async def resolve_model_name(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        r.raise_for_status()
        return r.json()["data"][0]["id"]


def benchmark_http(args, base_url: str) -> list[dict]:
    if not args.model_name:
        args.model_name = asyncio.run(resolve_model_name(base_url, args.api_key))
    out = []
    warm = build_bodies(args, min(2, args.requests), offset=10_000)
    asyncio.run(run_level(base_url, args.api_key, 1, warm, args.timeout))  # warm-up, not recorded
    for c in args.concurrency:
        bodies = build_bodies(args, args.requests, offset=1000 * c)
        results, dur = asyncio.run(run_level(base_url, args.api_key, c, bodies, args.timeout))
        out.append(level_summary(c, results, dur))
        s = out[-1]
        print(f"concurrency {c:>3}: {s['completed']}/{s['requests']} ok, {s['output_tokens_per_s']:.1f} out tok/s, "
              f"TTFT p50 {fmt_ms(s['ttft_s']['p50'])}, TPOT p50 {fmt_ms(s['tpot_s']['p50'])}", flush=True)
    return out


def fmt_ms(x) -> str:
    return "—" if x is None else f"{x * 1000:.1f} ms"


def markdown(levels: list[dict], title: str, meta: dict) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += ["", "| concurrency | requests | out tok/s | req/s | TTFT mean / p50 / p99 | TPOT mean / p50 / p99 | "
              "ITL p50 / p99 | e2e p50 / p99 |", "|---|---|---|---|---|---|---|---|"]
    for s in levels:
        t, p, i, e = s["ttft_s"], s["tpot_s"], s["itl_s"], s["e2e_s"]
        lines.append(
            f"| {s['concurrency']} | {s['completed']}/{s['requests']} | {s['output_tokens_per_s']:.1f} | "
            f"{s['request_throughput']:.2f} | {fmt_ms(t['mean'])} / {fmt_ms(t['p50'])} / {fmt_ms(t['p99'])} | "
            f"{fmt_ms(p['mean'])} / {fmt_ms(p['p50'])} / {fmt_ms(p['p99'])} | {fmt_ms(i['p50'])} / {fmt_ms(i['p99'])} | "
            f"{fmt_ms(e['p50'])} / {fmt_ms(e['p99'])} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(p) -> None:
    p.add_argument("--base-url", help="server to test, e.g. http://127.0.0.1:8000; omit to benchmark this project "
                                      "in-process and over HTTP side by side")
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
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--model", help="(without --base-url) checkpoint folder; default the tiny demo checkpoint")
    p.add_argument("--synthetic", help="(without --base-url) random weights of this architecture instead of a "
                                       "checkpoint: full (the real 13.9B, on a GPU), mid, tiny or a config.json")
    p.add_argument("--precision", default="bf16", help="(without --base-url) precision to load (default bf16)")
    p.add_argument("--device", help="(without --base-url) cpu or cuda")
    p.add_argument("--max-batch-size", type=int, default=8, help="(without --base-url) engine batch size")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="(without --base-url) prompt entries prefilled per engine step (default 512)")
    p.add_argument("--vision-layers-per-step", type=int, default=8,
                   help="(without --base-url) ViT layers run per engine step (default 8)")
    p.add_argument("--compile", default="off", nargs="?", const="reduce-overhead",
                   choices=("off", "reduce-overhead", "cudagraphs", "default"),
                   help="(without --base-url) serve's --compile, for the engine and the server (GPU only)")


def run(args) -> int:
    import logging
    import platform
    import sys

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would swamp the report

    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
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
    if args.base_url:
        levels = benchmark_http(args, args.base_url)
        meta["base_url"] = args.base_url
        (out / "results.json").write_text(json.dumps(levels, indent=2) + "\n")
        (out / "results.md").write_text(markdown(levels, "bench-serve", meta))
    else:
        from .bench_local import benchmark_local

        report = benchmark_local(args, meta)
        (out / "results.json").write_text(json.dumps(report["http"], indent=2) + "\n")
        (out / "local.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "results.md").write_text(report["markdown"])
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0
