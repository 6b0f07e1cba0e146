"""The estimator: released-config arithmetic from the parameter count of docs/MODEL.md §2.3, exact agreement with
what loaded
(and synthetic) tiny models occupy, and the ``estimate`` command."""

from __future__ import annotations

import json

import pytest

from glm4v import ChatGLMConfig
from glm4v_edge.cli import main
from quant.estimate import estimate, parameter_count

# docs/MODEL.md §2.3, from the checkpoint shapes: 13,906,320,896 parameters.
TOTAL = 13_906_320_896
LM_BLOCK_LINEAR_W = 4608 * 4096 + 4096 * 4096 + 27392 * 4096 + 4096 * 13696  # qkv, dense, h→4h, 4h→h weights
VISION_LAYER_LINEAR_W = 5376 * 1792 + 1792 * 1792 + 15360 * 1792 + 1792 * 15360
PROJECTOR_LINEAR_W = 4096 * 4096 + 3 * 13696 * 4096
QUANTIZED_W = 40 * LM_BLOCK_LINEAR_W + 63 * VISION_LAYER_LINEAR_W + PROJECTOR_LINEAR_W  # LM head stays 16-bit
QUANTIZED_ROWS = 40 * (4608 + 4096 + 27392 + 4096) + 63 * (5376 + 1792 + 15360 + 1792) + (4096 + 2 * 13696 + 4096)
QUANTIZED_LAYERS = 40 * 4 + 63 * 4 + 4


def test_real_config_bf16_weights_are_27_8_gb():
    est = estimate(precision="bf16")
    assert parameter_count(ChatGLMConfig()) == TOTAL
    assert est.weights_bytes == 2 * TOTAL == 27_812_641_792  # THUDM: "28 GB"; docs/MODEL.md: ≈ 27.8 GB
    assert round(est.weights_bytes / 1e9, 1) == 27.8


def test_int8_and_nf4_weights_follow_from_the_parameter_count():
    assert QUANTIZED_W == 12_620_398_592
    rest = TOTAL - QUANTIZED_W  # embeddings, LM head, norms, convs, position table, biases: stay bf16
    int8 = estimate(precision="int8").weights_bytes
    assert int8 == QUANTIZED_W * 1 + 4 * QUANTIZED_ROWS + 2 * rest  # int8 weight + fp32 scale per output row
    nf4_plain = estimate(precision="nf4", double_quant=False).weights_bytes
    # 4 bits + an fp32 absmax per 64 weights = 4.5 bits, plus a 16-entry fp32 codebook per layer
    assert nf4_plain == QUANTIZED_W * 9 // 16 + 64 * QUANTIZED_LAYERS + 2 * rest
    nf4 = estimate(precision="nf4").weights_bytes  # double quant: 8-bit absmax + fp32 per 256 blocks
    assert QUANTIZED_W // 2 + 2 * rest < nf4 < nf4_plain
    assert (round(int8 / 1e9, 2), round(nf4_plain / 1e9, 2), round(nf4 / 1e9, 2)) == (15.2, 9.67, 9.08)


COMBOS = [
    ("fp32", None),
    ("bf16", None),
    ("fp16", None),
    ("int8", None),
    ("nf4", None),
    ("fp4", None),
    ("nf4", "bf16"),
    ("int8", "nf4"),
    ("nf4", "int8"),
    ("bf16", "int8"),
]


@pytest.mark.parametrize("precision,vision_precision", COMBOS)
def test_estimate_matches_the_loaded_tiny_model_part_by_part(load_tiny, precision, vision_precision):
    lm = load_tiny(precision, vision_precision)
    est = estimate(lm.config, precision=precision, vision_precision=vision_precision, device="cpu")
    measured = {k: lm.weight_bytes[k] for k in est.weights}
    assert est.weights == measured
    assert lm.weight_bytes["other"] == 0


def test_estimate_matches_without_double_quant(load_tiny):
    lm = load_tiny("nf4", double_quant=False)
    assert estimate(lm.config, precision="nf4", double_quant=False).weights["total"] == lm.weight_bytes["total"]


