"""``quant.synthetic``: the real architecture with random weights, built on the device layer by layer.

Exercised here with the tiny config on the CPU (the code path of ``--synthetic full``, which needs a GPU with room
for the chosen precision)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from glm4v import ChatGLMConfig, SamplingParams
from glm4v.generate import generate_text
from profiling.profile_worker import profile_prompt
from quant.estimate import estimate
from quant.synthetic import build, synthetic_config, synthetic_tokenizer


@pytest.mark.parametrize(
    "precision,vision_precision,layer",
    [
        ("bf16", None, "Linear"),
        ("int8", None, "Linear8bitLt"),
        ("nf4", "bf16", "Linear4bit"),
        ("fp4", "int8", "Linear4bit"),
    ],
)
def test_tiny_synthetic_model_matches_the_estimate_and_generates(precision, vision_precision, layer):
    lm = build("tiny", precision, vision_precision, device="cpu")
    est = estimate(lm.config, precision=precision, vision_precision=vision_precision, device="cpu")
    assert {k: lm.weight_bytes[k] for k in est.weights} == est.weights
    layers = lm.describe()["layers"]
    assert layers["language_model"] == {layer: 8} and layers["lm_head"] == {"Linear": 1}
    assert not any(t.device.type == "meta" for t in list(lm.model.parameters()) + list(lm.model.buffers()))
    ids = profile_prompt(lm.tokenizer, 20, with_image=True)
    px = torch.rand(3, 112, 112)
    text, out_ids, reason = generate_text(
        lm.model, lm.tokenizer, ids, px, SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    )
    assert len(out_ids) == 4 and reason == "length" and text


def test_synthetic_build_is_seeded_and_resamples_the_vision_size():
    a = build("tiny", "bf16", device="cpu", seed=1)
    b = build("tiny", "bf16", device="cpu", seed=1, vision_size=56)
    w = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
    assert torch.equal(a.model.state_dict()[w], b.model.state_dict()[w])
    assert b.vision_size == 56 and b.image_tokens() == 6
    assert b.image_processor(Image.new("RGB", (9, 9))).shape == (3, 56, 56)
    assert not any(t.device.type == "meta" for t in list(a.model.parameters()) + list(a.model.buffers()))


def test_full_config_and_tokenizer_cover_the_real_vocabulary():
    cfg = synthetic_config("full")
    assert cfg.padded_vocab_size == ChatGLMConfig().padded_vocab_size == 151552
    tok = synthetic_tokenizer(cfg)
    assert tok.token_id("<|begin_of_image|>") == 151339 and tok.token_id("<|user|>") == 151336
    assert tok.decode([151000, 65]) == "<tok151000>A"  # any generated id decodes


def test_synthetic_config_from_a_file_and_errors(tmp_path, tiny_dir):
    raw = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "c.json").write_text(json.dumps(raw))
    assert synthetic_config(str(tmp_path / "c.json")).hidden_size == 64
    assert synthetic_config(str(tiny_dir)).num_layers == 2
    with pytest.raises(ValueError, match="not one of full, tiny, mid"):
        synthetic_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        synthetic_config(str(tmp_path / "bad.json"))


def test_only_one_float_linear_is_alive_while_quantizing(monkeypatch):
    """The point of building layer by layer: when a layer is quantized, the float layers quantized before it are
    gone (otherwise the full model's peak would be its whole float size, not one layer)."""
    import weakref

    import quant.synthetic as synthetic

    earlier, still_alive, real = [], [], synthetic.quantized_linear

    def recording(linear, *a, **kw):
        still_alive.append(sum(r() is not None for r in earlier))
        earlier.append(weakref.ref(linear))
        return real(linear, *a, **kw)

    monkeypatch.setattr(synthetic, "quantized_linear", recording)
    build("tiny", "nf4", device="cpu")
    assert len(still_alive) == 20  # 8 LM + 8 vision + 4 projector Linear layers; the LM head stays float
    assert still_alive == [0] * 20
