"""Join profile and eval results into the memory-versus-quality table and plot — the picture a user decides from.

Rows are joined on (precision, vision precision, vision size). Memory is the profile's measured peak where a
profile row exists, else the estimator's total from the eval row (marked *estimated*).

Example: glm4v-edge report --profile runs/profile --eval runs/eval --out runs/report
"""

from __future__ import annotations

import sys
from pathlib import Path

QUALITIES = ("auto", "top1_agreement", "accuracy", "greedy_match", "kl_mean")


def add_arguments(p) -> None:
    p.add_argument(
        "--profile", action="append", default=[], help="profile results (folder or results.jsonl); repeatable"
    )
    p.add_argument("--eval", action="append", default=[], help="eval results (folder or results.jsonl); repeatable")
    p.add_argument(
        "--quality",
        choices=QUALITIES,
        default="auto",
        help="y axis of the plot (default auto: top-1 agreement when measured, else accuracy)",
    )
    p.add_argument("--out", required=True, help="output folder (created)")


PROFILE_FIELDS = (
    "peak_memory_bytes",
    "idle_memory_bytes",
    "memory_source",
    "decode_tokens_per_s",
    "ttft_s",
    "vision_encode_s",
    "load_s",
    "memory_vs_baseline",
    "speed_vs_baseline",
    "baseline_source",
    "baseline_peak_memory_bytes",
    "estimated_bytes",
)
EVAL_FIELDS = (
    "reference",
    "reference_label",
    "is_reference",
    "kl_mean",
    "kl_median",
    "kl_p99",
    "top1_agreement",
    "greedy_match",
    "delta_p_rms",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "accuracy_exact",
    "accuracy_relaxed",
    "accuracy_by_category",
    "n_items",
    "n_tokens",
    "task",
)


def join(profile_rows: list[dict], eval_rows: list[dict]) -> list[dict]:
    """One row per configuration seen in either input, eval rows' order first."""
    from .matrix import key_of, label
    from .rows import ReportRow

    merged: dict[tuple, dict] = {}
    for r in eval_rows:
        m = merged.setdefault(key_of(r), {"machine": r.get("machine")})
        m.update({k: r.get(k) for k in EVAL_FIELDS})
        m.setdefault("estimated_bytes", r.get("estimated_bytes"))
    for r in profile_rows:
        if r.get("status") != "ok":
            continue
        m = merged.setdefault(key_of(r), {})
        m.update({k: r.get(k) for k in PROFILE_FIELDS})
        m["machine"] = r.get("machine") or m.get("machine")
    # An estimated memory figure is compared with the fp16 *estimate* (like with like), never with a measurement.
    fp16 = [m for (p, vp, _), m in merged.items() if p == vp == "fp16" and m.get("estimated_bytes")]
    fp16_estimate = max((m["estimated_bytes"] for m in fp16), default=None)
    out = []
    for (p, vp, n), m in merged.items():
        m.update(precision=p, vision_precision=vp, vision_size=n, label=label(p, vp, n))
        for k in PROFILE_FIELDS + EVAL_FIELDS:  # one schema for every row of report.jsonl
            m.setdefault(k, None)
        if m.get("peak_memory_bytes") is not None:
            m.update(memory_bytes=m["peak_memory_bytes"], memory_kind="measured")
        else:
            m.update(memory_bytes=m.get("estimated_bytes"), memory_kind="estimated")
            m["memory_vs_baseline"] = (
                m["memory_bytes"] / fp16_estimate if m["memory_bytes"] is not None and fp16_estimate else None
            )
        out.append(ReportRow.from_dict(m).to_dict())
    return out


def pick_quality(rows: list[dict], quality: str) -> str:
    if quality != "auto":
        return quality
    for q in ("top1_agreement", "accuracy", "greedy_match"):
        if any(r.get(q) is not None and not r.get("is_reference") for r in rows):
            return q
    return "accuracy"


def run(args) -> int:
    from .plots import plot_memory_vs_quality
    from .results_io import read_jsonl, results_file, write_jsonl
    from .tables import machine_line, report_table

    if not args.profile and not args.eval:
        print("error: give at least one --profile or --eval results folder", file=sys.stderr)
        return 2
    try:
        prof = [r for p in args.profile for r in read_jsonl(results_file(p))]
        evals = [r for p in args.eval for r in read_jsonl(results_file(p))]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = join(prof, evals)
    if not rows:
        print("error: the results hold no successful configuration to report", file=sys.stderr)
        return 1
    quality = pick_quality(rows, args.quality)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "report.jsonl", rows)
    png = plot_memory_vs_quality(rows, out / "memory_vs_quality.png", quality)
    sources = sorted({r.get("memory_source") for r in rows if r.get("memory_source")})
    md = "# Memory versus quality\n\n" + machine_line(rows[0]) + "\n\n"
    md += (
        f"Memory: measured peak ({', '.join(sources) or 'none measured'}) where profiled, otherwise the "
        f"estimator's total (*estimated*). Quality plotted: {quality}. Inputs: "
        f"{', '.join(args.profile + args.eval)}.\n\n"
    )
    md += report_table(rows) + f"\n\n![memory versus quality]({png.name})\n"
    (out / "report.md").write_text(md)
    print(md)
    print(f"wrote {out}/report.md, report.jsonl, {png.name}")
    return 0
