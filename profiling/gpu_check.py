"""Turn every GPU claim into a measurement: one command a bare GPU box runs start to finish inside a time budget.

    python3 -m glm4v_edge gpu-check --out gpu-check                      # on the GPU box, from the source tree
    python3 -m glm4v_edge gpu-check --device cpu --synthetic tiny --out /tmp/gc   # the same script on a CPU

Runs under whatever interpreter starts it (the box's own torch and transformers): the Python packages it lacks
(bitsandbytes, FastAPI and theirs) are installed from the wheel files of ``make gpu-wheels`` into a scratch folder
put on ``PYTHONPATH``. Then, each in a fresh process and from random weights of the real architecture (``--synthetic
full``: nothing to download): the environment and the memory bandwidth; each configuration (load, memory after load
and after one 1120-px image + 1000-token prompt, vision encode, TTFT, decode tokens/s at batch 1 and 8 and the
fraction of the bandwidth that is), under a card's memory cap where the estimator says it fits that card; a short
HTTP leg (``serve`` + ``bench-serve``); the compiled decode step. Elapsed time is checked before each step; what
would not finish is recorded as skipped. results.jsonl, results.md and two PNG plots are rewritten after every
step, so a run cut short still leaves its data. Columns: docs/GPU.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the source tree: children import the project from here
GIB = 2**30
# name: (precision, vision precision, offload, LM head precision) — the configurations the README and docs claim.
CONFIGS = {
    "bf16": ("bf16", None, (), None),
    "int8": ("int8", None, (), None),
    "nf4": ("nf4", None, (), None),
    "nf4+vision-bf16": ("nf4", "bf16", (), None),
    "8gb": ("nf4", "bf16", ("vision", "embeddings"), None),
    "6gb": ("nf4", "nf4", ("vision", "embeddings"), "nf4"),
}
# int8 last: its synthetic build stages every layer on the host (bitsandbytes quantizes int8 on the way to a GPU).
DEFAULT_CONFIGS = "bf16,nf4,nf4+vision-bf16,8gb,6gb,int8"
# Modules the check needs that a foreign interpreter may lack, all provided by `make gpu-wheels`.
NEEDED = "bitsandbytes fastapi starlette uvicorn pydantic pydantic_core annotated_types typing_inspection opentelemetry"
# Seconds a step is guessed to take, before any was measured (a config step's guess is then replaced by the longest
# measured one, x1.2). GUESSES, not measurements: they only decide what to skip when the budget runs short.
GUESS_S = {
    "cuda": {"env": 30, "config": 60, "http": 120, "compile": 150},
    "cpu": {"env": 15, "config": 20, "http": 60, "compile": 30},
}


def add_arguments(p) -> None:
    p.add_argument("--out", default="gpu-check", help="results folder (default ./gpu-check)")
    p.add_argument("--logs", help="folder for the per-step logs and the HTTP leg's files (default OUT/logs)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when NVML sees a GPU)")
    p.add_argument("--synthetic", default="full", help="random-weight architecture: full (default), mid or tiny")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {', '.join(CONFIGS)} (order kept)")
    p.add_argument("--cards", default="6,8,12,16,24", help="card sizes in GiB to emulate (default 6,8,12,16,24)")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="text tokens beside the image (default 1000)")
    p.add_argument("--image-side", type=int, default=1120, help="side of the random test image (default 1120)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes (default 1,8)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per batch size (default 32)")
    p.add_argument("--compile-for", default="nf4", help="configurations whose decode step is also timed compiled")
    p.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        choices=("reduce-overhead", "cudagraphs", "default", "aot_eager"),
        help="serve --compile's mode (default reduce-overhead); aot_eager only traces, and is the one run on a CPU",
    )
    p.add_argument("--http-concurrency", default="1,8", help="bench-serve concurrency levels (default 1,8)")
    p.add_argument("--http-requests", type=int, default=8, help="requests per level (default 8)")
    p.add_argument("--http-max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    p.add_argument("--skip-http", action="store_true", help="leave out the serve + bench-serve leg")
    p.add_argument("--budget-s", type=float, default=480.0, help="time budget of the whole check (default 480 s)")
    p.add_argument("--bandwidth-mib", type=int, help="bytes copied to measure bandwidth (default 4096 GPU, 256 CPU)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheel folder of `make gpu-wheels` (default ./.whl)")
    p.add_argument("--target", help="scratch folder the wheels are installed into (default /tmp/glm4v-edge-site-pyXY)")


# ---- the wheels ------------------------------------------------------------------------------------------------
def missing_modules() -> list[str]:
    importlib.invalidate_caches()
    return [m for m in NEEDED.split() if importlib.util.find_spec(m) is None]


def _unzip(wheels: list[Path], target: Path) -> None:
    """A wheel is a zip of its import tree (pip's --target without pip): ``*.data/purelib|platlib`` go to the top."""
    import zipfile

    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                name = info.filename
                parts = name.split("/")
                if len(parts) > 2 and parts[0].endswith(".data"):
                    if parts[1] not in ("purelib", "platlib"):
                        continue
                    name = "/".join(parts[2:])
                if name.endswith("/"):
                    continue
                dest = target / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(info))


