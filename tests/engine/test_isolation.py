"""Failure isolation: one request's failure — its sampler, stop handling, detokenizer or non-finite logits, at its
first token or a later one — ends that request alone. The other requests in the batch finish with exactly the
greedy tokens they get alone, and the engine keeps serving. Extreme-but-valid sampling parameters are not failures
at all."""

from __future__ import annotations

import pytest

from engine import Engine, GenerationRequest
from glm4v import SamplingParams
from glm4v.generate import generate_text
from glm4v.sampling import NumericalError, Sampler
from glm4v.text_stream import TextStream

from ..support import collect as _collect
from ..support import prompt_ids as _ids

GOOD = ["tell me about the sea", "count to ten", "what is a fox"]
GOOD_PARAMS = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
MARK = "\x07never-in-the-output"  # a stop string that tags the bad request's TextStream


@pytest.fixture(scope="module")
def alone(tiny_fp32):
    """Each good prompt's greedy tokens when it runs by itself."""
    lm = tiny_fp32
    return {t: generate_text(lm.model, lm.tokenizer, _ids(lm, t), None, GOOD_PARAMS)[1] for t in GOOD + ["after"]}


@pytest.fixture
def make_engine(tiny_fp32):
    engines = []

    def make(model=None):
        eng = Engine(
            model or tiny_fp32.model, tiny_fp32.tokenizer, max_batch_size=4, max_model_len=256, prefill_chunk=16
        ).start()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown(timeout=5)


def _run(eng, lm, bad: GenerationRequest):
    """Three good greedy requests, then ``bad``; returns the bad request's events and the good ones' results."""
    good = [eng.submit(GenerationRequest(_ids(lm, t), GOOD_PARAMS)) for t in GOOD]
    bad_handle = eng.submit(bad)
    return list(bad_handle), bad_handle, [_collect(h) for h in good]


def _assert_isolated(eng, lm, alone, events, handle, results, match: str):
    assert [e.kind for e in events][-1] == "error" and match in str(events[-1].error)
    assert handle.finish_reason == "error"
    for t, (_, toks, reason) in zip(GOOD, results, strict=True):
        assert reason == "length" and toks == alone[t]
    after = _collect(eng.submit(GenerationRequest(_ids(lm, "after"), GOOD_PARAMS)))  # still serving
    assert after[2] == "length" and after[1] == alone["after"]
    assert eng.stats().running == 0


def _bad(lm, text="the bad one", **kw) -> GenerationRequest:
    return GenerationRequest(_ids(lm, text), SamplingParams(max_new_tokens=12, ignore_eos=True, **kw))


def _fail_on_call(n: int, when, real, message: str, eng, seen_running: list):
    """A wrapper of ``real`` that raises on the ``n``-th call for which ``when(self)`` holds."""
    calls = {"n": 0}

    def wrapper(self, *a, **kw):
        if when(self):
            calls["n"] += 1
            if calls["n"] == n:
                seen_running.append(len(eng.scheduler.running))
                raise RuntimeError(message)
        return real(self, *a, **kw)

    return wrapper


@pytest.mark.parametrize("nth", [1, 3], ids=["first token (in prefill)", "third token (in decode)"])
def test_a_sampler_error_ends_only_its_request(tiny_fp32, alone, make_engine, monkeypatch, nth):
    lm, eng = tiny_fp32, make_engine()
    bad = _bad(lm, temperature=0.8, seed=1)
    running = []
    monkeypatch.setattr(
        Sampler,
        "choose",
        _fail_on_call(nth, lambda s: s.params is bad.params, Sampler.choose, "sampler blew up", eng, running),
    )
    events, h, results = _run(eng, lm, bad)
    assert running == [4]  # it failed while the three others were running alongside it
    if nth == 1:
        assert [e.kind for e in events] == ["error"]
    _assert_isolated(eng, lm, alone, events, h, results, "sampler blew up")


def test_a_stop_string_error_ends_only_its_request(tiny_fp32, alone, make_engine, monkeypatch):
    lm, eng = tiny_fp32, make_engine()
    running = []
    monkeypatch.setattr(
        TextStream,
        "push",
        _fail_on_call(3, lambda s: MARK in s.stop, TextStream.push, "stop handling blew up", eng, running),
    )
    events, h, results = _run(eng, lm, _bad(lm, temperature=0, stop=[MARK]))
    assert running == [4]
    _assert_isolated(eng, lm, alone, events, h, results, "stop handling blew up")


