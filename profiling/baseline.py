"""The fp16 baseline every configuration is compared with: measured when it fits, estimated otherwise.

Users ask "how much do I save against fp16, and what does it cost me in speed?" — so each profile row gets the
baseline's peak memory and speed beside its own, with ratios. The baseline is fp16 everywhere (language model
and vision) at the checkpoint's trained vision size: the released configuration THUDM's table describes. If it
cannot run (predicted not to fit, or it ran out of memory), its memory comes from the estimator and is marked
``baseline_source="estimated"``; speed then has no baseline (nothing to estimate it from).
"""

from __future__ import annotations

from collections.abc import Callable

BASELINE_PRECISION = "fp16"


def is_baseline_row(row: dict, trained_size: int, precision: str = BASELINE_PRECISION) -> bool:
    return (
        row.get("status") == "ok"
        and row.get("precision") == precision
        and (row.get("vision_precision") or precision) == precision
        and row.get("vision_size") == trained_size
    )


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def baseline_summary(
    rows: list[dict],
    trained_size: int,
    estimate_bytes: Callable[[], int],
    precision: str = BASELINE_PRECISION,
    reason: str | None = None,
) -> dict:
    """The baseline's numbers: from its measured row when one succeeded, else from ``estimate_bytes()``."""
    for r in rows:
        if is_baseline_row(r, trained_size, precision):
            return {
                "baseline_label": r["label"],
                "baseline_source": "measured",
                "baseline_peak_memory_bytes": r.get("peak_memory_bytes"),
                "baseline_memory_source": r.get("memory_source"),
                "baseline_decode_tokens_per_s": r.get("decode_tokens_per_s"),
                "baseline_ttft_s": r.get("ttft_s"),
            }
    return {
        "baseline_label": f"{precision}@{trained_size}",
        "baseline_source": "estimated",
        "baseline_peak_memory_bytes": estimate_bytes(),
        "baseline_memory_source": "estimate",
        "baseline_decode_tokens_per_s": None,
        "baseline_ttft_s": None,
        "baseline_reason": reason or "the fp16 baseline was not measured",
    }


def attach_baseline(rows: list[dict], baseline: dict) -> list[dict]:
    """Copy the baseline's numbers into every row and add the ratios (row / baseline)."""
    for r in rows:
        r.update(baseline)
        r["memory_vs_baseline"] = _ratio(r.get("peak_memory_bytes"), baseline["baseline_peak_memory_bytes"])
        r["speed_vs_baseline"] = _ratio(r.get("decode_tokens_per_s"), baseline["baseline_decode_tokens_per_s"])
        r["ttft_vs_baseline"] = _ratio(r.get("ttft_s"), baseline["baseline_ttft_s"])
    return rows
