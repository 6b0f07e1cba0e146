"""Continuous batching: batched results equal solo results, cancellation, queueing, mixed requests."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from engine import Engine, GenerationRequest, QueueFullError
from glm4v import SamplingParams
from glm4v.generate import generate_text

from ..support import collect as _collect
from ..support import prompt_ids as _ids


@pytest.fixture
def engine(tiny_fp32):
    eng = Engine(
        tiny_fp32.model, tiny_fp32.tokenizer, max_batch_size=4, max_model_len=256, max_queue=8, prefill_chunk=16
    ).start()
    yield eng
    eng.shutdown(timeout=5)


def test_batched_greedy_equals_each_alone(tiny_fp32, engine):
    lm = tiny_fp32
    blue = lm.image_processor(Image.new("RGB", (90, 60), "blue"))
    red = lm.image_processor(Image.new("RGB", (30, 80), "red"))
    reqs = [
        (_ids(lm, "describe the picture", image=True), blue),
        (_ids(lm, "what colour is the shape in this image, answer in one word please"), None),
        (_ids(lm, "hi"), None),
        (_ids(lm, "count the squares", image=True), red),
        (_ids(lm, "tell me a long story about the quick brown fox and the lazy dog " * 3), None),
    ]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    handles = [engine.submit(GenerationRequest(ids, params, px)) for ids, px in reqs]
    results = [_collect(h) for h in handles]
    for (ids, px), (text, toks, reason), h in zip(reqs, results, handles, strict=True):
        alone_text, alone_toks, alone_reason = generate_text(lm.model, lm.tokenizer, ids, px, params)
        assert toks == alone_toks
        assert text == alone_text
        assert reason == alone_reason == "length"
        assert h.completion_tokens == 12
        expected_prompt = len(ids) + (lm.image_tokens() - 3 if px is not None else 0)
        assert h.prompt_tokens == expected_prompt


def test_seeded_sampling_is_independent_of_batch_company(tiny_fp32, engine):
    lm = tiny_fp32
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    solo = _collect(engine.submit(GenerationRequest(_ids(lm, "pick a word"), params)))
    other = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    hs = [engine.submit(GenerationRequest(_ids(lm, "noise " * k), other)) for k in range(1, 3)]
    mine = engine.submit(GenerationRequest(_ids(lm, "pick a word"), params))
    together = _collect(mine)
    for h in hs:
        _collect(h)
    assert together[1] == solo[1]


def test_full_batch_queues_next_request(tiny_fp32):
    lm = tiny_fp32
    eng = Engine(lm.model, lm.tokenizer, max_batch_size=2, max_model_len=512, max_queue=8).start()
    try:
        long = SamplingParams(max_new_tokens=150, temperature=0, ignore_eos=True)
        a = eng.submit(GenerationRequest(_ids(lm, "a"), long))
        b = eng.submit(GenerationRequest(_ids(lm, "b"), long))
        c = eng.submit(GenerationRequest(_ids(lm, "c"), SamplingParams(max_new_tokens=3, temperature=0)))
        deadline = time.time() + 10
        while eng.stats().running < 2 and time.time() < deadline:
            time.sleep(0.005)
        s = eng.stats()
        assert s.running == 2 and s.waiting == 1  # c waits for a free row
        results = [_collect(h) for h in (a, b, c)]
        assert c.timings.started >= min(a.timings.finished, b.timings.finished)
        assert [r[2] for r in results[:2]] == ["length", "length"]
        assert results[2][2] in ("length", "stop")
    finally:
        eng.shutdown(timeout=5)


def test_queue_bound_raises(tiny_fp32):
    lm = tiny_fp32
    eng = Engine(lm.model, lm.tokenizer, max_batch_size=1, max_model_len=128, max_queue=2)  # not started
    p = SamplingParams(max_new_tokens=2)
    eng.submit(GenerationRequest(_ids(lm, "x"), p))
    eng.submit(GenerationRequest(_ids(lm, "y"), p))
    with pytest.raises(QueueFullError, match="limit 2"):
        eng.submit(GenerationRequest(_ids(lm, "z"), p))


def test_context_overflow_is_rejected_at_submit(tiny_fp32):
    lm = tiny_fp32
    eng = Engine(lm.model, lm.tokenizer, max_batch_size=1, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.submit(GenerationRequest(_ids(lm, "word " * 40), SamplingParams(max_new_tokens=2)))


def test_cancel_mid_batch_frees_the_row_and_others_continue(tiny_fp32, engine):
    lm = tiny_fp32
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    victim = engine.submit(GenerationRequest(_ids(lm, "victim"), long))
    keeper = engine.submit(
        GenerationRequest(_ids(lm, "keeper"), SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))
    )
    got = []

    def read():
        for ev in victim:
            got.append(ev)
            if len(got) == 5:
                victim.cancel()

    t = threading.Thread(target=read)
    t.start()
    t.join(timeout=20)
    assert got[-1].kind == "finish" and got[-1].finish_reason == "cancelled"
    assert victim.completion_tokens < 200
    text, toks, reason = _collect(keeper)
    assert reason == "length" and len(toks) == 40
    alone = generate_text(
        lm.model,
        lm.tokenizer,
        _ids(lm, "keeper"),
        None,
        SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True),
    )
    assert toks == alone[1]
    deadline = time.time() + 5
    while engine.stats().running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0


def test_stop_string_and_eos(tiny_fp32, engine):
    lm = tiny_fp32
    ids = _ids(lm, "hello")
    free = _collect(
        engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)))
    )
    text = free[0]
    assert len(text) > 4
    stop = text[2:4]
    cut = _collect(
        engine.submit(
            GenerationRequest(ids, SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
        )
    )
    assert cut[2] == "stop"
    assert cut[0] == text[: text.index(stop)]
    eos_tok = free[1][3]
    h = engine.submit(
        GenerationRequest(ids, SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[eos_tok]))
    )
    by_id = _collect(h)
    k = free[1].index(eos_tok)
    assert by_id[2] == "stop" and by_id[1] == free[1][:k]  # the stop token itself is not streamed as text
    assert h.completion_tokens == k + 1  # ... but it was generated, and usage counts it


def test_image_prefill_is_interleaved_with_running_decode(tiny_fp32):
    """A new image request is encoded one ViT layer group and one prompt chunk at a time, with decode steps for the
    running stream in between — the stall a newcomer causes is one unit, not a whole prefill."""
    lm = tiny_fp32
    eng = Engine(
        lm.model, lm.tokenizer, max_batch_size=4, max_model_len=512, prefill_chunk=8, vision_layers_per_step=1
    ).start()
    try:
        runner = eng.submit(
            GenerationRequest(
                _ids(lm, "keep talking"), SamplingParams(max_new_tokens=300, temperature=0, ignore_eos=True)
            )
        )
        it = iter(runner)
        for _ in range(3):
            next(it)  # the runner is decoding
        ids = _ids(lm, "what is in the picture, in detail?", image=True)
        px = lm.image_processor(Image.new("RGB", (50, 50), "green"))
        params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
        newcomer = eng.submit(GenerationRequest(ids, params, px))
        result = _collect(newcomer)
        runner.cancel()
        for _ in it:
            pass
        # ViT layer groups + prompt chunks; the last layer group and the first chunk share one step.
        units = lm.model.vision.num_layers + -(-newcomer.prompt_tokens // 8) - 1
        t0, t1 = newcomer.timings.started, newcomer.timings.first_token
        between = [t for t in runner.timings.token_times if t0 <= t <= t1]
        assert len(between) >= units - 1
        assert result[1] == generate_text(lm.model, lm.tokenizer, ids, px, params)[1]  # staging changes nothing
    finally:
        eng.shutdown(timeout=5)


def test_a_kv_cache_that_cannot_be_allocated_fails_start_clearly(tiny_fp32):
    lm = tiny_fp32
    eng = Engine(lm.model, lm.tokenizer, max_batch_size=4096, max_model_len=2**40)  # petabytes: refused at once
    with pytest.raises(MemoryError, match=r"KV cache for 4096 sequences × 1099511627776 tokens .*lower --max-batch"):
        eng.start()


def test_an_unexpected_step_error_fails_in_flight_requests_and_the_engine_keeps_serving(tiny_fp32, monkeypatch):
    lm = tiny_fp32
    eng = Engine(lm.model, lm.tokenizer, max_batch_size=2, max_model_len=128).start()
    try:
        import glm4v.text_stream as ts

        real_push = ts.TextStream.push
        calls = {"n": 0}

        def flaky(self, token_id):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom in detokenization")
            return real_push(self, token_id)

        monkeypatch.setattr(ts.TextStream, "push", flaky)
        h = eng.submit(
            GenerationRequest(_ids(lm, "x"), SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
        )
        events = list(h)
        assert events[-1].kind == "error" and "boom" in str(events[-1].error)
        monkeypatch.setattr(ts.TextStream, "push", real_push)
        text, toks, reason = _collect(eng.submit(GenerationRequest(_ids(lm, "y"), SamplingParams(max_new_tokens=4))))
        assert reason in ("length", "stop") and eng.stats().running == 0
    finally:
        eng.shutdown(timeout=5)