def test_a_detokenizer_error_at_the_end_ends_only_its_request(tiny_fp32, alone, make_engine, monkeypatch):
    lm, eng = tiny_fp32, make_engine()
    running = []
    monkeypatch.setattr(
        TextStream,
        "finish",
        _fail_on_call(1, lambda s: MARK in s.stop, TextStream.finish, "detokenizer blew up", eng, running),
    )
    bad = GenerationRequest(
        _ids(lm, "short"), SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True, stop=[MARK])
    )
    events, h, results = _run(eng, lm, bad)
    assert running == [4]
    _assert_isolated(eng, lm, alone, events, h, results, "detokenizer blew up")


class _NaNForBadRow:
    """The model, except that the bad request's logits come out NaN (an fp16 overflow, simulated) — in its prefill
    (``at_token == 0``) or in the decode step that samples its ``at_token``-th token (1-based)."""

    def __init__(self, model, bad: GenerationRequest, at_token: int):
        self.model, self.bad, self.at_token, self.eng = model, bad, at_token, None
        self.running_at_failure = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_embeds(self, *a, **kw):  # prefill
        logits = self.model.forward_embeds(*a, **kw)
        p = self.eng.scheduler.prefilling
        if self.at_token == 0 and p is not None and p.handle.request is self.bad:
            logits[:] = float("nan")
            self.running_at_failure.append(len(self.eng.scheduler.running))
        return logits

    def __call__(self, *a, **kw):  # decode
        out = self.model(*a, **kw)
        for row, seq in enumerate(self.eng.scheduler.running):
            if seq.handle.request is self.bad and seq.generated + 1 == self.at_token:
                out.logits[row] = float("nan")
                self.running_at_failure.append(len(self.eng.scheduler.running))
        return out


@pytest.mark.parametrize("at_token", [0, 3], ids=["in prefill", "in decode"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_non_finite_logits_end_only_that_request(tiny_fp32, alone, make_engine, temperature, at_token):
    lm = tiny_fp32
    bad = _bad(lm, temperature=temperature, seed=2)
    model = _NaNForBadRow(lm.model, bad, at_token)
    eng = model.eng = make_engine(model)
    events, h, results = _run(eng, lm, bad)
    # In its prefill the three others are running; in decode it runs beside them (one NaN step either way).
    assert model.running_at_failure and set(model.running_at_failure) == {3 if at_token == 0 else 4}
    assert isinstance(events[-1].error, NumericalError)
    assert len([e for e in events if e.kind == "delta"]) == max(0, at_token - 1)
    _assert_isolated(eng, lm, alone, events, h, results, "non-finite logits")


GREEDY_EQUIVALENT = [
    dict(temperature=1e-300),
    dict(temperature=5e-324),
    dict(temperature=1.0, top_p=1e-300),
    dict(temperature=1.0, top_p=5e-324),
    dict(temperature=1.0, top_p=0.0),
]


@pytest.mark.parametrize("kw", GREEDY_EQUIVALENT + [dict(temperature=1.0, repetition_penalty=1e-300)], ids=str)
def test_extreme_but_valid_parameters_answer_normally_beside_others(tiny_fp32, alone, make_engine, kw):
    lm, eng = tiny_fp32, make_engine()
    req = _bad(lm, text="be extreme", seed=3, **kw)
    events, h, results = _run(eng, lm, req)
    assert all(e.kind != "error" for e in events), events[-1].error
    assert h.finish_reason == "length" and h.completion_tokens == 12
    toks = [t for e in events for t in e.token_ids]
    assert all(0 <= t < eng.vocab_size for t in toks)
    if kw in GREEDY_EQUIVALENT:
        greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
        assert toks == generate_text(lm.model, lm.tokenizer, req.prompt_ids, None, greedy)[1]
    for t, (_, got, reason) in zip(GOOD, results, strict=True):
        assert reason == "length" and got == alone[t]
