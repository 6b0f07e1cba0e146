"""Multi-turn serving: the image-feature cache and prefix reuse must change the cost of turn 2, never its tokens.

Each test runs a conversation the way chat UIs do — the whole history resent every turn — on an engine with the
caches on and on one with them off, and compares the greedy tokens of every turn; it also checks the caches were
really used (or, for a different image, really not)."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

import quant
from engine import Engine, GenerationRequest
from engine.prefix_cache import ImageFeatureCache, PrefixCache, RowRecord, image_key, reusable
from glm4v import Message, SamplingParams, generation_prompt

from ..support import collect, png_bytes

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


def _engine(lm, on: bool, **kw) -> Engine:
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_model_len", 512)
    return Engine(lm.model, lm.tokenizer, prefix_cache=on, image_cache_mb=64 if on else 0, **kw).start()


def _image(lm, color="red", size=(64, 48), vision_size=None):
    data = png_bytes(size, color)
    n = vision_size or lm.vision_size
    return lm.image_processor(data, n) if vision_size else lm.image_processor(data), image_key(data, n, "fp32")


def _request(lm, turns, image=None, image_turn=0):
    """``turns``: [(user text, assistant text or None)], the last without an answer."""
    messages = []
    for i, (q, a) in enumerate(turns):
        messages.append(Message("user", q, has_image=image is not None and i == image_turn))
        if a is not None:
            messages.append(Message("assistant", a))
    ids = generation_prompt(lm.tokenizer, messages).ids
    px, key = image if image is not None and image_turn < len(turns) else (None, None)
    return GenerationRequest(ids, GREEDY, px, image_key=key)


def _converse(eng, lm, questions, image=None, image_turn=0, rewrite=lambda i, a: a):
    """Ask ``questions`` in turn, resending the history; → [(text, tokens)] per turn."""
    history, out = [], []
    for i, q in enumerate(questions):
        text, toks, _ = collect(eng.submit(_request(lm, history + [(q, None)], image, image_turn)))
        out.append((text, toks))
        history.append((q, rewrite(i, text)))
    return out


@pytest.fixture(scope="module")
def lm(tiny_fp32):
    return tiny_fp32


QUESTIONS = ["what is in this picture?", "what colour is it", "and its shape, in one word please"]


@pytest.mark.parametrize("with_image", [False, True])
def test_turns_equal_with_the_caches_off(lm, with_image):
    img = _image(lm) if with_image else None
    on, off = _engine(lm, True), _engine(lm, False)
    try:
        got = _converse(on, lm, QUESTIONS, img)
        want = _converse(off, lm, QUESTIONS, img)
        assert [t for _, t in got] == [t for _, t in want]
        assert on.prefix.hits >= 2  # turns 2 and 3 reused a kept row
        first_prompt = len(_request(lm, [(QUESTIONS[0], None)], img).prompt_ids)
        assert on.prefix.reused_tokens >= 2 * (first_prompt - 1)
        if with_image:
            assert on.image_cache.misses == 1 and len(on.image_cache) == 1  # encoded once, stored
    finally:
        on.shutdown(timeout=5)
        off.shutdown(timeout=5)


def test_a_retokenized_assistant_turn_only_shortens_the_reuse(lm):
    """The client sends back an answer that is not what was generated (edited, or re-tokenized differently)."""
    img = _image(lm)
    on, off = _engine(lm, True), _engine(lm, False)
    edit = lambda i, a: "Edited: " + a  # noqa: E731
    try:
        assert _converse(on, lm, QUESTIONS, img, rewrite=edit) == _converse(off, lm, QUESTIONS, img, rewrite=edit)
        assert on.prefix.hits == 2
    finally:
        on.shutdown(timeout=5)
        off.shutdown(timeout=5)


def test_the_image_in_turn_two(lm):
    img = _image(lm, "blue")
    on, off = _engine(lm, True, prefill_chunk=16), _engine(lm, False, prefill_chunk=16)
    try:
        assert _converse(on, lm, QUESTIONS, img, image_turn=1) == _converse(off, lm, QUESTIONS, img, image_turn=1)
        assert on.prefix.hits == 2 and on.image_cache.misses == 1
    finally:
        on.shutdown(timeout=5)
        off.shutdown(timeout=5)


def test_a_different_image_or_detail_never_hits(lm):
    eng = _engine(lm, True)
    off = _engine(lm, False)
    try:
        red, blue = _image(lm, "red"), _image(lm, "blue")  # same size, different pixels
        first = [(QUESTIONS[0], None)]
        collect(eng.submit(_request(lm, first, red)))
        want = collect(off.submit(_request(lm, first, blue)))
        got = collect(eng.submit(_request(lm, first, blue)))
        assert got == want
        assert eng.image_cache.hits == 0 and eng.image_cache.misses == 2
        boi = _request(lm, first, blue).prompt_ids.index(lm.model.config.boi_token_id)
        assert eng.prefix.reused_tokens <= boi  # the prefix stopped before the other image
        low = _image(lm, "red", vision_size=56)  # the same bytes at another detail
        assert low[1] != red[1]
        assert collect(eng.submit(_request(lm, first, low))) == collect(off.submit(_request(lm, first, low)))
        assert eng.image_cache.hits == 0
    finally:
        eng.shutdown(timeout=5)
        off.shutdown(timeout=5)


def test_many_conversations_at_once(lm):
    """Four conversations in parallel threads (a mixed batch with prefills between decode steps, chunked), two
    with an image: every turn equals the cache-less engine's."""
    images = [_image(lm, "red"), None, _image(lm, "green", (40, 40)), None]
    on = _engine(lm, True, prefill_chunk=16)
    off = _engine(lm, False, prefill_chunk=16)
    results = {}

    def talk(i):
        qs = [f"conversation {i}: " + q for q in QUESTIONS]
        results[i] = _converse(on, lm, qs, images[i])

    try:
        threads = [threading.Thread(target=talk, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in range(4):
            qs = [f"conversation {i}: " + q for q in QUESTIONS]
            assert results[i] == _converse(off, lm, qs, images[i])
        assert on.prefix.hits >= 8
    finally:
        on.shutdown(timeout=5)
        off.shutdown(timeout=5)


def test_kept_rows_are_given_back_under_pressure(lm):
    """All rows kept, then a full batch of new requests: every one is admitted and answered."""
    eng = _engine(lm, True, max_batch_size=3)
    try:
        for i in range(3):
            collect(eng.submit(_request(lm, [(f"fill row {i} " * 3, None)])))
        assert len(eng.prefix.kept) == 3
        handles = [eng.submit(_request(lm, [(f"new {i}", None)])) for i in range(3)]
        assert all(collect(h)[2] == "length" for h in handles)
        assert eng.stats().running == 0
    finally:
        eng.shutdown(timeout=5)


def test_the_fixed_shape_decode_step(lm):
    img = _image(lm)
    on = _engine(lm, True, decode_graphs="static")
    off = _engine(lm, False)
    try:
        assert _converse(on, lm, QUESTIONS, img) == _converse(off, lm, QUESTIONS, img)
        assert on.prefix.hits == 2
    finally:
        on.shutdown(timeout=5)
        off.shutdown(timeout=5)


def test_with_the_vision_tower_streamed(tiny_dir, lm):
    """--offload vision: the cached features skip the streamed tower; turn 2 equals the resident model's."""
    placed = quant.load(tiny_dir, precision="fp32", device="cpu", offload=("vision",))
    img = _image(lm)
    on = Engine(placed.model, placed.tokenizer, max_batch_size=2, max_model_len=512, prefill_chunk=16).start()
    off = _engine(lm, False)
    try:
        assert _converse(on, placed, QUESTIONS, img) == _converse(off, lm, QUESTIONS, img)
        assert on.prefix.hits == 2 and on.image_cache.misses == 1
    finally:
        on.shutdown(timeout=5)
        off.shutdown(timeout=5)


# ---- the pieces -------------------------------------------------------------------------------------------------
def test_image_cache_stays_within_its_budget():
    import torch

    cache = ImageFeatureCache(max_bytes=3 * 4000)
    for i in range(5):
        cache.put(f"k{i}", torch.zeros(1000))  # 4000 bytes each
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.evictions == 2
    assert cache.get("k0") is None and cache.get("k4") is not None
    cache.put("huge", torch.zeros(10_000))  # larger than the whole budget: not kept
    assert cache.get("huge") is None and cache.bytes <= cache.max_bytes


def test_reusable_prefix_rules():
    kept = RowRecord([1, 2, 3, 10, 11, 12, 4, 5, 6], image_key="A", boi=3, image_entries=10)
    assert reusable(kept, RowRecord([1, 2, 3, 10, 11, 12, 4, 5, 9], image_key="A", boi=3)) == 8
    assert reusable(kept, RowRecord([1, 2, 3, 10, 11, 12, 4, 5, 9], image_key="B", boi=3)) == 3  # other image
    assert reusable(kept, RowRecord([1, 2, 3, 10, 11, 99], image_key="A", boi=3)) == 3  # never inside the triple
    assert reusable(kept, RowRecord(kept.tokens, image_key="A", boi=3)) == 8  # one token is always left to run
    assert kept.entries(8) == 8 + 10 - 3 and kept.entries(3) == 3
    p = PrefixCache()
    p.keep(2, kept)
    assert p.claim([1, 2], RowRecord([7, 8])) == (1, 0)  # no match: an empty row, the kept one stays
    assert p.claim([2], RowRecord([7, 8])) == (2, 0) and not p.kept  # no empty row left: the kept one goes


def test_single_image_from_the_same_png_data(lm):
    """Sanity for the helpers above: the key depends on bytes, size and precision only."""
    a = png_bytes((10, 10), "red")
    assert image_key(a, 112, "fp32") == image_key(bytes(a), 112, "fp32") != image_key(a, 56, "fp32")
    assert image_key(a, 112, "fp32") != image_key(a, 112, "nf4")
    assert Image.open(__import__("io").BytesIO(a)).size == (10, 10)


def test_a_text_prompt_never_reuses_a_kept_image(lm):
    """Raw token ids (/v1/completions) can spell the image placeholders without an image: the match must stop at
    the kept row's image, never attend to another request's patch entries (found in review)."""
    img = _image(lm)
    on, off = _engine(lm, True), _engine(lm, False)
    try:
        first = _request(lm, [(QUESTIONS[0], None)], img)
        collect(on.submit(first))
        spelled = first.prompt_ids + lm.tokenizer.encode(" more")  # same ids, no pixels
        got = collect(on.submit(GenerationRequest(spelled, GREEDY)))
        assert got == collect(off.submit(GenerationRequest(spelled, GREEDY)))
        boi = first.prompt_ids.index(lm.model.config.boi_token_id)
        assert on.prefix.reused_tokens <= boi
    finally:
        on.shutdown(timeout=5)
        off.shutdown(timeout=5)
    kept = RowRecord([1, 2, 3, 10, 11, 12, 4], image_key="A", boi=3, image_entries=10)
    assert reusable(kept, RowRecord([1, 2, 3, 10, 11, 12, 4, 5])) == 3  # the text-only side stops at the kept boi
