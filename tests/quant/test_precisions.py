"""Every precision loads on CPU with real bitsandbytes layers, generates, and stays close to fp32."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import quant
from glm4v import Message, SamplingParams, build_prompt
from glm4v.generate import generate_text
from quant.precision import PrecisionSpec

# Loose sanity bounds on the tiny random model (cosine similarity of all logits to fp32). The measured values are
# printed by the test (run with -s) and recorded in docs/PROFILING.md by the eval command on larger models.
MIN_COSINE = {"bf16": 0.999, "fp16": 0.999, "int8": 0.995, "nf4": 0.85, "fp4": 0.7}
LAYER_CLASS = {
    "bf16": nn.Linear,
    "fp16": nn.Linear,
    "fp32": nn.Linear,
    "int8": bnb.nn.Linear8bitLt,
    "nf4": bnb.nn.Linear4bit,
    "fp4": bnb.nn.Linear4bit,
}


@pytest.fixture(scope="module")
def inputs(tiny_fp32, red_image):
    ids = build_prompt(tiny_fp32.tokenizer, [Message("user", "What is this?", has_image=True)]).ids
    return torch.tensor([ids]), tiny_fp32.image_processor(red_image)[None]


@pytest.fixture(scope="module")
def fp32_logits(tiny_fp32, inputs):
    with torch.no_grad():
        return tiny_fp32.model(inputs[0], pixel_values=inputs[1]).logits.float()


def _linears(model, prefix):
    return [m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8", "nf4", "fp4"])
def test_precision_loads_real_layers_generates_and_stays_close(
    load_tiny, inputs, fp32_logits, precision, record_property
):
    lm = load_tiny(precision)
    cls = LAYER_CLASS[precision]
    for prefix in ("transformer.encoder", "transformer.vision"):
        layers = _linears(lm.model, prefix)
        assert layers and all(type(m) is cls for m in layers), prefix
    assert type(lm.model.transformer.output_layer) is nn.Linear  # LM head stays 16-bit
    assert lm.model.transformer.embedding.word_embeddings.weight.dtype in (torch.bfloat16, torch.float16)
    if precision in ("int8", "nf4", "fp4"):
        assert lm.model.transformer.output_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = lm.model(inputs[0], pixel_values=inputs[1]).logits.float()
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), fp32_logits.flatten(), dim=0).item()
    top1 = (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
    record_property("cosine_vs_fp32", cos)
    print(f"\n{precision}: cosine vs fp32 {cos:.5f}, top-1 agreement {top1:.3f}")
    assert cos >= MIN_COSINE[precision]
    text, toks, reason = generate_text(
        lm.model,
        lm.tokenizer,
        inputs[0][0].tolist(),
        inputs[1][0],
        SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True),
    )
    assert len(toks) == 6 and reason == "length"


def test_int8_is_closer_to_fp32_than_nf4_closer_than_fp4(load_tiny, inputs, fp32_logits):
    err = {}
    for p in ("int8", "nf4", "fp4"):
        with torch.no_grad():
            err[p] = (load_tiny(p).model(inputs[0], pixel_values=inputs[1]).logits.float() - fp32_logits).pow(2).mean()
    assert err["int8"] < err["nf4"] < err["fp4"]


@pytest.mark.parametrize(
    "precision,vision,vision_cls",
    [
        ("nf4", "bf16", nn.Linear),
        ("nf4", "int8", bnb.nn.Linear8bitLt),
        ("int8", "nf4", bnb.nn.Linear4bit),
        ("bf16", "nf4", bnb.nn.Linear4bit),
        ("nf4", "fp32", nn.Linear),
    ],
)
def test_vision_tower_at_its_own_precision(load_tiny, inputs, precision, vision, vision_cls):
    lm = load_tiny(precision, vision)
    assert all(type(m) is LAYER_CLASS[precision] for m in _linears(lm.model, "transformer.encoder"))
    assert all(type(m) is vision_cls for m in _linears(lm.model, "transformer.vision"))
    if vision == "fp32":
        assert lm.model.transformer.vision.conv.weight.dtype == torch.float32
    d = lm.describe()
    assert d["precision"] == precision and d["vision_precision"] == vision
    assert d["layers"]["vision"] == {vision_cls.__name__: len(_linears(lm.model, "transformer.vision"))}
    with torch.no_grad():
        out = lm.model(inputs[0], pixel_values=inputs[1]).logits
    assert torch.isfinite(out).all()


def test_describe_reports_the_quantization(load_tiny):
    d = load_tiny("nf4", "bf16").describe()
    q = d["quantization"]
    assert (q["method"], q["bits"], q["quant_type"], q["compute_dtype"], q["double_quant"]) == (
        "bitsandbytes",
        4,
        "nf4",
        "bfloat16",
        True,
    )
    assert q["skipped_modules"] == ["transformer.output_layer", "transformer.vision"]
    assert q["vision"] == {"method": "none", "bits": 16, "dtype": "bfloat16"}
    assert d["layers"]["lm_head"] == {"Linear": 1}
    assert d["weight_bytes"] == load_tiny("nf4", "bf16").weight_bytes["total"]
    i8 = load_tiny("int8").describe()["quantization"]
    assert (i8["bits"], i8["quant_type"], i8["outlier_threshold"]) == (8, "llm_int8", 6.0)


def test_double_quant_and_compute_dtype_options(tiny_dir, load_tiny):
    # Fresh loads: on CPU bitsandbytes repacks 4-bit weights at their first forward, dropping the nested state.
    dq = quant.load(tiny_dir, precision="nf4", device="cpu")
    plain = quant.load(tiny_dir, precision="nf4", device="cpu", double_quant=False)
    assert all(m.weight.quant_state.nested for m in dq.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert not any(m.weight.quant_state.nested for m in plain.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert dq.describe()["quantization"]["double_quant"] and not plain.describe()["quantization"]["double_quant"]
    f16 = load_tiny("nf4", compute_dtype="fp16")
    layer = next(m for m in f16.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.compute_dtype == torch.float16
    assert f16.model.transformer.embedding.word_embeddings.weight.dtype == torch.float16


def test_bf16_falls_back_to_fp16_without_bf16_support(monkeypatch, caplog):
    import quant.precision as qp

    monkeypatch.setattr(qp, "device_supports_bf16", lambda d: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    spec = PrecisionSpec("nf4", "bf16").resolve("cuda:0")
    assert spec.vision_precision == "fp16" and spec.dtype == torch.float16
    assert "no bf16 support" in spec.notes[0] and "no bf16 support" in caplog.text
    assert PrecisionSpec("fp32").resolve("cuda:0") == PrecisionSpec("fp32")  # nothing to fall back from


def test_quantized_model_is_never_moved_with_to(tiny_dir, monkeypatch):
    from glm4v import ChatGLMForConditionalGeneration

    def refuse(self, *a, **k):
        raise AssertionError(".to() called on the model")

    monkeypatch.setattr(ChatGLMForConditionalGeneration, "to", refuse)
    lm = quant.load(tiny_dir, precision="nf4", vision_precision="int8", device="cpu")
    assert lm.model.is_loaded_in_4bit


def test_unknown_precision_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        quant.load(tiny_dir, precision="int3", device="cpu")


@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_loaded_model_runs_without_no_grad(load_tiny, inputs, precision):
    """The README's plain `lm.model(ids, pixel_values=...)`: no autograd context needed, no graph built."""
    lm = load_tiny(precision)
    out = lm.model(inputs[0], pixel_values=inputs[1])
    assert not out.logits.requires_grad
    assert not any(p.requires_grad for p in lm.model.parameters())
