"""The request timer and hooks: exact arithmetic on a scripted clock, and the real decode loop's events."""

from __future__ import annotations

import pytest

from glm4v import SamplingParams
from glm4v.generate import generate
from profiling.hooks import Fanout
from profiling.profile_worker import profile_prompt
from profiling.timing import RequestTimer, summarize
from profiling.torch_memory import TorchAllocatorPeaks


class Clock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def test_timer_arithmetic_on_a_scripted_clock():
    events = [
        "request_start",
        "preprocess_end",
        "prefill_start",
        "vision_start",
        "vision_end",
        "first_token",
        "token",
        "token",
        "token",
        "end",
    ]
    times = [0.0, 0.05, 0.06, 0.07, 0.27, 0.40, 0.45, 0.52, 0.57, 0.58]
    synced = []
    t = RequestTimer(sync=lambda: synced.append(1), clock=Clock(times))
    for e in events:
        t.on_event(e)
    r = t.result()
    assert len(synced) == len(events)  # a GPU sync before every timestamp
    assert r.preprocess_s == pytest.approx(0.05)
    assert r.vision_encode_s == pytest.approx(0.20)
    assert r.prefill_s == pytest.approx(0.34)
    assert r.ttft_s == pytest.approx(0.40)
    assert r.e2e_s == pytest.approx(0.58)
    assert r.new_tokens == 4
    assert r.token_latencies_s == pytest.approx([0.05, 0.07, 0.05])
    assert r.decode_tokens_per_s == pytest.approx(3 / 0.17)


def test_summary_takes_medians_and_latency_percentiles():
    runs = []
    for ttft, gaps in ((0.5, [0.01, 0.02]), (0.3, [0.03, 0.04]), (0.4, [0.05, 0.10])):
        times = [0.0, 0.0, 0.0, ttft, ttft + gaps[0], ttft + sum(gaps), ttft + sum(gaps)]
        t = RequestTimer(clock=Clock(times))
        for e in ["request_start", "preprocess_end", "prefill_start", "first_token", "token", "token", "end"]:
            t.on_event(e)
        runs.append(t.result())
    s = summarize(runs)
    assert s["ttft_s"] == pytest.approx(0.4)
    assert s["token_latency_ms_p50"] == pytest.approx(35.0)  # median of 10, 20, 30, 40, 50, 100 ms
    assert s["token_latency_ms_p99"] == pytest.approx(97.5)
    assert s["vision_encode_s"] is None  # text-only runs have no vision phase


class Recorder:
    def __init__(self):
        self.events = []

    def on_event(self, name):
        self.events.append(name)


def test_real_generation_emits_the_events_the_timer_needs(tiny_fp32, red_image):
    ids = profile_prompt(tiny_fp32.tokenizer, 30, with_image=True)
    assert len(ids) == 30
    timer, rec = RequestTimer(), Recorder()
    hooks = Fanout(timer, rec)
    params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    hooks.on_event("request_start")
    px = tiny_fp32.image_processor(red_image)
    hooks.on_event("preprocess_end")
    steps = list(generate(tiny_fp32.model, tiny_fp32.tokenizer, ids, px, params, hooks=hooks))
    hooks.on_event("end")
    assert len(steps) == 5
    assert rec.events == [
        "request_start",
        "preprocess_end",
        "prefill_start",
        "vision_start",
        "vision_end",
        "first_token",
        "token",
        "token",
        "token",
        "token",
        "end",
    ]
    r = timer.result()
    assert r.new_tokens == 5 and len(r.token_latencies_s) == 4
    assert 0 < r.vision_encode_s < r.prefill_s < r.ttft_s < r.e2e_s


def test_prompt_builder_hits_the_requested_length(tiny_fp32):
    tok = tiny_fp32.tokenizer
    for n, image in ((64, True), (200, False)):
        ids = profile_prompt(tok, n, image)
        assert len(ids) == n
        assert ids[-2:] == [tok.token_id("<|assistant|>")] + tok.encode("\n")  # the one generation prompt
        assert (tok.token_id("<|begin_of_image|>") in ids) == image
    assert len(profile_prompt(tok, 1, True)) > 1  # never shorter than template + question


def test_torch_allocator_peaks_are_silent_on_cpu():
    t = TorchAllocatorPeaks("cpu")
    t.on_event("prefill_start")
    t.on_event("first_token")
    assert t.summary() == {
        "torch_allocated_idle_bytes": None,
        "torch_allocated_peak_bytes": None,
        "torch_reserved_peak_bytes": None,
    }