def ensure_wheels(wheels_dir: Path, target: Path) -> dict:
    """Install the wheels into ``target`` when a needed module is not importable, and put ``target`` first on
    ``sys.path`` and on the children's ``PYTHONPATH``. Returns what it did (for the environment row)."""
    missing = missing_modules()
    out = {"wheels_missing_before": missing, "wheels_target": None, "wheels_installed": []}
    if target.is_dir() and missing and any(target.iterdir()):
        sys.path.insert(0, str(target))  # installed by an earlier run of this interpreter
        missing_now = missing_modules()
        if not missing_now:
            out.update(wheels_target=str(target), wheels_note="already installed there")
            return out
        sys.path.remove(str(target))
    if not missing:
        out["wheels_note"] = "every needed module is importable: nothing installed"
        return out
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        out["wheels_note"] = f"missing {', '.join(missing)} and no wheels in {wheels_dir} (run `make gpu-wheels`)"
        return out
    t0 = time.perf_counter()
    target.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    pip += ["--upgrade", "--target", str(target), *map(str, wheels)]
    try:
        done = subprocess.run(pip, capture_output=True, text=True)
        error = (done.stderr or done.stdout or f"pip exited with {done.returncode}") if done.returncode else None
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    if error:
        out["wheels_pip_error"] = error[-600:]
        _unzip(wheels, target)
    sys.path.insert(0, str(target))
    out.update(
        wheels_target=str(target),
        wheels_installed=[w.name for w in wheels],
        wheels_install_s=time.perf_counter() - t0,
        wheels_missing_after=missing_modules(),
    )
    return out


def child_env(target: str | None) -> dict:
    env = dict(os.environ)
    paths = [p for p in (target, str(ROOT), env.get("PYTHONPATH")) if p]
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


# ---- steps -----------------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, total_s: float, device_type: str):
        self.t0, self.total_s = time.perf_counter(), total_s
        self.guess = dict(GUESS_S[device_type])
        self.taken: dict[str, list[float]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def need(self, kind: str, factor: float = 1.0) -> float:
        seen = self.taken.get(kind)
        return (max(seen) * 1.2 if seen else self.guess[kind]) * factor

    def refusal(self, kind: str, factor: float = 1.0) -> str | None:
        """None when the step fits, else why it is skipped."""
        need, left = self.need(kind, factor), self.left()
        if need <= left:
            return None
        return f"budget: {left:.0f} s left of {self.total_s:.0f}, the step needs ~{need:.0f} s"

    def took(self, kind: str, seconds: float) -> None:
        self.taken.setdefault(kind, []).append(seconds)


def run_step(spec, log_path: Path, env: dict, timeout_s: float, on_fields) -> tuple[str, str | None]:
    """One worker process; ``on_fields(dict)`` gets every partial and the final fields. (status, error)."""
    from dataclasses import asdict

    from .profile_worker import PROTOCOL_PREFIX

    cmd = [sys.executable, "-m", "profiling.gpu_check_worker", json.dumps(asdict(spec))]
    status, error = "error", "the worker exited without a result"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, bufsize=1)
        fired = threading.Event()
        watchdog = threading.Timer(max(timeout_s, 1.0), lambda: (fired.set(), proc.kill()))
        watchdog.start()
        try:
            for line in proc.stdout:
                if not line.startswith(PROTOCOL_PREFIX):
                    log.write(line)
                    continue
                msg = json.loads(line[len(PROTOCOL_PREFIX) :])
                if msg["event"] in ("partial", "result"):
                    on_fields(msg["fields"])
                    if msg["event"] == "result":
                        status, error = "ok", None
                elif msg["event"] == "error":
                    status, error = msg["status"], msg["error"]
            proc.wait()
        finally:
            watchdog.cancel()
    if status != "ok" and fired.is_set():
        status, error = "timeout", f"killed after {timeout_s:.0f} s (the budget's end)"
    elif status != "ok" and proc.returncode and proc.returncode < 0:
        error = f"killed by signal {-proc.returncode} (the kernel's OOM killer?)"
    return status, error


