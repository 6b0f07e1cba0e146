"""The estimator's placement split — GPU-resident weights, streaming slots, host memory — equals what
``quant.offload.placement_bytes`` reports for loaded models, byte for byte, for every offload subset × vision
precision × LM-head precision; and the per-image PCIe figure equals what the streamer copies."""

from __future__ import annotations

import inspect
from functools import cache

import pytest
import torch

from quant import offload as offload_mod
from quant.estimate import HOST_ALIGN, PCIE_BYTES_PER_S, STREAM_SLOTS, estimate
from quant.offload import offload_vision, placement_bytes
from quant.synthetic import build

SUBSETS = [(), ("vision",), ("embeddings",), ("vision", "embeddings")]
VISION = ["bf16", "fp32", "nf4", "fp4", "int8"]
HEADS = [None, "int8", "nf4"]
CASES = [
    (off, vp, head)
    for off in SUBSETS
    for vp in VISION
    for head in HEADS
    if not (vp == "int8" and "vision" in off)  # int8 cannot be streamed (refused)
]


@cache
def built(name: str, precision: str, vision_precision: str, head: str | None, offload: tuple[str, ...]):
    return build(
        name,
        precision=precision,
        vision_precision=vision_precision,
        device="cpu",
        lm_head_precision=head,
        offload=offload,
    )


def predicted(lm, precision, vision_precision, head, offload, **kw):
    return estimate(
        lm.config,
        precision=precision,
        vision_precision=vision_precision,
        lm_head_precision=head,
        offload=offload,
        device="cpu",
        **kw,
    )


def assert_same(lm, est):
    assert est.placement() == placement_bytes(lm.model)
    assert est.weights == {k: lm.weight_bytes[k] for k in est.weights}


def test_the_estimator_uses_the_streamers_constants():
    assert HOST_ALIGN == offload_mod.ALIGN
    assert STREAM_SLOTS == inspect.signature(offload_vision).parameters["slots"].default


@pytest.mark.parametrize("offload,vision_precision,head", CASES)
def test_tiny_split_equals_placement_bytes(offload, vision_precision, head):
    lm = built("tiny", "nf4", vision_precision, head, offload)
    est = predicted(lm, "nf4", vision_precision, head, offload)
    assert_same(lm, est)
    assert est.total_bytes == est.resident_weights_bytes + est.streaming_buffer_bytes + est.kv_cache_bytes + (
        est.activation_peak_bytes
    )  # on a CPU no CUDA context


# The mid preset: larger than one 256-byte block everywhere, a ViT layer (not the patch embedding) the largest unit,
# several nested absmax blocks per layer. A bf16 LM keeps the builds fast; the LM's precision is not what is tested.
MID_CASES = [
    (("vision", "embeddings"), "bf16", None),
    (("vision", "embeddings"), "nf4", "nf4"),
    (("vision",), "fp4", "int8"),
    (("embeddings",), "int8", "nf4"),
]


@pytest.mark.parametrize("offload,vision_precision,head", MID_CASES)
def test_mid_split_equals_placement_bytes(offload, vision_precision, head):
    lm = built("mid", "bf16", vision_precision, head, offload)
    assert_same(lm, predicted(lm, "bf16", vision_precision, head, offload))


@pytest.mark.parametrize(
    "precision,vision_precision,head,offload",
    [
        ("nf4", "bf16", None, ("vision", "embeddings")),
        ("nf4", "nf4", "nf4", ("vision", "embeddings")),
        ("bf16", "fp4", "int8", ("vision",)),
        ("fp32", None, "nf4", ("embeddings",)),
    ],
)
def test_loaded_checkpoint_split_equals_placement_bytes(load_tiny, precision, vision_precision, head, offload):
    """The loader's path (from_pretrained, then units quantized and packed) lands on the same bytes."""
    lm = load_tiny(precision, vision_precision, lm_head_precision=head, offload=offload)
    assert_same(lm, predicted(lm, precision, vision_precision, head, offload))


