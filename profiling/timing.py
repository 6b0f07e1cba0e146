"""Latency of one request, from the events generation emits: preprocessing, vision encode, prefill/TTFT, decode.

A :class:`RequestTimer` is a hooks object (``on_event(name)``) the decode loop calls; it only records
``perf_counter`` timestamps, so the loop does not depend on profiling. On a GPU pass ``sync`` (e.g.
``torch.cuda.synchronize``): kernels run asynchronously and a host timestamp without a sync would charge the
vision encoder's time to whatever synchronizes next. Definitions (all seconds):

* ``preprocess_s``  request_start → preprocess_end: image decode, resize, normalise (host work)
* ``vision_encode_s`` vision_start → vision_end: the EVA2-CLIP tower + projector
* ``prefill_s``     prefill_start → first_token: vision encode + the LM over the whole prompt + first sample
* ``ttft_s``        request_start → first_token: what a client waits for (preprocessing included)
* ``token_latencies_s`` gaps between consecutive tokens: one decode step + sampling each
* ``e2e_s``         request_start → end
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .stats import median, percentile


@dataclass
class RequestTiming:
    preprocess_s: float | None
    vision_encode_s: float | None
    prefill_s: float | None
    ttft_s: float | None
    e2e_s: float | None
    new_tokens: int
    token_latencies_s: list[float] = field(default_factory=list)

    @property
    def decode_s(self) -> float:
        return sum(self.token_latencies_s)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of decoding (the first token belongs to the prefill)."""
        return len(self.token_latencies_s) / self.decode_s if self.token_latencies_s and self.decode_s > 0 else None


class RequestTimer:
    """Hooks object timing one request; see the module docstring for what each number covers."""

    def __init__(self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.sync = sync
        self.clock = clock
        self.marks: dict[str, float] = {}  # first occurrence of each event
        self.token_times: list[float] = []  # first_token, then each token

    def on_event(self, name: str) -> None:
        if self.sync is not None:
            self.sync()
        t = self.clock()
        if name in ("first_token", "token"):
            self.token_times.append(t)
        self.marks.setdefault(name, t)

    mark = on_event  # the caller's own marks ("request_start", "preprocess_end", "end") read better as mark()

    def _span(self, start: str, stop: str) -> float | None:
        if start in self.marks and stop in self.marks:
            return self.marks[stop] - self.marks[start]
        return None

    def result(self) -> RequestTiming:
        ts = self.token_times
        return RequestTiming(
            preprocess_s=self._span("request_start", "preprocess_end"),
            vision_encode_s=self._span("vision_start", "vision_end"),
            prefill_s=self._span("prefill_start", "first_token"),
            ttft_s=self._span("request_start", "first_token"),
            e2e_s=self._span("request_start", "end"),
            new_tokens=len(ts),
            token_latencies_s=[b - a for a, b in zip(ts, ts[1:], strict=False)],
        )


def summarize(timings: list[RequestTiming]) -> dict:
    """Medians over repeats, and per-token latency percentiles over every decode step of every repeat."""

    def med(attr: str) -> float | None:
        vals = [getattr(t, attr) for t in timings if getattr(t, attr) is not None]
        return median(vals)

    steps = [x for t in timings for x in t.token_latencies_s]
    ms = lambda v: None if v is None else v * 1000.0  # noqa: E731
    return {
        "preprocess_s": med("preprocess_s"),
        "vision_encode_s": med("vision_encode_s"),
        "prefill_s": med("prefill_s"),
        "ttft_s": med("ttft_s"),
        "e2e_s": med("e2e_s"),
        "decode_tokens_per_s": med("decode_tokens_per_s"),
        "new_tokens": med("new_tokens"),
        "token_latency_ms_p50": ms(percentile(steps, 50)),
        "token_latency_ms_p90": ms(percentile(steps, 90)),
        "token_latency_ms_p99": ms(percentile(steps, 99)),
        "ttft_s_runs": [t.ttft_s for t in timings],
        "decode_tokens_per_s_runs": [t.decode_tokens_per_s for t in timings],
    }