def card_claim(config, name: str, cards: list[float], entries: int) -> dict:
    """The smallest card (GiB) the estimator says this configuration fits, one image + prompt at batch 1."""
    from quant.estimate import estimate

    precision, vision, offload, head = CONFIGS[name]
    est = estimate(
        config,
        precision=precision,
        vision_precision=vision,
        offload=offload,
        lm_head_precision=head,
        context=entries,
        prompt_tokens=entries,
        batch=1,
        device="cuda",
    )
    fits = [c for c in sorted(cards) if est.total_bytes <= c * GIB]
    return {
        "label": est.label(),
        "flags": est.flags(),
        "estimated_total_bytes": est.total_bytes,
        "estimated_weights_bytes": est.weights_bytes,
        "claimed_card_gib": fits[0] if fits else None,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_http(args, device: str, env: dict, logs: Path, budget: Budget) -> list[dict]:
    """``serve --synthetic S --precision nf4`` on a free loopback port, ``bench-serve`` against it, then stop it."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    levels = [int(c) for c in args.http_concurrency.split(",") if c.strip()]
    serve = [sys.executable, "-m", "glm4v_edge", "--log-level", "WARNING", "serve", "--synthetic", args.synthetic]
    serve += ["--precision", "nf4", "--device", device, "--port", str(port), "--max-batch-size", str(max(levels))]
    rows = [{"kind": "http", "concurrency": c, "status": "error"} for c in levels]
    t0 = time.perf_counter()
    with open(logs / "serve.log", "w") as log:
        proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {proc.returncode} before /health answered (serve.log)")
                if budget.left() < 10:
                    raise TimeoutError("serve did not answer /health within the budget")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            ready_s = time.perf_counter() - t0
            bench = [sys.executable, "-m", "glm4v_edge", "--log-level", "WARNING", "bench-serve", "--base-url", url]
            bench += ["--concurrency", args.http_concurrency, "--requests", str(args.http_requests)]
            bench += ["--max-tokens", str(args.http_max_tokens), "--synthetic-images"]
            bench += ["--image-side", str(args.image_side), "--out", str(logs / "http")]
            with open(logs / "bench-serve.log", "w") as blog:
                subprocess.run(bench, stdout=blog, stderr=subprocess.STDOUT, env=env, timeout=max(budget.left(), 1))
            data = json.loads((logs / "http" / "results.json").read_text())
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    for row, level in zip(rows, data, strict=False):
        row.update(
            status="ok" if level["failed"] == 0 else "error",
            server_ready_s=ready_s,
            requests=level["requests"],
            completed=level["completed"],
            errors=level["errors"],
            output_tokens_per_s=level["output_tokens_per_s"],
            request_throughput=level["request_throughput"],
            **{f"{k}_p50": level[k]["p50"] for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s")},
            **{f"{k}_p99": level[k]["p99"] for k in ("ttft_s", "tpot_s", "e2e_s")},
        )
    return rows


def config_spec(name: str, common: dict, **kw):
    from .gpu_check_worker import StepSpec

    precision, vision, offload, head = CONFIGS[name]
    return StepSpec(
        name=name,
        precision=precision,
        vision_precision=vision,
        offload=list(offload),
        lm_head_precision=head,
        **common,
        **kw,
    )


def run(args) -> int:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /health poll would swamp the output
    started = time.time()
    target = Path(args.target or f"/tmp/glm4v-edge-site-py{sys.version_info[0]}{sys.version_info[1]}")
    wheels = ensure_wheels(Path(args.wheels), target)  # before anything imports what the wheels bring
    env = child_env(wheels["wheels_target"])

    from quant.synthetic import synthetic_config

    from .gpu_check_report import Results
    from .gpu_check_worker import StepSpec
    from .matrix import comma_list
    from .system_info import current_command, guess_device

    try:
        names = comma_list(args.configs, strict=True)
        bad = [n for n in names if n not in CONFIGS]
        if bad:
            raise ValueError(f"--configs takes {', '.join(CONFIGS)}; not {bad[0]!r}")
        batches, cards = comma_list(args.batches, int, strict=True), comma_list(args.cards, float, strict=True)
        levels = comma_list(args.http_concurrency, int, strict=True)
        if min(batches + levels) < 1 or min(args.decode_steps, args.prompt_tokens, args.http_requests) < 1:
            raise ValueError("batch sizes, concurrency levels, --decode-steps, --prompt-tokens and --http-requests > 0")
        compile_for = list(CONFIGS) if args.compile_for == "all" else comma_list(args.compile_for)
        config = synthetic_config(args.synthetic)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device or guess_device()
    kind = "cuda" if device.startswith("cuda") else "cpu"
    out = Path(args.out).resolve()
    logs = Path(args.logs).resolve() if args.logs else out / "logs"
    for d in (out, logs):
        d.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s, kind)
    results = Results(
        out,
        {
            "command": current_command(args),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "device": device,
            "synthetic": args.synthetic,
            "budget_s": args.budget_s,
            "batches": batches,
            "python": sys.executable,
        },
    )
    image = logs / "image.png"
    noise_image(image, args.image_side)
    entries = args.prompt_tokens + config.vision.image_tokens() + 16  # the worker's cache: prompt + image + 8 + 8
    common = dict(device=device, synthetic=args.synthetic, prompt_tokens=args.prompt_tokens, image=str(image))
    common.update(batches=batches, decode_steps=args.decode_steps)

    def say(text: str) -> None:
        print(f"[{budget.elapsed():5.0f} s] {text}", flush=True)

    def step(row: dict, spec, label: str, need: str, factor: float = 1.0) -> dict:
        """Run one worker step into ``row`` (saved at every partial), unless the budget refuses it."""
        why = budget.refusal(need, factor)
        if why:
            row.update(status="skipped", skipped_reason=why)
            results.save(plots=True)
            say(f"{label}: skipped ({why})")
            return row
        row["status"] = "running"
        t0 = time.perf_counter()
        status, error = run_step(spec, logs / f"{label}.log", env, budget.left(), lambda f: results.save(row.update(f)))
        budget.took(need, time.perf_counter() - t0)
        row.update(status=status, error=error, step_s=time.perf_counter() - t0, log=str(logs / f"{label}.log"))
        results.save(plots=True)
        say(f"{label}: {status}" + (f" ({error})" if error else f" in {row['step_s']:.0f} s"))
        return row

    mib = args.bandwidth_mib or (4096 if kind == "cuda" else 256)
    env_row = results.add({"kind": "environment", **wheels})
    step(env_row, StepSpec(kind="env", device=device, bandwidth_bytes=mib * 2**20), "env", "env")

    rows = {}
    for name in names:
        row = results.add({"kind": "config", "name": name, **card_claim(config, name, cards, entries)})
        card = row["claimed_card_gib"] if kind == "cuda" else None
        if kind != "cuda":
            row.update(card_status="skipped", card_note="card emulation needs CUDA")
        elif card is None:
            row.update(card_status="skipped", card_note=f"the estimator claims no card of {args.cards} GiB")
        spec = config_spec(name, common, kind="config", card_gib=card)
        rows[name] = step(row, spec, f"config-{name}", "config", 1.5 if CONFIGS[name][0] == "int8" else 1.0)

    http = [results.add({"kind": "http", "concurrency": c}) for c in levels]
    why = "--skip-http" if args.skip_http else budget.refusal("http")
    if why:
        for r in http:
            r.update(status="skipped", skipped_reason=why)
    else:
        t0 = time.perf_counter()
        try:
            for r, fields in zip(http, run_http(args, device, env, logs, budget), strict=True):
                r.update(fields)
        except Exception as e:  # the rows say what broke; the check goes on
            for r in http:
                r.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
        budget.took("http", time.perf_counter() - t0)
    results.save(plots=True)
    say("http: " + ", ".join(f"c{r['concurrency']} {r['status']}" for r in http))

    for name, row in rows.items():
        if name not in compile_for:
            row["compile_status"] = f"skipped: not in --compile-for {args.compile_for}"
        elif kind != "cuda" and args.compile_mode != "aot_eager":
            row["compile_status"] = "skipped: --compile is ignored on a CPU (engine.compile_mode)"
        elif row.get("status") != "ok":
            row["compile_status"] = "skipped: the configuration itself did not finish"
        else:
            spec = config_spec(name, common, kind="compile", compile_mode=args.compile_mode)
            sub = step({}, spec, f"compile-{name}", "compile")
            note = sub.pop("error", None) or sub.pop("skipped_reason", None)
            row["compile_status"] = sub.pop("status") + (f": {note}" if note else "")
            row.update(compile_step_s=sub.pop("step_s", None), compile_log=sub.pop("log", None), **sub)
    results.meta["elapsed_s"] = budget.elapsed()
    results.save(plots=True)
    print(results.markdown())
    print(f"wrote {out}/results.jsonl, results.md, memory.png, tokens_per_s.png (logs: {logs})")
    bad = [r for r in results.rows if r.get("status") not in ("ok", "skipped") or r.get("card_status") == "fail"]
    return 1 if bad else 0


def noise_image(path: Path, side: int) -> None:
    """Random noise (nothing for the vision tower to shortcut), the same bytes every run."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
