"""Measure answer quality per configuration against a reference precision: teacher-forced KL divergence (mean,
p99), top-1 agreement and greedy-output match (llama.cpp's method), and task accuracy on the built-in synthetic
visual-QA set and/or user JSONL sets, with a 95% confidence interval.

Example: glm4v-edge eval --model ~/glm-4v-9b --precision int8,nf4 --reference bf16 --out runs/eval
The demo model on any laptop: glm4v-edge eval --precision fp32,bf16,int8,nf4,fp4 --reference fp32 --out runs/demo
Any OpenAI-compatible server: glm4v-edge eval --base-url http://127.0.0.1:8000/v1 --out runs/eval-http
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from .cli_args import add_grid, add_model_source, comma_list
from .matrix import precision_list


def add_arguments(p) -> None:
    add_model_source(p, synthetic=False)
    p.add_argument(
        "--base-url",
        help="evaluate OpenAI-compatible server(s) instead of --model: a comma list of base "
        "URLs (…/v1); the first is the reference for greedy match. No KL over HTTP.",
    )
    p.add_argument("--served-model", help="--base-url: model name to request (default: the first in /v1/models)")
    add_grid(p, precision_default="int8,nf4")
    p.add_argument(
        "--reference",
        type=precision_list,
        default=["bf16"],
        help="reference precision (default bf16; fp32 on small CPU tests)",
    )
    p.add_argument(
        "--reference-vision-size", type=int, help="reference vision size (default: the checkpoint's trained size)"
    )
    p.add_argument(
        "--task",
        action="append",
        help="'demo' (the demo model's held-out questions; the default without --model), 'synthetic' (built-in "
        "colour/shape/count/word/digits set at 1120 px; the default with --model) or a JSONL file of "
        "{image, question, answers}; repeatable",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=60,
        help="items of the demo and synthetic sets, and at most this many per JSONL set (default 60)",
    )
    p.add_argument("--seed", type=int, default=0, help="demo / synthetic set seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap, greedy (default 16)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="--base-url: per-request timeout (default 300)")
    p.add_argument("--out", required=True, help="output folder (created)")


def load_tasks(tasks: list[str] | None, limit: int, seed: int, default: str = "synthetic"):
    from .vqa_demo import HELD_OUT_SEED, demo_items
    from .vqa_sets import load_jsonl_set
    from .vqa_synthetic import synthetic_items

    items, names = [], []
    for t in tasks or [default]:
        if t == "demo":
            items += demo_items(limit, HELD_OUT_SEED + seed)
        elif t == "synthetic":
            items += synthetic_items(limit, seed)
        else:
            items += load_jsonl_set(t)[:limit]
        names.append(t)
    return items, names


def run(args) -> int:
    from .progress import ProgressBar
    from .results_io import write_jsonl
    from .system_info import current_command, machine_info
    from .tables import eval_table, machine_line

    try:
        if args.limit < 1 or args.max_new_tokens < 1:
            raise ValueError("--limit and --max-new-tokens must be at least 1")
        if args.base_url and args.model:
            raise ValueError("give --model DIR or --base-url URL, not both")
        # No --model: the shipped demo model (as serve), scored on its own held-out questions by default.
        default_task = "demo" if not args.base_url and not args.model else "synthetic"
        items, task_names = load_tasks(args.task, args.limit, args.seed, default_task)
        if not args.base_url and not args.model:
            from glm4v.tiny import demo_model_dir

            args.model = str(demo_model_dir())
            print(f"note: no --model: the demo model ({args.model}), not GLM-4V-9B", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = current_command(args)

    if args.base_url:
        from .answerers import HttpError
        from .eval_runs import HTTP_NOTE, evaluate_http

        urls = comma_list(args.base_url)
        print(f"note: {HTTP_NOTE}", file=sys.stderr)
        bar = ProgressBar(len(urls) * len(items), label="eval")
        try:
            rows, answers = evaluate_http(urls, items, args.served_model, args.max_new_tokens, args.timeout_s, bar)
        except HttpError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    else:
        from glm4v.checkpoint import CheckpointError

        from .cli_args import check_sizes, model_config
        from .eval_runs import evaluate_local
        from .matrix import ConfigKey, grid

        try:
            config, _ = model_config(args)
            trained = config.vision.image_size
            check_sizes(args.vision_size + [args.reference_vision_size], trained)
        except (ValueError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        keys = [k.resolved(trained) for k in grid(args.precision, args.vision_precision, args.vision_size)]
        ref = args.reference[0]
        ref_key = ConfigKey(ref, ref, args.reference_vision_size or trained)
        opts = dict(
            device=args.device,
            offload=args.offload,
            lm_head_precision=args.lm_head_precision,
            compute_dtype=args.compute_dtype,
            double_quant=not args.no_double_quant,
        )
        bar = ProgressBar((1 + sum(k != ref_key for k in keys)) * len(items), label="eval")
        rows, answers = evaluate_local(args.model, config, keys, ref_key, items, opts, args.max_new_tokens, bar)
    bar.close()

    machine = machine_info()
    rows = [replace(r, task=",".join(task_names), machine=machine, command=command).to_dict() for r in rows]
    write_jsonl(out / "results.jsonl", rows)
    write_jsonl(out / "answers.jsonl", [a.to_dict() for a in answers])
    md = "# Eval results\n\n" + machine_line(rows[0]) + f"\nCommand: `{command}`\n\n"
    if args.base_url:
        md += HTTP_NOTE + ".\n\n"
    md += (
        f"Task: {', '.join(task_names)} ({len(items)} items). KL and top-1 are teacher-forced on the "
        f"reference's greedy answers; accuracy is normalized match with a 95% Wilson interval.\n\n"
    )
    md += eval_table(rows) + "\n"
    (out / "results.md").write_text(md)
    print(md)
    print(f"wrote {out}/results.jsonl, answers.jsonl, results.md")
    return 0
