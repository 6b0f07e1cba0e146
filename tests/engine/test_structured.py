"""Constrained decoding inside the continuous batch (engine.structured) and per-token logprobs.

The tiny checkpoint has random weights: whatever it "wants" to say, a constrained answer that ends with ``stop``
must parse and validate against its schema — across seeds, temperatures, images and batch company."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from PIL import Image

from engine import Engine, GenerationRequest
from engine.structured import GrammarError, apply_bitmask, new_bitmask
from glm4v import SamplingParams
from glm4v.generate import generate_text

from ..support import collect
from ..support import prompt_ids as _ids

SCHEMAS = {
    "object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
            "colour": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "age", "ok", "colour"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -5, "maximum": 5},
                "tag": {"type": "string", "maxLength": 4},
            },
            "required": ["x", "tag"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "p": {"type": "number", "minimum": 0, "maximum": 1},
            "t": {"type": "number", "exclusiveMinimum": -40, "maximum": 60},
        },
        "required": ["p", "t"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "box": {
                "type": "object",
                "properties": {
                    "w": {"type": "integer", "minimum": 1, "maximum": 99},
                    "inner": {
                        "type": "object",
                        "properties": {"label": {"type": "string", "maxLength": 6}},
                        "required": ["label"],
                        "additionalProperties": False,
                    },
                },
                "required": ["w", "inner"],
                "additionalProperties": False,
            }
        },
        "required": ["box"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        },
        "required": ["code", "date"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def engine(tiny_fp32):
    eng = Engine(tiny_fp32.model, tiny_fp32.tokenizer, max_batch_size=8, max_model_len=512, prefill_chunk=16).start()
    yield eng
    eng.shutdown(timeout=5)


def _constrained(engine, schema, ids, params, pixels=None):
    matcher = engine.grammars.compile({"type": "json_schema", "schema": schema}).matcher()
    return engine.submit(GenerationRequest(ids, params, pixels, matcher=matcher))


def _check(text: str, reason: str, schema: dict) -> None:
    assert reason == "stop", (reason, text)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_constrained_answers_always_validate(tiny_fp32, engine, name):
    schema, lm = SCHEMAS[name], tiny_fp32
    ids = _ids(lm, "Describe it as JSON.")
    handles = [
        _constrained(engine, schema, ids, SamplingParams(max_new_tokens=150, temperature=t, top_p=p, seed=seed))
        for t, p in ((0.0, 1.0), (0.8, 0.9), (1.5, 1.0))
        for seed in (0, 1, 2)
    ]
    for h in handles:
        _check(*collect(h)[::2], schema)


def test_constrained_with_an_image_and_json_object(tiny_fp32, engine):
    lm = tiny_fp32
    pixels = lm.image_processor(Image.new("RGB", (90, 60), "blue"))
    ids = _ids(lm, "What is in the picture? Answer in JSON.", image=True)
    for seed in range(3):
        h = _constrained(engine, SCHEMAS["nested"], ids, SamplingParams(max_new_tokens=150, seed=seed), pixels)
        _check(*collect(h)[::2], SCHEMAS["nested"])
    # json_object: any JSON object. Strings are unbounded, so a random model may run out of tokens: an answer that
    # stops is an object; one cut off says "length".
    m = engine.grammars.compile({"type": "json_object"}).matcher()
    text, toks, reason = collect(
        engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=60), pixels, matcher=m))
    )
    assert text.startswith("{")
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert reason == "length" and len(toks) == 60


def test_unconstrained_rows_are_untouched_by_constrained_company(tiny_fp32, engine):
    lm = tiny_fp32
    greedy = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    plain = [_ids(lm, "hello there"), _ids(lm, "what colour is the sky " * 2)]
    alone = [generate_text(lm.model, lm.tokenizer, ids, None, greedy)[1] for ids in plain]
    constrained = [
        _constrained(engine, SCHEMAS[n], _ids(lm, "json please"), SamplingParams(max_new_tokens=150, seed=i))
        for i, n in enumerate(("object", "array", "pattern"))
    ]
    handles = [engine.submit(GenerationRequest(ids, greedy)) for ids in plain]
    for h, want in zip(handles, alone, strict=True):
        assert collect(h)[1] == want
    for h, n in zip(constrained, ("object", "array", "pattern"), strict=True):
        _check(*collect(h)[::2], SCHEMAS[n])


def test_a_cut_off_answer_says_length(tiny_fp32, engine):
    h = _constrained(engine, SCHEMAS["object"], _ids(tiny_fp32, "json"), SamplingParams(max_new_tokens=5, seed=0))
    text, toks, reason = collect(h)
    assert reason == "length" and len(toks) == 5 and text.startswith('{"name"')


def test_stop_strings_and_seeds_with_a_grammar(tiny_fp32, engine):
    ids = _ids(tiny_fp32, "json")
    params = SamplingParams(max_new_tokens=150, temperature=1.0, seed=42)
    first = collect(_constrained(engine, SCHEMAS["object"], ids, params))
    again = collect(_constrained(engine, SCHEMAS["object"], ids, params))
    assert first == again  # a seeded constrained answer is reproducible
    stop = SamplingParams(max_new_tokens=150, temperature=1.0, seed=42, stop=['"age"'])
    text, _, reason = collect(_constrained(engine, SCHEMAS["object"], ids, stop))
    assert reason == "stop" and first[0].startswith(text) and '"age"' not in text


def test_stop_tokens_are_allowed_exactly_where_the_grammar_may_end(tiny_fp32, engine):
    tok = tiny_fp32.tokenizer
    stops = sorted(tiny_fp32.model.config.eos_token_ids)
    m = engine.grammars.compile({"type": "json_schema", "schema": {"type": "integer"}}).matcher()

    def allowed() -> set[int]:
        bm = new_bitmask(1, engine.vocab_size)
        m.fill_bitmask(bm, 0)
        return {t for t in range(engine.vocab_size) if (int(bm[0, t // 32]) >> (t % 32)) & 1}

    assert not allowed() & set(stops)  # nothing yet: an end is not allowed
    for t in tok.encode("12"):
        m.accept(t)
    now = allowed()
    assert set(stops) <= now  # "12" is a whole integer: every stop token may end it ...
    assert now - set(stops) and all(tok.decode([t]).isdigit() for t in now - set(stops))  # ... or more digits
    m.accept(stops[1])
    assert m.stopped


def test_apply_bitmask_touches_only_the_masked_rows():
    logits = torch.randn(3, 70)
    before = logits.clone()
    bm = new_bitmask(1, 64)
    bm[0, 0] = 0b1010  # tokens 1 and 3
    apply_bitmask(logits, bm, rows=[1])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    floor = torch.finfo(logits.dtype).min
    row = logits[1]
    assert row[1] == before[1, 1] and row[3] == before[1, 3]
    assert all(row[t] == floor for t in range(64) if t not in (1, 3))
    assert torch.equal(row[64:], before[1, 64:])  # past the vocabulary: the LM head's padding, never sampled


def test_grammar_errors_and_the_compile_cache(engine):
    g = engine.grammars
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    first = g.compile({"type": "json_schema", "schema": schema})
    hits = g.hits
    assert g.compile({"type": "json_schema", "schema": json.loads(json.dumps(schema))}) is first
    assert g.hits == hits + 1
    with pytest.raises(GrammarError, match="frob"):
        g.compile({"type": "json_schema", "schema": {"type": "frob"}})
    with pytest.raises(GrammarError, match="KiB"):
        g.compile({"type": "json_schema", "schema": {"enum": ["x" * 100] * 1000}})
    # within the byte limit but beyond the grammar limits: refused with the engine's reason, quickly
    huge = {"type": "string", "pattern": "^(" + "|".join(f"w{i:05d}[a-z]{{1,9}}" for i in range(4000)) + ")$"}
    with pytest.raises(GrammarError):
        g.compile({"type": "json_schema", "schema": huge})


def test_a_failing_matcher_fails_its_row_alone(tiny_fp32, engine):
    lm = tiny_fp32

    class Broken:
        stopped = False

        def fill_bitmask(self, bitmask, row):
            raise GrammarError("boom")

        def accept(self, token):
            pass

    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    ok = engine.submit(GenerationRequest(_ids(lm, "hello"), greedy))
    bad = engine.submit(GenerationRequest(_ids(lm, "hello"), greedy, matcher=Broken()))
    with pytest.raises(GrammarError, match="boom"):
        collect(bad)
    assert collect(ok)[1] == generate_text(lm.model, lm.tokenizer, _ids(lm, "hello"), None, greedy)[1]


def test_with_the_fixed_shape_decode_step(tiny_fp32):
    """--compile's decode step: the mask is applied to its logits, outside the captured graph."""
    eng = Engine(tiny_fp32.model, tiny_fp32.tokenizer, max_batch_size=2, max_model_len=256, decode_graphs="static")
    eng.start()
    try:
        for seed in range(2):
            h = _constrained(
                eng, SCHEMAS["array"], _ids(tiny_fp32, "json"), SamplingParams(max_new_tokens=120, seed=seed)
            )
            _check(*collect(h)[::2], SCHEMAS["array"])
    finally:
        eng.shutdown(timeout=5)


