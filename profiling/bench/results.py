"""One benchmark level's results: per-request timings (:class:`RequestResult`), their summary (mean / p50 / p99
with :func:`profiling.stats.percentile`, the one percentile definition of every report), and the Markdown table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ..stats import percentile


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""  # the answer (multi-turn conversations send it back)

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def summarize(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": statistics.fmean(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}


def level_summary(concurrency: int, results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "output_tokens": out_tokens,
        "prompt_tokens_mean": statistics.fmean([r.prompt_tokens for r in ok]) if ok else None,
        "output_tokens_per_s": out_tokens / duration_s if duration_s > 0 else 0.0,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "ttft_s": summarize([r.ttft_s for r in ok]),
        "tpot_s": summarize([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_s": summarize([x for r in ok for x in r.itl_s]),
        "e2e_s": summarize([r.e2e_s for r in ok]),
    }


def fmt_ms(x) -> str:
    return "—" if x is None else f"{x * 1000:.1f} ms"


def markdown(levels: list[dict], title: str, meta: dict) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += [
        "",
        "| concurrency | requests | out tok/s | req/s | TTFT mean / p50 / p99 | TPOT mean / p50 / p99 | "
        "ITL p50 / p99 | e2e p50 / p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in levels:
        t, p, i, e = s["ttft_s"], s["tpot_s"], s["itl_s"], s["e2e_s"]
        lines.append(
            f"| {s['concurrency']} | {s['completed']}/{s['requests']} | {s['output_tokens_per_s']:.1f} | "
            f"{s['request_throughput']:.2f} | {fmt_ms(t['mean'])} / {fmt_ms(t['p50'])} / {fmt_ms(t['p99'])} | "
            f"{fmt_ms(p['mean'])} / {fmt_ms(p['p50'])} / {fmt_ms(p['p99'])} | "
            f"{fmt_ms(i['p50'])} / {fmt_ms(i['p99'])} | "
            f"{fmt_ms(e['p50'])} / {fmt_ms(e['p99'])} |"
        )
    return "\n".join(lines) + "\n"
