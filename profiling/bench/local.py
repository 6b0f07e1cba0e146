"""``bench-serve`` without ``--base-url``: this project's three ways of generating, side by side in one run.

1. the plain decode loop (``glm4v.generate``), one request after another — the single-stream baseline;
2. the batching engine in-process (``engine``), at each concurrency level;
3. the same engine behind the HTTP server — ``glm4v-edge serve`` in its own process, as users run it — measured by
   the HTTP client of ``bench_serve``.

The same checkpoint, prompts, images (decoded and preprocessed inside every measured path) and sampling parameters
serve all three, so the ratios isolate the engine (2 vs 1), batching (2 at c vs 2 at 1) and the HTTP/SSE overhead
(3 vs 2).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .http_load import benchmark_http
from .results import RequestResult, fmt_ms, level_summary, markdown
from .workload import build_bodies, response_format

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
    """An OpenAI request body built by bench_serve → (prompt ids, image bytes or None), as the server receives them.

    The image is decoded and preprocessed inside each measured path (as the server does per request), so the
    in-process numbers include the same work as the HTTP ones.
    """
    from glm4v import Message, generation_prompt

    parts = body["messages"][0]["content"]
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    image = next((p["image_url"]["url"] for p in parts if p["type"] == "image_url"), None)
    data = base64.b64decode(image.split(",", 1)[1]) if image is not None else None
    ids = generation_prompt(lm.tokenizer, [Message("user", text, has_image=data is not None)]).ids
    return ids, data


def _pixels(lm, data):
    return None if data is None else lm.image_processor(data)


def _params(args):
    from glm4v import SamplingParams

    return SamplingParams(max_new_tokens=args.max_tokens, temperature=0, ignore_eos=True)


def bench_plain(lm, inputs, args) -> dict:
    from glm4v.generate import generate

    results = []
    t0 = time.perf_counter()
    for ids, data in inputs:
        start = time.perf_counter()
        first, times = None, []
        for _step in generate(lm.model, lm.tokenizer, ids, _pixels(lm, data), _params(args)):
            now = time.perf_counter()
            first = first or now
            times.append(now)
        results.append(
            RequestResult(
                True,
                ttft_s=first - start,
                e2e_s=times[-1] - start,
                output_tokens=len(times),
                itl_s=[b - a for a, b in zip(times, times[1:], strict=False)],
            )
        )
    return level_summary(1, results, time.perf_counter() - t0)


def bench_engine(lm, engine, inputs, args, concurrency: int) -> dict:
    from engine import GenerationRequest

    fmt = response_format(args)
    spec = None if fmt is None else {"type": "json_schema", "schema": fmt["json_schema"]["schema"]}

    def one(item):
        ids, data = item
        start = time.perf_counter()
        matcher = None if spec is None else engine.grammars.compile(spec).matcher()  # as the server's preparation
        h = engine.submit(GenerationRequest(ids, _params(args), _pixels(lm, data), matcher=matcher))
        times = []
        for ev in h:
            if ev.kind == "delta":
                times.append(time.perf_counter())
            elif ev.kind == "error":
                return RequestResult(False, error=str(ev.error))
        return RequestResult(
            True,
            ttft_s=times[0] - start,
            e2e_s=times[-1] - start,
            output_tokens=h.completion_tokens,
            prompt_tokens=h.prompt_tokens,
            itl_s=[b - a for a, b in zip(times, times[1:], strict=False)],
        )

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, inputs))
    return level_summary(concurrency, results, time.perf_counter() - t0)


def _serve_subprocess(model_dir: str, args, max_batch_size: int):
    """``glm4v-edge serve`` as its own process on a free loopback port, as users run it (no shared GIL)."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = ["--synthetic", args.synthetic] if args.synthetic else ["--model", model_dir]
    cmd = [
        sys.executable,
        "-m",
        "glm4v_edge",
        "--log-level",
        "WARNING",
        "serve",
        *source,
        "--precision",
        args.precision,
        *(["--offload", args.offload] if args.offload else []),
        *(["--lm-head-precision", args.lm_head_precision] if args.lm_head_precision else []),
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--prefill-chunk",
        str(args.prefill_chunk),
        "--vision-layers-per-step",
        str(args.vision_layers_per_step),
        "--compile",
        args.compile,
        "--prefix-cache",
        getattr(args, "prefix_cache", "on"),
        "--image-cache-mb",
        str(getattr(args, "image_cache_mb", 256.0)),
    ]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready in 300 s")


