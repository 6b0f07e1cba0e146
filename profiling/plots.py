"""PNG plots (matplotlib, Agg backend: no display needed): memory and speed per configuration, and the
memory-versus-quality scatter a user picks a precision from."""

from __future__ import annotations

from pathlib import Path

GIB = 2**30
CARD_SIZES_GIB = (8, 12, 16, 24, 32, 48, 80)  # common VRAM sizes, drawn when inside the plotted range


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(rows: list[dict], what: str) -> str:
    m = next((r.get("machine") for r in rows if r.get("machine")), {}) or {}
    where = m.get("gpu_name") or f"{m.get('cpu', 'CPU')} (CPU, {m.get('cpu_cores')} cores)"
    return f"{what}\n{where}"


def plot_memory(rows: list[dict], path: str | Path) -> Path:
    """Peak memory (bar) with idle-after-load (darker part) per configuration; the fp16 baseline as a line."""
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok"]
    labels = [r["label"] for r in ok]
    peak = [(r.get("peak_memory_bytes") or 0) / GIB for r in ok]
    idle = [(r.get("idle_memory_bytes") or 0) / GIB for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ok) + 2), 4.5))
    ax.bar(labels, peak, color="#8fb3de", label="peak (prefill/decode)")
    ax.bar(labels, idle, color="#2f5f98", label="idle after load")
    base = next((r.get("baseline_peak_memory_bytes") for r in rows if r.get("baseline_peak_memory_bytes")), None)
    if base:
        est = any(r.get("baseline_source") == "estimated" for r in rows)
        ax.axhline(base / GIB, color="#c0392b", ls="--", label="fp16 baseline" + (" (estimated)" if est else ""))
    for x, v in enumerate(peak):
        ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    src = ", ".join(sorted({r.get("memory_source", "?") for r in ok}))
    ax.set_ylabel(f"memory, GiB ({src})")
    ax.set_title(_title(rows, "Memory per configuration"), fontsize=10)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_speed(rows: list[dict], path: str | Path) -> Path:
    """Decode tokens/s per configuration, with TTFT written on each bar."""
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok"]
    labels = [r["label"] for r in ok]
    tps = [r.get("decode_tokens_per_s") or 0 for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ok) + 2), 4.5))
    ax.bar(labels, tps, color="#6aa84f")
    for x, r in enumerate(ok):
        ax.text(x, tps[x], f"{tps[x]:.1f}\nTTFT {r.get('ttft_s') or 0:.2f}s", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("decode tokens/s (batch 1, median)")
    ax.set_title(_title(rows, "Decode speed per configuration"), fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


QUALITY_LABELS = {
    "top1_agreement": "top-1 agreement with the reference (higher is better)",
    "accuracy": "task accuracy (normalized match, 95% CI)",
    "greedy_match": "greedy-output match rate with the reference",
    "kl_mean": "mean KL(reference ‖ config) per token (lower is better)",
}


def plot_memory_vs_quality(rows: list[dict], path: str | Path, quality: str) -> Path:
    """One point per configuration: memory on x (filled = measured, hollow = estimated), quality on y."""
    plt = _plt()
    pts = [r for r in rows if r.get("memory_bytes") is not None and r.get(quality) is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    placed: list[tuple[float, float]] = []
    xspan = max((r["memory_bytes"] for r in pts), default=1) / GIB or 1.0
    yvals = [r[quality] for r in pts]
    yspan = (max(yvals) - min(yvals)) if yvals and max(yvals) > min(yvals) else 1.0
    for r in sorted(pts, key=lambda r: (r["memory_bytes"], r[quality])):
        x, y = r["memory_bytes"] / GIB, r[quality]
        measured = r.get("memory_kind") == "measured"
        colour = "#c0392b" if r.get("is_reference") else "#2f5f98"
        if quality == "accuracy" and r.get("accuracy_ci_low") is not None:
            ax.errorbar(
                x,
                y,
                yerr=[[y - r["accuracy_ci_low"]], [r["accuracy_ci_high"] - y]],
                color=colour,
                alpha=0.5,
                capsize=3,
                ls="none",
            )
        ax.scatter([x], [y], s=60, color=colour if measured else "white", edgecolors=colour, zorder=3)
        # stack the labels of points that (nearly) coincide instead of printing them over each other
        near = sum(abs(x - px) < 0.04 * xspan and abs(y - py) < 0.04 * yspan for px, py in placed)
        placed.append((x, y))
        ax.annotate(
            r["label"] + (" (ref)" if r.get("is_reference") else ""),
            (x, y),
            textcoords="offset points",
            xytext=(6, 4 - 11 * near),
            fontsize=8,
        )
    if pts:
        xs = [r["memory_bytes"] / GIB for r in pts]
        lo, hi = min(xs), max(xs)
        for card in CARD_SIZES_GIB:
            if lo * 0.8 <= card <= hi * 1.25:
                ax.axvline(card, color="grey", ls=":", lw=1)
                ax.text(card, ax.get_ylim()[1], f" {card} GB card", fontsize=7, color="grey", va="top")
    ax.set_xlabel("peak memory, GiB (filled: measured, hollow: estimated)")
    ax.set_ylabel(QUALITY_LABELS.get(quality, quality))
    ax.set_title(_title(rows, "Memory versus quality"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
