"""--compile: the fixed-shape decode step gives the ordinary step's tokens, traces as one graph, and fails safe.

CUDA graphs themselves need a GPU; here the same step is checked eagerly ("static") and traced by torch.compile
with ``fullgraph=True`` (the "aot_eager" backend), which fails on any graph break — what a CUDA-graph capture needs.
"""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from engine import Engine, GenerationRequest, compile_mode
from engine.cuda_graphs import COMPILE_MODES, DecodeGraphs
from glm4v import Message, SamplingParams, build_prompt
from glm4v.generate import generate_text
from glm4v.static_decode import batch_buckets, kv_windows
from server.settings import ServerSettings

from ..support import collect as _collect


def _ids(lm, text, image=False):
    return build_prompt(lm.tokenizer, [Message("user", text, has_image=image)]).ids


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]


def test_kv_windows():
    assert kv_windows(8192) == [1024 * i for i in range(1, 9)]
    assert kv_windows(2047) == [256 * i for i in range(1, 8)] + [2047]
    assert kv_windows(100) == [100]
    assert kv_windows(48, 16) == [16, 32, 48]


@pytest.mark.parametrize("mode", [None, "aot_eager", "cudagraphs"])  # on a CPU, cudagraphs only traces
def test_static_decode_equals_dynamic_decode(tiny_fp32, mode):
    """Rows at different lengths, a batch padded up to its bucket, windows crossed while decoding: same logits as
    the ordinary decode step."""
    model = tiny_fp32.model
    prompts = [list(range(5, 5 + n)) for n in (7, 13, 3)]
    ref = model.new_cache(max_len=48, max_batch=4)
    cache = model.new_cache(max_len=48 + DecodeGraphs.spare_slots(mode), max_batch=4)
    graphs = DecodeGraphs(model, cache, mode, kv_step=16)
    assert graphs.windows == [16, 32, 48]
    graphs.warmup(iterations=1)
    with torch.inference_mode():
        toks = None
        for c in (ref, cache):
            last = [model(torch.tensor([p]), cache=c, cache_row=r).logits[0, -1] for r, p in enumerate(prompts)]
            toks = [int(x.argmax()) for x in last]
        for _ in range(22):  # the longest row goes from 13 to 35 entries: windows 16, 32 and 48
            want = model(torch.tensor(toks)[:, None], cache=ref, cache_row=0).logits[:, -1]
            got = graphs.decode(toks)  # 3 rows run in the 4-bucket
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            toks = want.argmax(-1).tolist()
    assert cache.lengths == ref.lengths and cache.next_positions == ref.next_positions


