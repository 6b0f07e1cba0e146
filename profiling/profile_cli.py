"""Measure memory and latency per configuration (precision × vision precision × vision size), each in a fresh
process, against the fp16 baseline; write results.jsonl, results.csv, results.md and PNG plots.

Example (GPU): glm4v-edge profile --model ~/glm-4v-9b --precision bf16,int8,nf4 --out runs/profile
Without the 28 GB download: glm4v-edge profile --synthetic full --precision int8,nf4 --out runs/synthetic
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from .cli_args import add_grid, add_model_source


def add_arguments(p) -> None:
    add_model_source(p, synthetic=True)
    add_grid(p, precision_default="bf16,int8,nf4")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=64,
        help="text tokens in the prompt, chat template included; the image adds its own (default 64)",
    )
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate, greedy, EOS ignored (default 32)")
    img = p.add_mutually_exclusive_group()
    img.add_argument("--image", help="image file for the prompt (default: a built-in 1120×1120 test image)")
    img.add_argument("--no-image", action="store_true", help="text-only prompt (how THUDM's table was measured)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--sample-ms", type=float, default=10.0, help="memory sampling interval in ms (default 10)")
    p.add_argument(
        "--baseline",
        choices=("fp16", "none"),
        default="fp16",
        help="add the fp16 baseline run when not in the list (default fp16); 'none' = estimated only",
    )
    p.add_argument("--timeout-s", type=float, default=3600.0, help="limit per configuration (default 3600)")
    p.add_argument("--out", required=True, help="output folder (created)")


def _default_image(out: Path) -> Path:
    """A deterministic 1120×1120 test image with shapes and text of several sizes."""
    from PIL import Image

    from .vqa_synthetic import draw_count, draw_text

    im = draw_count("circle", "blue", 3, seed=7)
    text = draw_text("GLM-4V edge 2026", 48, seed=3)
    im = Image.blend(im, text, 0.5)
    path = out / "profile_image.png"
    im.save(path)
    return path


def run_worker(spec, log_path: Path, bar, timeout_s: float) -> dict:
    """Run one configuration in a subprocess; a row with status ok, or error/oom/timeout and the log's tail."""
    from .profile_worker import PROTOCOL_PREFIX

    cmd = [sys.executable, "-m", "profiling.profile_worker", json.dumps(asdict(spec))]
    row = None
    failure = {"status": "error", "error": "the worker exited without a result"}
    base_done = bar.done
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        fired = threading.Event()

        def kill() -> None:  # a hung worker would otherwise block the read below forever
            fired.set()
            proc.kill()

        watchdog = threading.Timer(timeout_s, kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                if not line.startswith(PROTOCOL_PREFIX):
                    log.write(line)
                    continue
                msg = json.loads(line[len(PROTOCOL_PREFIX) :])
                if msg["event"] == "progress":
                    bar.update(base_done + msg["done"], f"{spec.precision}: {msg['note']}")
                elif msg["event"] == "result":
                    row = msg["row"]
                elif msg["event"] == "error":
                    failure = {"status": msg["status"], "error": msg["error"]}
            proc.wait()
        finally:
            watchdog.cancel()
        if row is None and fired.is_set():
            failure = {"status": "timeout", "error": f"no result within {timeout_s:g}s"}
        elif row is None and proc.returncode == -signal.SIGKILL:
            failure = {"status": "oom", "error": "killed by SIGKILL (most likely the kernel's out-of-memory killer)"}
    bar.update(base_done + spec.warmup + spec.repeat, f"{spec.precision}: finished")
    if row is not None:
        return row
    tail = log_path.read_text().strip().splitlines()[-3:]
    failure["log"] = str(log_path)
    failure["log_tail"] = tail
    return failure


def run(args) -> int:
    from glm4v.image_processor import ImageError, open_image
    from quant.estimate import estimate

    from .baseline import BASELINE_PRECISION, attach_baseline, baseline_summary
    from .cli_args import check_sizes, model_config
    from .matrix import ConfigKey, grid
    from .plots import plot_memory, plot_speed
    from .profile_worker import RunSpec
    from .progress import ProgressBar
    from .results_io import write_csv, write_jsonl
    from .rows import ProfileRow
    from .system_info import current_command, device_total_bytes, guess_device
    from .tables import profile_markdown

    try:
        config, source = model_config(args)
        trained = config.vision.image_size
        check_sizes(args.vision_size, trained)
        counts = (("--repeat", args.repeat), ("--new-tokens", args.new_tokens), ("--prompt-tokens", args.prompt_tokens))
        for name, n in counts:
            if n < 1:
                raise ValueError(f"{name} must be at least 1, got {n}")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be 0 or more, got {args.warmup}")
        if args.image:
            open_image(Path(args.image))  # fail here, not in every worker
    except (ValueError, FileNotFoundError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    image = None if args.no_image else str(Path(args.image).resolve() if args.image else _default_image(out))
    device = args.device or guess_device()
    command = current_command(args)

    keys = [k.resolved(trained) for k in grid(args.precision, args.vision_precision, args.vision_size)]
    base_key = ConfigKey(BASELINE_PRECISION, BASELINE_PRECISION, trained)
    context = args.prompt_tokens + config.vision.image_tokens(trained) + args.new_tokens + 8

    def estimate_baseline() -> int:
        return estimate(
            config,
            precision=BASELINE_PRECISION,
            vision_size=trained,
            context=context,
            device=device.split(":")[0],
            prompt_tokens=context - args.new_tokens,
        ).total_bytes

    runs = [(k, "config") for k in keys]
    reason = None
    if base_key not in keys:
        if args.baseline == "none":
            reason = "--baseline none"
        else:
            need, have = estimate_baseline(), device_total_bytes(device)
            if have is not None and need > have:
                reason = f"estimated {need / 2**30:.1f} GiB does not fit the {have / 2**30:.1f} GiB of {device}"
            else:
                runs.insert(0, (base_key, "baseline"))

    bar = ProgressBar(sum(args.warmup + args.repeat for _ in runs), label="profile")
    rows = []
    for key, role in runs:
        spec = RunSpec(
            precision=key.precision,
            vision_precision=key.vision_precision,
            vision_size=key.vision_size,
            model=str(Path(args.model).resolve()) if args.model else None,
            synthetic=args.synthetic,
            compute_dtype=args.compute_dtype,
            double_quant=not args.no_double_quant,
            device=args.device,
            offload=(args.offload or "none") if role == "config" else "none",  # the fp16 baseline stays all-resident
            lm_head_precision=args.lm_head_precision if role == "config" else None,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            image=image,
            warmup=args.warmup,
            repeat=args.repeat,
            sample_interval_s=args.sample_ms / 1000.0,
            role=role,
            command=command,
        )
        bar.update(bar.done, f"{key.label()}: starting")
        row = run_worker(spec, out / "logs" / f"{key.label()}.log", bar, args.timeout_s)
        if row.get("status") != "ok":
            est = estimate(
                config,
                precision=key.precision,
                vision_precision=key.vision_precision,
                vision_size=key.vision_size,
                context=context,
                device=device.split(":")[0],
            )
            row = ProfileRow.from_dict(
                {
                    "label": key.label(),
                    "role": role,
                    "precision": key.precision,
                    "vision_precision": key.vision_precision,
                    "vision_size": key.vision_size,
                    "device": device,
                    "model": source,
                    "estimated_bytes": est.total_bytes,
                    "command": command,
                    **row,
                }
            ).to_dict()
            print(f"\n{key.label()}: {row['status']}: {row.get('error')} (log: {row.get('log')})", file=sys.stderr)
        rows.append(row)
    bar.close()

    if reason is None and not any(
        r.get("status") == "ok" and (r["precision"], r["vision_size"]) == (BASELINE_PRECISION, trained) for r in rows
    ):
        reason = "the fp16 run failed"
    attach_baseline(rows, baseline_summary(rows, trained, estimate_baseline, reason=reason))
    rows = [ProfileRow.from_dict(r).to_dict() for r in rows]  # the documented schema, nothing else

    first = (
        "label",
        "role",
        "status",
        "precision",
        "vision_precision",
        "vision_size",
        "device",
        "memory_source",
        "peak_memory_bytes",
        "idle_memory_bytes",
        "load_s",
        "ttft_s",
        "decode_tokens_per_s",
        "estimated_bytes",
    )
    write_jsonl(out / "results.jsonl", rows)
    write_csv(out / "results.csv", rows, first=first)
    md = profile_markdown(rows)
    (out / "results.md").write_text(md)
    plot_memory(rows, out / "memory.png")
    plot_speed(rows, out / "tokens_per_s.png")
    print(md)
    print(f"wrote {out}/results.jsonl, results.csv, results.md, memory.png, tokens_per_s.png")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1