def test_estimate_json_has_the_documented_fields(capsys):
    assert main(["estimate", "--precision", "nf4", "--gpu-gb", "12", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("weights_bytes", "kv_cache_bytes_per_token", "activation_peak_bytes", "total_bytes", "fits"):
        assert k in d
    assert d["fits"] is True and d["total_bytes"] < 12e9
    assert d["kv_cache_bytes_per_token"] == 40 * 2 * 128 * 2 * 2  # 40 KiB/token in bf16
    assert set(d["breakdown"]["weights"]) >= {
        "lm_linears",
        "vision_linears",
        "projector",
        "embeddings",
        "lm_head",
        "quant_state",
    }
    assert d["parameters"] == TOTAL
    assert d["best_fitting"]["precision"] == "nf4"


def test_best_fitting_prefers_the_most_faithful_configuration(capsys):
    assert main(["estimate", "--precision", "bf16", "--gpu-gb", "24", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False
    assert (d["best_fitting"]["precision"], d["best_fitting"]["vision_precision"]) == ("int8", "bf16")
    assert main(["estimate", "--precision", "bf16", "--gpu-gb", "12"]) == 0
    text = capsys.readouterr().out
    assert "fits 12 GiB: NO" in text and "best that fits 12 GiB: --precision nf4 --vision-precision int8" in text


def test_smaller_vision_size_cuts_image_tokens_and_activations(capsys):
    sizes = {}
    for n in (1120, 560, 448):
        assert main(["estimate", "--precision", "bf16", "--vision-size", str(n), "--json"]) == 0
        sizes[n] = json.loads(capsys.readouterr().out)
    assert [sizes[n]["image_tokens"] for n in (1120, 560, 448)] == [1602, 402, 258]
    vis = [sizes[n]["breakdown"]["activation"]["vision_encoder"] for n in (1120, 560, 448)]
    # bf16 vision activations scale with the patch count (N/14)² + 1 exactly
    assert vis[0] / vis[1] == pytest.approx(6401 / 1601) and vis[1] / vis[2] == pytest.approx(1601 / 1025)
    assert sizes[448]["weights_bytes"] == sizes[1120]["weights_bytes"]  # the position table is resampled, not cut


def test_comma_list_compares_precisions(capsys):
    assert main(["estimate", "--precision", "bf16,int8,nf4", "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["precision"] for d in docs] == ["bf16", "int8", "nf4"]
    assert docs[0]["weights_bytes"] > docs[1]["weights_bytes"] > docs[2]["weights_bytes"]


def test_bad_input_is_named(capsys, tiny_dir):
    with pytest.raises(SystemExit) as e:
        main(["estimate", "--precision", "bf16,int9"])
    assert e.value.code == 2 and "unknown precision 'int9'" in capsys.readouterr().err
    assert main(["estimate", "--vision-size", "500"]) == 2
    assert "vision size 500 must be a multiple of 28" in capsys.readouterr().err
    assert main(["estimate", "--model", str(tiny_dir) + "-missing"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_estimate_reads_a_checkpoint_config(tiny_dir, capsys, load_tiny):
    assert main(["estimate", "--model", str(tiny_dir), "--precision", "nf4", "--device", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["weights_bytes"] == load_tiny("nf4").weight_bytes["total"]
    assert d["cuda_context_bytes"] == 0


def test_gpu_gb_reports_the_context_serve_would_pick(capsys):
    """With --gpu-gb the estimate also says what `serve` picks without --max-model-len: the same arithmetic."""
    from glm4v.config import ChatGLMConfig
    from quant.estimate import CUDA_CONTEXT_BYTES, estimate
    from quant.fit import max_context_that_fits, serving_context

    assert main(["estimate", "--precision", "nf4", "--gpu-gb", "12", "--batch", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    cfg = ChatGLMConfig()
    free = 12 * 2**30 - estimate(cfg, precision="nf4").weights_bytes - CUDA_CONTEXT_BYTES
    assert d["serve_max_model_len"] == serving_context(max_context_that_fits(free, cfg, 8, "nf4"), 8192)
    assert 0 < d["serve_max_model_len"] < 8192 and d["serve_max_model_len"] % 256 == 0
    assert main(["estimate", "--precision", "nf4", "--gpu-gb", "24", "--batch", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["serve_max_model_len"] == 8192


# ---- low VRAM: --offload, --lm-head-precision ------------------------------------------------------------------
EIGHT_GB = ["--precision", "nf4", "--vision-precision", "bf16", "--offload", "vision,embeddings"]
SIX_GB = ["--precision", "nf4", "--vision-precision", "nf4", "--offload", "vision,embeddings"]
SIX_GB += ["--lm-head-precision", "nf4"]


def test_offload_json_splits_gpu_and_host(capsys):
    assert main(["estimate", *EIGHT_GB, "--context", "2048", "--gpu-gb", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is True and d["total_bytes"] <= 7.3e9  # the 8 GB tier
    assert d["offload"] == ["vision", "embeddings"] and d["lm_head_precision"] is None
    assert d["flags"] == "--precision nf4 --vision-precision bf16 --offload vision,embeddings"
    gpu = d["resident_weights_bytes"] + d["streaming_buffer_bytes"]
    assert d["total_bytes"] == gpu + d["kv_cache_bytes"] + d["activation_peak_bytes"] + d["cuda_context_bytes"]
    assert d["resident_weights_bytes"] + d["host_bytes"] == d["weights_bytes"]  # bf16: every tensor 256-byte aligned
    assert d["breakdown"]["host"]["embeddings"] == 151552 * 4096 * 2
    assert d["pcie_bytes_per_image"] == d["breakdown"]["host"]["vision"]
    assert set(d["transfer_s_per_image"]) == {"pcie3_x16", "pcie4_x16"}
    assert d["transfer_s_per_image"]["pcie3_x16"] == pytest.approx(d["pcie_bytes_per_image"] / 12e9)
    assert d["vision_flops_per_image"] > 70e12 and d["vision_compute_s_per_image"] > 0
    assert main(["estimate", *SIX_GB, "--context", "2048", "--gpu-gb", "6", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is True and d["total_bytes"] <= 6.0e9  # the 6 GB tier


def test_offload_text_says_where_and_with_which_flags(capsys):
    assert main(["estimate", *EIGHT_GB, "--gpu-gb", "8"]) == 0
    text = capsys.readouterr().out
    for s in ("GPU: resident", "GPU: streaming buffer", "host: vision", "host: embeddings", "TOTAL on the GPU"):
        assert s in text
    assert "on PCIe 3.0 x16 (12 GB/s)" in text and "on PCIe 4.0 x16 (24 GB/s)" in text and "vision compute ≈" in text
    assert "fits 8 GiB: yes" in text
    assert "with: --precision nf4 --vision-precision bf16 --offload vision,embeddings" in text


def test_when_it_does_not_fit_the_ladder_names_the_flags(capsys):
    assert main(["estimate", "--precision", "nf4", "--gpu-gb", "8"]) == 0
    text = capsys.readouterr().out
    assert "fits 8 GiB: NO" in text
    assert (
        "the first configuration that fits: --precision nf4 --vision-precision bf16 --offload vision,embeddings" in text
    )
    assert main(["estimate", "--precision", "nf4", "--gpu-gb", "6"]) == 0
    flags = "--precision nf4 --vision-precision bf16 --offload vision,embeddings --lm-head-precision nf4"
    assert f"best that fits 6 GiB: {flags}" in capsys.readouterr().out
    # with little host RAM the streamed tower is nf4
    assert main(["estimate", "--precision", "nf4", "--gpu-gb", "8", "--host-gb", "8", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best_fitting"]
    assert best["flags"] == "--precision nf4 --offload vision,embeddings" and best["host_bytes"] < 6 * 2**30


def test_offload_input_errors_are_named(capsys):
    assert main(["estimate", "--precision", "int8", "--offload", "vision"]) == 2
    assert "int8" in capsys.readouterr().err
    assert main(["estimate", "--offload", "vision,weights"]) == 2
    assert "--offload takes vision, embeddings" in capsys.readouterr().err
