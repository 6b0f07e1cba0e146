"""Markdown tables for profile, eval and report results, with the context a reader needs above them."""

from __future__ import annotations

BUSY_SHARE = 0.10  # other processes' share of all cores above which a run's timings are flagged


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    if abs(n) < 2**30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.2f} GiB"


def fmt(v, spec: str = ".3g", suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def fmt_ratio(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(row: dict) -> str:
    m = row.get("machine") or {}
    gpu = f"{m['gpu_name']} (driver {m.get('gpu_driver')})" if m.get("gpu_name") else "no GPU"
    return (
        f"Machine: {m.get('cpu')} × {m.get('cpu_cores')} cores, {fmt_bytes(m.get('ram_bytes'))} RAM, {gpu}; "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, bitsandbytes {m.get('bitsandbytes')}, "
        f"glm4v-edge {m.get('glm4v_edge')}."
    )


def _baseline_cell(r: dict, key: str, formatter) -> str:
    v = r.get(key)
    cell = formatter(v)
    return f"{cell} *estimated*" if r.get("baseline_source") == "estimated" and v is not None else cell


def profile_table(rows: list[dict]) -> str:
    headers = [
        "configuration",
        "image tokens",
        "memory source",
        "peak memory",
        "idle after load",
        "fp16 baseline",
        "× fp16",
        "decode tok/s",
        "fp16 tok/s",
        "× fp16",
        "TTFT s",
        "vision encode s",
        "token ms p50 / p99",
        "load s",
        "estimated total",
        "measured ÷ estimated",
    ]
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append(
                [r.get("label", "?"), "—", "—", f"failed ({r.get('status')}): {r.get('error', '')[:80]}"]
                + ["—"] * (len(headers) - 4)
            )
            continue
        label = r["label"] + (" (baseline)" if r.get("role") == "baseline" else "")
        if (r.get("other_cpu_share") or 0) > BUSY_SHARE:
            label += f" ⚠ host {r['other_cpu_share']:.0%} busy"
        body.append(
            [
                label,
                str(r.get("image_tokens", "—")),
                r.get("memory_source", "—"),
                fmt_bytes(r.get("peak_memory_bytes")),
                fmt_bytes(r.get("idle_memory_bytes")),
                _baseline_cell(r, "baseline_peak_memory_bytes", fmt_bytes),
                fmt_ratio(r.get("memory_vs_baseline")),
                fmt(r.get("decode_tokens_per_s"), ".1f"),
                fmt(r.get("baseline_decode_tokens_per_s"), ".1f"),
                fmt_ratio(r.get("speed_vs_baseline")),
                fmt(r.get("ttft_s"), ".3f"),
                fmt(r.get("vision_encode_s"), ".3f"),
                f"{fmt(r.get('token_latency_ms_p50'), '.1f')} / {fmt(r.get('token_latency_ms_p99'), '.1f')}",
                fmt(r.get("load_s"), ".1f"),
                fmt_bytes(r.get("estimated_bytes")),
                fmt_ratio(r["peak_memory_bytes"] / r["estimated_bytes"])
                if r.get("peak_memory_bytes") and r.get("estimated_bytes")
                else "—",
            ]
        )
    return md_table(headers, body)


def profile_markdown(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    first = ok[0] if ok else (rows[0] if rows else {})
    src = {r.get("memory_source") for r in ok}
    notes = [
        "# Profile results",
        "",
        machine_line(first),
        f"Command: `{first.get('command', '')}`",
        "",
        f"Prompt: {first.get('prompt_tokens')} text tokens"
        + (" + one image (its embeddings: the image-tokens column)" if first.get("with_image") else " (no image)")
        + f"; {fmt(first.get('new_tokens'), '.0f')} new tokens, greedy; "
        f"{first.get('warmup')} warm-up + {first.get('repeat')} "
        "timed runs per configuration, each configuration in a fresh process. Times are medians over the runs.",
    ]
    if "rss" in src:
        notes.append(
            "Memory source `rss`: no GPU/NVML was used, so memory is the process's host RSS (weights + "
            "activations + the Python/torch runtime), not VRAM. The estimate has no runtime term, hence the "
            "measured ÷ estimated ratio far above 1 for small models."
        )
    if "nvml" in src:
        notes.append(
            "Memory source `nvml`: this process's GPU memory by NVML (CUDA context included); torch's "
            "allocated/reserved peaks are in results.jsonl."
        )
    if any((r.get("other_cpu_share") or 0) > BUSY_SHARE for r in ok):
        notes.append(
            f"⚠ marks runs during which other processes used more than {BUSY_SHARE:.0%} of the CPU: "
            "their timings are disturbed (other_cpu_share in results.jsonl)."
        )
    if any(r.get("baseline_source") == "estimated" for r in rows):
        reason = next((r.get("baseline_reason") for r in rows if r.get("baseline_reason")), "")
        notes.append(f"The fp16 baseline is *estimated* (not measured): {reason}.")
    return "\n".join(notes) + "\n\n" + profile_table(rows) + "\n"


def eval_table(rows: list[dict]) -> str:
    headers = [
        "configuration",
        "reference",
        "KL mean",
        "KL p99",
        "top-1 agreement",
        "greedy match",
        "accuracy [95% CI]",
        "items",
        "answer tokens",
    ]
    body = []
    for r in rows:
        acc = r.get("accuracy")
        acc_cell = "—" if acc is None else (f"{acc:.3f} [{r['accuracy_ci_low']:.3f}, {r['accuracy_ci_high']:.3f}]")
        body.append(
            [
                r.get("label", "?") + (" (reference)" if r.get("is_reference") else ""),
                r.get("reference_label") or r.get("reference") or "—",
                fmt(r.get("kl_mean"), ".5f"),
                fmt(r.get("kl_p99"), ".5f"),
                fmt(r.get("top1_agreement"), ".3f"),
                fmt(r.get("greedy_match"), ".3f"),
                acc_cell,
                fmt(r.get("n_items"), "d"),
                fmt(r.get("n_tokens"), "d"),
            ]
        )
    return md_table(headers, body)


def report_table(rows: list[dict]) -> str:
    headers = [
        "configuration",
        "peak memory",
        "× fp16",
        "decode tok/s",
        "× fp16",
        "TTFT s",
        "KL mean",
        "KL p99",
        "top-1",
        "greedy match",
        "accuracy [95% CI]",
    ]
    body = []
    for r in rows:
        mem = fmt_bytes(r.get("memory_bytes"))
        if r.get("memory_kind") == "estimated":
            mem += " *estimated*"
        elif r.get("memory_source"):
            mem += f" ({r['memory_source']})"
        acc = r.get("accuracy")
        body.append(
            [
                r["label"] + (" (reference)" if r.get("is_reference") else ""),
                mem,
                fmt_ratio(r.get("memory_vs_baseline")),
                fmt(r.get("decode_tokens_per_s"), ".1f"),
                fmt_ratio(r.get("speed_vs_baseline")),
                fmt(r.get("ttft_s"), ".3f"),
                fmt(r.get("kl_mean"), ".5f"),
                fmt(r.get("kl_p99"), ".5f"),
                fmt(r.get("top1_agreement"), ".3f"),
                fmt(r.get("greedy_match"), ".3f"),
                "—" if acc is None else f"{acc:.3f} [{r.get('accuracy_ci_low'):.3f}, {r.get('accuracy_ci_high'):.3f}]",
            ]
        )
    return md_table(headers, body)
