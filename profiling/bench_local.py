"""``bench-serve`` without ``--base-url``: this project's three ways of generating, side by side in one run.

1. the plain decode loop (``glm4v.generate``), one request after another — the single-stream baseline;
2. the batching engine in-process (``server.engine``), at each concurrency level;
3. the same engine behind the HTTP server, measured by the HTTP client of ``bench_serve``.

The same model object, prompts, images and sampling parameters serve all three, so the ratios isolate the engine
(2 vs 1), batching (2 at c vs 2 at 1) and the HTTP/SSE overhead (3 vs 2).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .bench_serve import benchmark_http, build_bodies, fmt_ms, level_summary, markdown, RequestResult

log = logging.getLogger(__name__)


def _in_fresh_thread(fn, *args):
    """Run ``fn`` on a thread that ends with it. The main thread stays free of torch's OpenMP team, so each
    measured path runs like the server's engine thread does: the only busy team in the process."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _prompt_inputs(lm, body: dict):
    """An OpenAI request body built by bench_serve → (prompt ids, pixels) exactly as the server would see them."""
    from glm4v import Message, build_prompt

    parts = body["messages"][0]["content"]
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    image = next((p["image_url"]["url"] for p in parts if p["type"] == "image_url"), None)
    pixels = None
    if image is not None:
        pixels = lm.image_processor(base64.b64decode(image.split(",", 1)[1]))
    ids = build_prompt(lm.tokenizer, [Message("user", text, has_image=pixels is not None)]).ids
    return ids, pixels


def _params(args):
    from glm4v import SamplingParams

    return SamplingParams(max_new_tokens=args.max_tokens, temperature=0, ignore_eos=True)


def bench_plain(lm, inputs, args) -> dict:
    from glm4v.generate import generate

    results = []
    t0 = time.perf_counter()
    for ids, px in inputs:
        start = time.perf_counter()
        first, times = None, []
        for step in generate(lm.model, lm.tokenizer, ids, px, _params(args)):
            now = time.perf_counter()
            first = first or now
            times.append(now)
        results.append(RequestResult(True, ttft_s=first - start, e2e_s=times[-1] - start, output_tokens=len(times),
                                     itl_s=[b - a for a, b in zip(times, times[1:])]))
    return level_summary(1, results, time.perf_counter() - t0)


def bench_engine(engine, inputs, args, concurrency: int) -> dict:
    from server.engine import GenerationRequest

    def one(item):
        ids, px = item
        start = time.perf_counter()
        h = engine.submit(GenerationRequest(ids, _params(args), px))
        times = []
        for ev in h:
            if ev.kind == "delta":
                times.append(time.perf_counter())
            elif ev.kind == "error":
                return RequestResult(False, error=str(ev.error))
        return RequestResult(True, ttft_s=times[0] - start, e2e_s=times[-1] - start,
                             output_tokens=h.completion_tokens, prompt_tokens=h.prompt_tokens,
                             itl_s=[b - a for a, b in zip(times, times[1:])])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, inputs))
    return level_summary(concurrency, results, time.perf_counter() - t0)


def _serve_in_thread(lm, engine_kwargs):
    """Start this project's server on a free loopback port around an already loaded model."""
    import socket

    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(host="127.0.0.1", port=port, **engine_kwargs)
    app = create_app(settings, loaded=lm)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def benchmark_local(args, meta: dict) -> dict:
    import quant
    from glm4v_edge.loading import resolve_model_dir
    from server.engine import Engine

    model_dir, demo = resolve_model_dir(args.model, log)
    lm = _in_fresh_thread(lambda: quant.load(model_dir, precision=args.precision, device=args.device))
    meta.update({"model": model_dir + (" (demo)" if demo else ""), "precision": lm.spec.label(),
                 "device": str(lm.device)})
    bodies = build_bodies(args, args.requests, offset=0)
    inputs = [_prompt_inputs(lm, b) for b in bodies]

    _in_fresh_thread(bench_plain, lm, inputs[:1], args)  # warm-up
    plain = _in_fresh_thread(bench_plain, lm, inputs, args)
    print(f"plain decode loop: {plain['output_tokens_per_s']:.1f} out tok/s", flush=True)

    engine_levels = []
    engine = Engine(lm.model, lm.tokenizer, max_batch_size=max(args.max_batch_size, max(args.concurrency)))
    engine.start()
    try:
        bench_engine(engine, inputs[:1], args, 1)  # warm-up
        for c in args.concurrency:
            engine_levels.append(bench_engine(engine, inputs, args, c))
            print(f"engine c={c}: {engine_levels[-1]['output_tokens_per_s']:.1f} out tok/s", flush=True)
    finally:
        engine.shutdown(timeout=5)

    logging.getLogger("server").setLevel(logging.WARNING)  # per-request log lines
    server, thread, url = _serve_in_thread(lm, {"max_batch_size": max(args.max_batch_size, max(args.concurrency))})
    try:
        http_levels = benchmark_http(args, url)
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    rows = ["| path | concurrency | out tok/s | TTFT p50 | TPOT p50 | ratio |", "|---|---|---|---|---|---|"]
    rows.append(f"| plain decode loop | 1 | {plain['output_tokens_per_s']:.1f} | {fmt_ms(plain['ttft_s']['p50'])} | "
                f"{fmt_ms(plain['tpot_s']['p50'])} | 1.00× (baseline) |")
    base_engine = engine_levels[0]["output_tokens_per_s"]
    for s in engine_levels:
        rows.append(f"| engine in-process | {s['concurrency']} | {s['output_tokens_per_s']:.1f} | "
                    f"{fmt_ms(s['ttft_s']['p50'])} | {fmt_ms(s['tpot_s']['p50'])} | "
                    f"{s['output_tokens_per_s'] / plain['output_tokens_per_s']:.2f}× plain, "
                    f"{s['output_tokens_per_s'] / base_engine:.2f}× engine c=1 |")
    for s, e in zip(http_levels, engine_levels):
        rows.append(f"| engine over HTTP (SSE) | {s['concurrency']} | {s['output_tokens_per_s']:.1f} | "
                    f"{fmt_ms(s['ttft_s']['p50'])} | {fmt_ms(s['tpot_s']['p50'])} | "
                    f"{s['output_tokens_per_s'] / e['output_tokens_per_s']:.2f}× in-process |")
    md = markdown(http_levels, "bench-serve (this project, one machine)", meta)
    md += "\n## Side by side\n\n" + "\n".join(rows) + "\n"
    return {"meta": meta, "plain": plain, "engine": engine_levels, "http": http_levels, "markdown": md}
