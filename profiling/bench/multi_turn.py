"""``bench-serve --turns T``: conversations as chat UIs hold them — one image in turn 1, then follow-up questions,
the whole history resent every turn — and the time to first token of each turn.

``--requests`` conversations, at most ``--concurrency`` at once, each ``--turns`` turns; every answer is
``--max-tokens`` long (``ignore_eos``) and goes back into the history as the assistant's message. The report gives
TTFT (mean / p50 / p99) and prompt tokens per turn, and each turn's TTFT p50 over turn 1's: with the server's caches
on (``--prefix-cache``, ``--image-cache-mb``), turn 2 prefills only the new question (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
import time

from .http_load import api_root, one_request
from .results import RequestResult, summarize
from .workload import file_image_url, synthetic_image_url, synthetic_prompt

FOLLOW_UPS = (
    "What colour is the largest area?",
    "Describe the texture in one sentence.",
    "Is there any text in it? Translate it into French.",
    "How many distinct shapes can you see?",
    "Summarise our conversation so far.",
)


def _body(args, messages: list[dict]) -> dict:
    return {
        "model": args.model_name,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def _first_message(args, seed: int) -> dict:
    content = [{"type": "text", "text": synthetic_prompt(args.prompt_tokens, seed)}]
    if args.image:
        content.append({"type": "image_url", "image_url": {"url": file_image_url(args.image)}})
    else:  # one image per conversation (synthetic unless --image): what the turns are about
        content.append({"type": "image_url", "image_url": {"url": synthetic_image_url(seed, args.image_side)}})
    return {"role": "user", "content": content}


async def _conversation(client, url, headers, args, seed: int) -> list[RequestResult]:
    messages, results = [_first_message(args, seed)], []
    for turn in range(args.turns):
        r = await one_request(client, url, headers, _body(args, messages))
        results.append(r)
        if not r.ok:
            break
        messages.append({"role": "assistant", "content": r.text})
        messages.append({"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]})
    return results


async def run_conversations(args, base_url: str, concurrency: int, offset: int):
    import httpx

    url = api_root(base_url) + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:

        async def guarded(seed):
            async with sem:
                return await _conversation(client, url, headers, args, seed)

        t0 = time.perf_counter()
        convs = await asyncio.gather(*(guarded(offset + i) for i in range(args.requests)))
        return convs, time.perf_counter() - t0


def turn_summary(convs: list[list[RequestResult]], turns: int) -> list[dict]:
    rows = []
    for t in range(turns):
        done = [c[t] for c in convs if len(c) > t]
        ok = [r for r in done if r.ok]
        rows.append(
            {
                "turn": t + 1,
                "requests": len(done),
                "completed": len(ok),
                "errors": sorted({r.error for r in done if not r.ok})[:3],
                "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
                "ttft_s": summarize([r.ttft_s for r in ok]),
                "e2e_s": summarize([r.e2e_s for r in ok]),
            }
        )
    base = rows[0]["ttft_s"]["p50"] if rows else None
    for row in rows:
        p50 = row["ttft_s"]["p50"]
        row["ttft_p50_over_turn1"] = p50 / base if base and p50 is not None else None
    return rows


def server_caches(base_url: str, api_key: str | None) -> dict | None:
    """This project's /v1/models ``caches`` (what the caches hold and how often they hit), None elsewhere."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        card = httpx.get(api_root(base_url) + "/v1/models", headers=headers, timeout=10).json()["data"][0]
    except Exception:
        return None
    return card.get("caches")


def benchmark_multi_turn(args, base_url: str) -> list[dict]:
    """One entry per concurrency level: ``{"concurrency", "conversations", "turns": [per-turn summary]}``."""
    from .http_load import resolve_model_name

    if not args.model_name:
        args.model_name = asyncio.run(resolve_model_name(base_url, args.api_key))
    out = []
    for c in args.concurrency:
        convs, dur = asyncio.run(run_conversations(args, base_url, c, offset=1000 * c))
        rows = turn_summary(convs, args.turns)
        level = {"concurrency": c, "conversations": args.requests, "duration_s": dur, "turns": rows}
        caches = server_caches(base_url, args.api_key)
        if caches is not None:
            level["server_caches"] = caches
        out.append(level)
        ratios = ", ".join(
            f"turn {r['turn']}: {r['ttft_s']['p50'] * 1e3:.1f} ms ({r['ttft_p50_over_turn1']:.2f}×)"
            for r in rows
            if r["ttft_s"]["p50"] is not None
        )
        print(f"concurrency {c:>3}: TTFT p50 {ratios}", flush=True)
    return out


def markdown(levels: list[dict], meta: dict) -> str:
    lines = ["# bench-serve --turns", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += [
        "",
        "| concurrency | turn | requests | prompt tokens | TTFT mean / p50 / p99 | TTFT p50 / turn 1 | e2e p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for lv in levels:
        caches = lv.get("server_caches")
        if caches:
            ic, pc = caches["image_cache"], caches["prefix_cache"]
            notes.append(
                f"after concurrency {lv['concurrency']}: image-feature cache {ic['bytes'] / 2**20:.1f} MiB in "
                f"{ic['entries']} entries (limit {ic['max_bytes'] / 2**20:.0f} MiB), {ic['hits']} hits; prefix "
                f"reuse {'on' if pc['enabled'] else 'off'}, {pc['hits']} hits, {pc['reused_tokens']} tokens not "
                f"prefilled, {pc['kept_rows']} rows kept (cumulative)"
            )
        for r in lv["turns"]:
            t = r["ttft_s"]
            ttft = "—" if t["p50"] is None else " / ".join(f"{t[k] * 1e3:.1f} ms" for k in ("mean", "p50", "p99"))
            ratio = "—" if r["ttft_p50_over_turn1"] is None else f"{r['ttft_p50_over_turn1']:.3f}×"
            prompt = "—" if r["prompt_tokens_mean"] is None else f"{r['prompt_tokens_mean']:.0f}"
            e2e = "—" if r["e2e_s"]["p50"] is None else f"{r['e2e_s']['p50'] * 1e3:.0f} ms"
            lines.append(
                f"| {lv['concurrency']} | {r['turn']} | {r['completed']}/{r['requests']} | {prompt} | {ttft} "
                f"| {ratio} | {e2e} |"
            )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