# ---- logprobs ---------------------------------------------------------------------------------------------------
def _with_logprobs(handle):
    text, toks, entries, reason = [], [], [], None
    for ev in handle:
        if ev.kind == "delta":
            text.append(ev.text)
            toks += ev.token_ids
            entries += ev.logprobs or []
        elif ev.kind == "finish":
            reason = ev.finish_reason
        else:
            raise ev.error
    return "".join(text), toks, entries, reason


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_a_teacher_forced_forward(tiny_fp32, engine, temperature):
    lm = tiny_fp32
    ids = _ids(lm, "tell me something")
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=3, ignore_eos=True, logprobs=5)
    _, toks, entries, _ = _with_logprobs(engine.submit(GenerationRequest(ids, params)))
    assert [e.token for e in entries] == toks and len(toks) == 10
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids + toks])).logits[0, len(ids) - 1 : -1].float()
    want = torch.log_softmax(logits[:, : engine.vocab_size], dim=-1)
    for i, e in enumerate(entries):
        assert e.logprob == pytest.approx(want[i, e.token].item(), abs=1e-4)
        assert len(e.top) == 5
        assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
        top_v, top_i = torch.topk(want[i], 5)
        assert [t for t, _ in e.top] == top_i.tolist()
        assert [lp for _, lp in e.top] == pytest.approx(top_v.tolist(), abs=1e-4)
        if temperature == 0:
            assert e.top[0][0] == e.token


def test_logprobs_with_a_grammar_are_the_models_distribution(tiny_fp32, engine):
    """The mask changes what is chosen, not what is reported: entries stay the model's raw distribution."""
    lm = tiny_fp32
    ids = _ids(lm, "json")
    m = engine.grammars.compile({"type": "json_schema", "schema": SCHEMAS["pattern"]}).matcher()
    params = SamplingParams(max_new_tokens=60, temperature=0, logprobs=1)
    text, toks, entries, reason = _with_logprobs(engine.submit(GenerationRequest(ids, params, matcher=m)))
    _check(text, reason, SCHEMAS["pattern"])
    assert [e.token for e in entries] == toks[: len(entries)]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids + toks])).logits[0, len(ids) - 1 : -1].float()
    want = torch.log_softmax(logits[:, : engine.vocab_size], dim=-1)
    for i, e in enumerate(entries):
        assert e.logprob == pytest.approx(want[i, e.token].item(), abs=1e-4)
