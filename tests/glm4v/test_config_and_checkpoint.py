"""config.json parsing, official key names, the meta-device parameter count, and bad checkpoint folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm4v import ChatGLMConfig, ChatGLMForConditionalGeneration
from glm4v.checkpoint import CheckpointError, expected_shapes, inspect_checkpoint

# The released config.json of THUDM/glm-4v-9b (docs/MODEL.md §1, §12): no rope_ratio, nested vision_config.
OFFICIAL_CONFIG = {
    "_name_or_path": "THUDM/glm-4v-9b",
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "architectures": ["ChatGLMModel"],
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "attn_implementation": "sdpa",
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
    "bias_dropout_fusion": True,
    "boi_token_id": 151339,
    "classifier_dropout": None,
    "eoi_token_id": 151340,
    "eos_token_id": [151329, 151336, 151338],
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1.5625e-07,
    "model_type": "chatglm",
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 40,
    "original_rope": True,
    "pad_token_id": 151329,
    "padded_vocab_size": 151552,
    "post_layer_norm": True,
    "pre_seq_len": None,
    "prefix_projection": False,
    "rmsnorm": True,
    "seq_length": 8192,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0",
    "use_cache": True,
    "vision_config": {
        "dropout_prob": 0.0,
        "hidden_act": "gelu",
        "in_channels": 3,
        "num_hidden_layers": 63,
        "hidden_size": 1792,
        "patch_size": 14,
        "num_heads": 16,
        "intermediate_size": 15360,
        "layer_norm_eps": 1e-06,
        "num_positions": 6401,
        "image_size": 1120,
        "scaling_factor": 8,
    },
}


@pytest.fixture(scope="module")
def official_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    (d / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    return ChatGLMConfig.from_pretrained(str(d))


def test_official_config_fields(official_config):
    c = official_config
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.kv_channels) == (40, 4096, 13696, 128)
    assert (c.num_attention_heads, c.num_kv_heads, c.padded_vocab_size, c.seq_length) == (32, 2, 151552, 8192)
    assert c.rope_base == 10000.0  # rope_ratio absent → 1
    assert c.eos_token_ids == [151329, 151336, 151338]
    assert (c.pad_token_id, c.boi_token_id, c.eoi_token_id) == (151329, 151339, 151340)
    v = c.vision
    assert (v.num_hidden_layers, v.hidden_size, v.num_heads, v.head_dim) == (63, 1792, 16, 112)
    assert (v.image_size, v.patch_size, v.num_positions, v.scaling_factor) == (1120, 14, 6401, 8)
    assert v.image_tokens() == 1602 and v.image_tokens(560) == 402 and v.image_tokens(448) == 258


def test_full_size_model_on_meta_device_has_exact_parameter_count_and_names(official_config):
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(official_config)
    assert sum(p.numel() for p in model.parameters()) == 13_906_320_896
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.encoder.layers."))
    vis = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.vision.transformer."))
    assert enc == 8_158_433_280 and vis == 4_279_387_392  # docs/MODEL.md §2.3 (GLM-4 #500)
    shapes = expected_shapes(official_config)
    spec_shapes = {  # docs/MODEL.md §2.1, §2.2
        "transformer.embedding.word_embeddings.weight": (151552, 4096),
        "transformer.encoder.layers.0.input_layernorm.weight": (4096,),
        "transformer.encoder.layers.39.self_attention.query_key_value.weight": (4608, 4096),
        "transformer.encoder.layers.39.self_attention.query_key_value.bias": (4608,),
        "transformer.encoder.layers.0.self_attention.dense.weight": (4096, 4096),
        "transformer.encoder.layers.0.post_attention_layernorm.weight": (4096,),
        "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight": (27392, 4096),
        "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight": (4096, 13696),
        "transformer.encoder.final_layernorm.weight": (4096,),
        "transformer.output_layer.weight": (151552, 4096),
        "transformer.vision.patch_embedding.proj.weight": (1792, 3, 14, 14),
        "transformer.vision.patch_embedding.proj.bias": (1792,),
        "transformer.vision.patch_embedding.cls_embedding": (1, 1792),
        "transformer.vision.patch_embedding.position_embedding.weight": (6401, 1792),
        "transformer.vision.transformer.layers.62.input_layernorm.weight": (1792,),
        "transformer.vision.transformer.layers.62.input_layernorm.bias": (1792,),
        "transformer.vision.transformer.layers.0.attention.query_key_value.weight": (5376, 1792),
        "transformer.vision.transformer.layers.0.attention.query_key_value.bias": (5376,),
        "transformer.vision.transformer.layers.0.attention.dense.weight": (1792, 1792),
        "transformer.vision.transformer.layers.0.attention.dense.bias": (1792,),
        "transformer.vision.transformer.layers.0.mlp.fc1.weight": (15360, 1792),
        "transformer.vision.transformer.layers.0.mlp.fc1.bias": (15360,),
        "transformer.vision.transformer.layers.0.mlp.fc2.weight": (1792, 15360),
        "transformer.vision.transformer.layers.0.mlp.fc2.bias": (1792,),
        "transformer.vision.transformer.layers.0.post_attention_layernorm.weight": (1792,),
        "transformer.vision.conv.weight": (4096, 1792, 2, 2),
        "transformer.vision.conv.bias": (4096,),
        "transformer.vision.linear_proj.linear_proj.weight": (4096, 4096),
        "transformer.vision.linear_proj.norm1.weight": (4096,),
        "transformer.vision.linear_proj.norm1.bias": (4096,),
        "transformer.vision.linear_proj.gate_proj.weight": (13696, 4096),
        "transformer.vision.linear_proj.dense_h_to_4h.weight": (13696, 4096),
        "transformer.vision.linear_proj.dense_4h_to_h.weight": (4096, 13696),
        "transformer.vision.boi": (1, 1, 4096),
        "transformer.vision.eoi": (1, 1, 4096),
    }
    for k, s in spec_shapes.items():
        assert shapes[k] == s, k
    assert len(shapes) == 1 + 40 * 7 + 1 + 1 + 4 + 63 * 12 + 2 + 6 + 2
    assert "transformer.rotary_pos_emb.inv_freq" not in shapes


def test_tiny_checkpoint_has_official_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert set(OFFICIAL_CONFIG) <= set(cfg)  # every official field is present
    assert set(OFFICIAL_CONFIG["vision_config"]) == set(cfg["vision_config"])
    assert "rope_ratio" not in cfg
    # Every id differs from the real model's, so nothing may be hard-coded.
    assert cfg["boi_token_id"] != 151339 and cfg["eos_token_id"] != OFFICIAL_CONFIG["eos_token_id"]
    for k in ("hidden_size", "ffn_hidden_size", "padded_vocab_size"):
        assert cfg[k] % 32 == 0
    keys = set(load_file(str(tiny_dir / "model.safetensors")))
    assert keys - {"transformer.rotary_pos_emb.inv_freq"} == set(expected_shapes(ChatGLMConfig(**cfg)))


def test_make_tiny_is_deterministic(tmp_path):
    from glm4v.tiny import write_checkpoint

    a = write_checkpoint(tmp_path / "a", seed=3)
    b = write_checkpoint(tmp_path / "b", seed=3)
    c = write_checkpoint(tmp_path / "c", seed=4)
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json", "model.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_sharded_checkpoint_loads_same_weights(tiny_dir, tiny_sharded_dir, tiny_fp32):
    import quant

    assert (tiny_sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(tiny_sharded_dir.glob("model-0000*-of-00003.safetensors"))) == 3
    sharded = quant.load(tiny_sharded_dir, precision="fp32", device="cpu")
    a, b = tiny_fp32.model.state_dict(), sharded.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(d)


def test_missing_weights_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        inspect_checkpoint(d)


def test_bin_only_folder_is_refused(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only PyTorch pickle weights \(pytorch_model\.bin\).*safetensors"):
        inspect_checkpoint(d)


def test_missing_shard_is_named(tiny_sharded_dir, tmp_path):
    d = _copy(tiny_sharded_dir, tmp_path / "m")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00003"):
        inspect_checkpoint(d)


def test_wrong_missing_and_misshaped_keys_are_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    sd["transformer.encoder.layers.0.self_attention.qkv.weight"] = sd.pop(
        "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    )
    sd["transformer.vision.boi"] = torch.zeros(1, 1, 7)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(d)
    msg = str(e.value)
    assert "missing weights: transformer.encoder.layers.0.self_attention.query_key_value.weight" in msg
    assert "unexpected weights: transformer.encoder.layers.0.self_attention.qkv.weight" in msg
    assert "wrong shapes: transformer.vision.boi [1, 1, 7]" in msg


def test_loader_refuses_bad_folder_before_reading_weights(tiny_dir, tmp_path):
    import quant

    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "glm4v"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="expected 'chatglm'.*different models"):
        quant.load(d, precision="fp32", device="cpu")


def test_info_command(tiny_dir, capsys):
    from glm4v_edge.cli import main

    assert main(["info", str(tiny_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == sum(
        torch.Size(s).numel() for s in expected_shapes(ChatGLMConfig.from_pretrained(str(tiny_dir))).values()
    )


def test_auto_classes_load_the_native_model_without_remote_code(tiny_dir):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert "auto_map" in cfg  # the folder points at remote code, as the official one does
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    assert type(model) is ChatGLMForConditionalGeneration