def test_one_compilation_per_batch_bucket(tiny_fp32, monkeypatch):
    """The window length is dynamic: warming up 3 buckets × 4 windows compiles 3 graphs, and serving none."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    compiled = []

    def counting(gm, example_inputs):
        compiled.append(gm)
        return make_boxed_func(gm.forward)

    monkeypatch.setitem(COMPILE_MODES, "counting", dict(backend=aot_autograd(fw_compiler=counting)))
    model = tiny_fp32.model
    cache = model.new_cache(max_len=65, max_batch=4)
    graphs = DecodeGraphs(model, cache, "counting", kv_step=16)
    assert graphs.buckets == [1, 2, 4] and graphs.windows == [16, 32, 48, 64]
    graphs.warmup(iterations=2)
    assert len(compiled) == 3
    with torch.inference_mode():
        model(torch.tensor([list(range(5, 40))] * 3), cache=cache, cache_row=0)
        toks = [1, 2, 3]
        for _ in range(20):  # windows 48 and 64, batch 3 in the 4-bucket
            toks = graphs.decode(toks).argmax(-1).tolist()
        graphs.decode([1])
    assert len(compiled) == 3


def test_padding_rows_leave_a_prefilling_row_intact(tiny_fp32):
    """Row 1 is half prefilled while row 0 decodes in the 2-bucket: finishing its prefill gives the solo logits."""
    model = tiny_fp32.model
    cache = model.new_cache(max_len=64, max_batch=2)
    graphs = DecodeGraphs(model, cache)
    a, b = list(range(5, 15)), list(range(20, 44))
    with torch.inference_mode():
        tok = int(model(torch.tensor([a]), cache=cache, cache_row=0).logits[0, -1].argmax())
        model(torch.tensor([b[:12]]), cache=cache, cache_row=1)
        for _ in range(3):  # writes row 1's slot 12 with padding garbage each time
            tok = int(graphs.decode([tok])[0].argmax())
        got = model(torch.tensor([b[12:]]), cache=cache, cache_row=1).logits[0, -1]
        want = model(torch.tensor([b])).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "nf4", "int8"])
def test_quantized_decode_step_traces_without_graph_breaks(load_tiny, precision):
    """bitsandbytes layers inside the compiled step: fullgraph tracing works and the tokens do not change."""
    model = load_tiny(precision).model
    caches = [model.new_cache(max_len=32 + extra, max_batch=2) for extra in (0, 1)]
    eager, traced = DecodeGraphs(model, caches[0]), DecodeGraphs(model, caches[1], "aot_eager")
    traced.warmup(iterations=1)
    with torch.inference_mode():
        for cache in caches:
            model(torch.tensor([list(range(5, 17))]), cache=cache, cache_row=0)
        toks = [7]
        for _ in range(4):
            want, got = eager.decode(toks), traced.decode(toks)
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
            toks = want.argmax(-1).tolist()


@pytest.mark.parametrize("mode", ["static", "aot_eager"])
def test_engine_with_compiled_decode_matches_each_alone(tiny_fp32, mode):
    """Mixed text and image requests joining and leaving a compiled-step batch: each gets its solo greedy tokens."""
    lm = tiny_fp32
    eng = Engine(
        lm.model, lm.tokenizer, max_batch_size=4, max_model_len=256, prefill_chunk=16, decode_graphs=mode
    ).start()
    try:
        assert eng.compile_status()["active"] and eng.compile_status()["batch_buckets"] == [1, 2, 4]
        blue = lm.image_processor(Image.new("RGB", (90, 60), "blue"))
        reqs = [
            (_ids(lm, "describe the picture", image=True), blue, 9),
            (_ids(lm, "hi"), None, 14),
            (_ids(lm, "a longer question about the quick brown fox " * 2), None, 6),
            (_ids(lm, "count", image=True), blue, 11),
            (_ids(lm, "and one more"), None, 8),
        ]
        handles = [
            eng.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True), px))
            for ids, px, n in reqs
        ]
        for (ids, px, n), h in zip(reqs, handles, strict=True):
            _, toks, reason = _collect(h)
            solo = generate_text(
                lm.model, lm.tokenizer, ids, px, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
            )[1]
            assert toks == solo and reason == "length"
    finally:
        eng.shutdown(timeout=5)


def test_failed_compile_falls_back_to_the_ordinary_step(tiny_fp32, monkeypatch, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("this backend cannot capture the graph")

    monkeypatch.setitem(COMPILE_MODES, "broken", dict(backend=broken_backend))
    lm = tiny_fp32
    with caplog.at_level(logging.WARNING, logger="engine.model_runner"):
        eng = Engine(lm.model, lm.tokenizer, max_batch_size=2, max_model_len=128, decode_graphs="broken").start()
    try:
        status = eng.compile_status()
        assert status["active"] is False and "cannot capture" in status["error"]
        assert "--compile broken failed" in caplog.text
        params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
        ids = _ids(lm, "still serving?")
        assert (
            _collect(eng.submit(GenerationRequest(ids, params)))[1]
            == generate_text(lm.model, lm.tokenizer, ids, None, params)[1]
        )
    finally:
        eng.shutdown(timeout=5)


def test_compile_flag_and_cpu_policy(caplog):
    import argparse

    from glm4v_edge.serve import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert ServerSettings.from_args(p.parse_args([])).compile == "off"
    assert ServerSettings.from_args(p.parse_args(["--compile"])).compile == "reduce-overhead"
    assert ServerSettings.from_args(p.parse_args(["--compile", "cudagraphs"])).compile == "cudagraphs"
    with pytest.raises(SystemExit):
        p.parse_args(["--compile", "fast"])
    with pytest.raises(ValueError, match="compile must be one of"):
        ServerSettings(compile="fast")
    assert compile_mode("off", torch.device("cuda")) is None
    assert compile_mode("cudagraphs", torch.device("cuda", 0)) == "cudagraphs"
    with caplog.at_level(logging.WARNING, logger="server.runtime"):
        assert compile_mode("reduce-overhead", torch.device("cpu")) is None
    assert "ignored on cpu" in caplog.text


@pytest.mark.parametrize("precision", ["fp32", "nf4", "int8"])
def test_quantization_state_is_found_for_static_marking(load_tiny, precision):
    """Every quantized layer's statistics (4-bit absmax, int8 row scales) are among the tensors marked static."""
    from quant.memory import quantization_state_tensors

    model = load_tiny(precision).model
    with torch.inference_mode():  # a forward first: bitsandbytes moves int8 scales on the first one
        model(torch.tensor([[5, 6, 7]]))
    found = {id(t) for t in quantization_state_tensors(model)}
    weights = [getattr(m, "weight", None) for m in model.modules()]
    stats = [w.quant_state.absmax for w in weights if getattr(w, "quant_state", None) is not None]
    stats += [w.SCB for w in weights if getattr(w, "SCB", None) is not None]
    states = [getattr(m, "state", None) for m in model.modules()]  # int8 after its first forward
    stats += [st.SCB for st in states if getattr(st, "SCB", None) is not None]
    assert all(id(t) in found for t in stats)
    assert (len(stats) > 0) == (precision != "fp32") and (len(found) > 0) == (precision != "fp32")