@contextlib.contextmanager
def serve_for_bench(args, meta: dict):
    """``glm4v-edge serve`` on the benchmark's model flags as its own process; yields its URL, stops it after."""
    from quant.request import LoadRequest

    request = LoadRequest.from_args(args)
    model_dir = None if args.synthetic else request.model_dir()
    meta.update({"model": request.source_label(), "precision": args.precision})
    proc, url = _serve_subprocess(model_dir, args, max(args.max_batch_size, max(args.concurrency)))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def benchmark_local(args, meta: dict) -> dict:
    from engine import Engine, compile_mode
    from quant.request import LoadRequest, open_model

    request = LoadRequest.from_args(args)
    lm = _in_fresh_thread(lambda: open_model(request))
    model_dir = None if args.synthetic else str(lm.model_dir)
    label = request.source_label() if not request.is_demo else f"{model_dir} (demo)"
    meta.update({"model": label, "precision": lm.spec.label(), "device": str(lm.device)})
    bodies = build_bodies(args, args.requests, offset=0)
    inputs = [_prompt_inputs(lm, b) for b in bodies]

    _in_fresh_thread(bench_plain, lm, inputs[:1], args)  # warm-up
    plain = _in_fresh_thread(bench_plain, lm, inputs, args)
    print(f"plain decode loop: {plain['output_tokens_per_s']:.1f} out tok/s", flush=True)

    engine_levels = []
    engine = Engine(
        lm.model,
        lm.tokenizer,
        max_batch_size=max(args.max_batch_size, max(args.concurrency)),
        prefill_chunk=args.prefill_chunk,
        vision_layers_per_step=args.vision_layers_per_step,
        decode_graphs=compile_mode(args.compile, lm.device),
    )
    engine.start()
    if engine.compile_status() is not None:
        meta["compile"] = engine.compile_status()
    try:
        bench_engine(lm, engine, inputs[:1], args, 1)  # warm-up
        for c in args.concurrency:
            engine_levels.append(bench_engine(lm, engine, inputs, args, c))
            print(f"engine c={c}: {engine_levels[-1]['output_tokens_per_s']:.1f} out tok/s", flush=True)
    finally:
        engine.shutdown(timeout=5)

    del engine, lm  # free the in-process model before the server process loads its own
    proc, url = _serve_subprocess(model_dir, args, max(args.max_batch_size, max(args.concurrency)))
    try:
        http_levels = benchmark_http(args, url)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    rows = ["| path | concurrency | out tok/s | TTFT p50 | TPOT p50 | ratio |", "|---|---|---|---|---|---|"]
    rows.append(
        f"| plain decode loop | 1 | {plain['output_tokens_per_s']:.1f} | {fmt_ms(plain['ttft_s']['p50'])} | "
        f"{fmt_ms(plain['tpot_s']['p50'])} | 1.00× (baseline) |"
    )
    base_engine = engine_levels[0]["output_tokens_per_s"]
    for s in engine_levels:
        rows.append(
            f"| engine in-process | {s['concurrency']} | {s['output_tokens_per_s']:.1f} | "
            f"{fmt_ms(s['ttft_s']['p50'])} | {fmt_ms(s['tpot_s']['p50'])} | "
            f"{s['output_tokens_per_s'] / plain['output_tokens_per_s']:.2f}× plain, "
            f"{s['output_tokens_per_s'] / base_engine:.2f}× engine c=1 |"
        )
    for s, e in zip(http_levels, engine_levels, strict=True):
        rows.append(
            f"| engine over HTTP (SSE) | {s['concurrency']} | {s['output_tokens_per_s']:.1f} | "
            f"{fmt_ms(s['ttft_s']['p50'])} | {fmt_ms(s['tpot_s']['p50'])} | "
            f"{s['output_tokens_per_s'] / e['output_tokens_per_s']:.2f}× in-process |"
        )
    md = markdown(http_levels, "bench-serve (this project, one machine)", meta)
    md += "\n## Side by side\n\n" + "\n".join(rows) + "\n"
    return {"meta": meta, "plain": plain, "engine": engine_levels, "http": http_levels, "markdown": md}
