"""Send a benchmark's requests to an OpenAI-compatible server at a fixed concurrency and time them on the client:
TTFT = first content chunk − send; ITL = gaps between content chunks; TPOT = (e2e − TTFT) / (output tokens − 1).
Output tokens are the server's ``usage.completion_tokens`` when it reports usage, else the content chunks."""

from __future__ import annotations

import asyncio
import json
import time

from .results import RequestResult, fmt_ms, level_summary
from .workload import build_bodies


def api_root(base_url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all mean the same server."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def one_request(client, url: str, headers: dict, body: dict) -> RequestResult:
    t0 = time.perf_counter()
    first = last = None
    itl, chunks, usage, parts = [], 0, None, []
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
                        parts.append(ch["delta"]["content"])
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
    return RequestResult(
        True,
        ttft_s=first - t0,
        e2e_s=end - t0,
        output_tokens=out,
        prompt_tokens=(usage or {}).get("prompt_tokens", 0),
        itl_s=itl,
        text="".join(parts),
    )


async def run_level(base_url: str, api_key: str | None, concurrency: int, bodies: list[dict], timeout_s: float):
    import httpx

    url = api_root(base_url) + "/v1/chat/completions"
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
        r = await client.get(api_root(base_url) + "/v1/models", headers=headers)
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
        print(
            f"concurrency {c:>3}: {s['completed']}/{s['requests']} ok, {s['output_tokens_per_s']:.1f} out tok/s, "
            f"TTFT p50 {fmt_ms(s['ttft_s']['p50'])}, TPOT p50 {fmt_ms(s['tpot_s']['p50'])}",
            flush=True,
        )
    return out