def test_stream_slots_size_the_buffer():
    lm = build("tiny", precision="nf4", vision_precision="nf4", device="cpu")
    offload_vision(lm.model, torch.device("cpu"), slots=3)
    est = predicted(lm, "nf4", "nf4", None, ("vision",), stream_slots=3)
    assert est.placement() == placement_bytes(lm.model)
    assert (
        est.streaming_buffer_bytes
        == 3 * predicted(lm, "nf4", "nf4", None, ("vision",), stream_slots=1).streaming_buffer_bytes
    )


@pytest.mark.parametrize("vision_precision", ["bf16", "nf4"])
def test_pcie_bytes_per_image_are_what_the_streamer_copies(vision_precision):
    lm = built("tiny", "nf4", vision_precision, None, ("vision", "embeddings"))
    vision = lm.model.transformer.vision
    streamer = vision.streamer
    before = streamer.bytes_copied
    with torch.no_grad():
        vision(torch.rand(1, 3, lm.vision_size, lm.vision_size, dtype=vision.dtype))
    est = predicted(lm, "nf4", vision_precision, None, ("vision", "embeddings"))
    assert streamer.bytes_copied - before == est.pcie_bytes_per_image == est.host["vision"]
    assert est.transfer_s_per_image == {k: est.pcie_bytes_per_image / bw for k, bw in PCIE_BYTES_PER_S.items()}


def test_nothing_streamed_without_vision_offload():
    est = estimate(precision="nf4", offload=("embeddings",))
    assert est.pcie_bytes_per_image == 0 and est.streaming_buffer_bytes == 0
    assert est.host == {"embeddings": 151552 * 4096 * 2}
    assert est.resident_weights_bytes == est.weights_bytes - est.host_bytes


def test_int8_vision_cannot_be_streamed():
    with pytest.raises(ValueError, match="int8"):
        estimate(precision="int8", offload=("vision",))
    estimate(precision="int8", vision_precision="bf16", offload=("vision",))  # a 16-bit tower streams beside int8


def test_lm_head_precision_replaces_quantize_lm_head():
    assert (
        estimate(precision="nf4", quantize_lm_head=True).weights
        == estimate(precision="nf4", lm_head_precision="nf4").weights
    )
    head = {h: estimate(precision="nf4", lm_head_precision=h).weights["lm_head"] for h in (None, "int8", "nf4", "fp32")}
    assert head[None] == 151552 * 4096 * 2 and head["fp32"] == 2 * head[None]
    assert head["int8"] == 151552 * 4096 and head["nf4"] == head[None] // 4  # quantization state is counted apart


# Full size, one 1120-px image, 2048-token context, batch 1, CUDA context included: the two tiers.
def test_full_size_low_vram_tiers():
    eight = estimate(precision="nf4", vision_precision="bf16", offload=("vision", "embeddings"))
    six = estimate(precision="nf4", vision_precision="nf4", offload=("vision", "embeddings"), lm_head_precision="nf4")
    assert eight.total_bytes <= 7.3e9 and six.total_bytes <= 6.0e9
    # bf16 vision: a ViT layer (4·1792² + 2·1792·15360 weights + biases, + LayerNorms) is the largest unit
    layer = (4 * 1792 * 1792 + 2 * 1792 * 15360) * 2 + (3 * 1792 + 1792 + 15360 + 1792) * 2 + 4 * 1792 * 2
    assert eight.streaming_buffer_bytes == 2 * layer  # every tensor already 256-byte aligned
    assert 8.9e9 < eight.pcie_bytes_per_image < 9.1e9 and 2.3e9 < six.pcie_bytes_per_image < 2.5e9
    # nf4 vision: the 2×2 conv (4096×1792×2×2, not a Linear: stays 16-bit) is the largest unit
    assert six.streaming_buffer_bytes == 2 * (4096 * 1792 * 4 * 2 + 4096 * 2)
    # the image's transfer hides behind its compute at the assumed rates
    assert max(eight.transfer_s_per_image.values()) < eight.vision_compute_s_per_image
