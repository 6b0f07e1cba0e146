"""Low-VRAM placement (quant/offload.py): the vision tower streamed from host memory, host embeddings, the LM head
at its own precision — same logits as the resident model, and a streaming schedule that does what it claims."""

from __future__ import annotations

import pytest
import torch

import quant
from glm4v import Message, generation_prompt
from quant.offload import HostEmbedding, parse_offload, placement_bytes
from quant.synthetic import build

BOTH = ("vision", "embeddings")


def _plain_cpu_4bit(lm) -> None:
    """On a CPU, bitsandbytes repacks a resident 4-bit weight for its AVX512 kernel, which a streamed weight cannot
    keep (docs/MODEL.md §8.5): compare streamed 4-bit layers against the same kernel. GPUs have no such switch."""
    for m in lm.model.transformer.vision.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _logits(lm, image: bool):
    ids = generation_prompt(lm.tokenizer, [Message("user", "what is it?", has_image=image)]).ids
    torch.manual_seed(0)
    px = torch.randn(1, 3, lm.vision_size, lm.vision_size) if image else None
    with torch.inference_mode():
        return lm.model(torch.tensor([ids]), pixel_values=px).logits


@pytest.mark.parametrize(
    "precision,vision,head,offload",
    [
        ("fp32", None, None, BOTH),
        ("fp32", None, None, ("vision",)),
        ("fp32", None, None, ("embeddings",)),
        ("nf4", "fp32", None, BOTH),
        ("nf4", "bf16", None, BOTH),
        ("nf4", "nf4", "nf4", BOTH),
        ("nf4", "fp4", "int8", ("vision",)),
    ],
)
def test_offloaded_model_gives_the_resident_logits(tiny_dir, precision, vision, head, offload):
    kw = dict(precision=precision, vision_precision=vision, lm_head_precision=head, device="cpu")
    resident, placed = quant.load(tiny_dir, **kw), quant.load(tiny_dir, **kw, offload=offload)
    _plain_cpu_4bit(resident)
    assert placed.offload == offload
    for image in (False, True):
        assert torch.equal(_logits(resident, image), _logits(placed, image)), (image, offload)
    assert isinstance(placed.model.transformer.embedding.word_embeddings, HostEmbedding) == ("embeddings" in offload)


def test_streaming_schedule(tiny_dir):
    lm = quant.load(tiny_dir, precision="fp32", device="cpu", offload=("vision",))
    st = lm.model.transformer.vision.streamer
    slot_ptrs = [s.data_ptr() for s in st.slots]
    seen = []  # as every unit's forward begins: which units point at a slot, and how many hold one
    for unit in st.units:  # registered after the streamer's own pre-hook, so it sees the unit acquired
        unit.module.register_forward_pre_hook(
            lambda m, a, u=unit: seen.append((u.name, st.resident_units(), sum(x.slot is not None for x in st.units)))
        )
    for _ in range(2):  # two images: the same buffers, every unit copied exactly once per image
        before = st.bytes_copied
        _logits(lm, image=True)
        assert st.bytes_copied - before == st.host_bytes
    assert [name for name, *_ in seen] == [u.name for u in st.units] * 2
    assert all(resident == [name] for name, resident, _ in seen)  # only the running unit's weights are in use
    assert max(held for *_, held in seen) <= len(st.slots)  # … and at most `slots` units are on the device at all
    assert [s.data_ptr() for s in st.slots] == slot_ptrs  # buffers reused, never reallocated
    assert st.resident_units() == [] and all(u.slot is None for u in st.units)  # nothing left after the image
    for unit in st.units:  # every streamed tensor points back into its unit's host buffer
        for ref in unit.refs:
            t = ref.owner.data if ref.is_param else getattr(ref.owner, ref.attr)
            assert t.untyped_storage().data_ptr() == unit.host.untyped_storage().data_ptr()
    assert st.buffer_bytes == len(st.slots) * max(u.nbytes for u in st.units)


def test_a_text_only_request_streams_nothing_and_host_embeddings_copy_only_their_rows(tiny_dir):
    lm = quant.load(tiny_dir, precision="fp32", device="cpu", offload=BOTH)
    st, emb = lm.model.transformer.vision.streamer, lm.model.transformer.embedding.word_embeddings
    ids = generation_prompt(lm.tokenizer, [Message("user", "hello")]).ids
    with torch.inference_mode():
        lm.model(torch.tensor([ids, ids]))
    assert st.bytes_copied == 0
    assert emb.rows_copied == 2 * len(ids)  # B × S rows, not the table


def test_placement_bytes_split_the_same_weights(tiny_dir):
    resident = quant.load(tiny_dir, precision="nf4", vision_precision="bf16", device="cpu")
    placed = quant.load(tiny_dir, precision="nf4", vision_precision="bf16", device="cpu", offload=BOTH)
    p = placement_bytes(placed.model)
    assert placed.weight_bytes["total"] == resident.weight_bytes["total"]
    assert (
        p["resident"] < resident.weight_bytes["total"] and p["host"] >= resident.weight_bytes["total"] - p["resident"]
    )
    assert placed.describe()["offload"]["placement"]["vision"]["device"] == "host"


def test_synthetic_weights_can_be_built_offloaded():
    a = build("tiny", precision="nf4", vision_precision="bf16", device="cpu", seed=3)
    b = build("tiny", precision="nf4", vision_precision="bf16", device="cpu", seed=3, offload=BOTH)
    assert torch.equal(_logits(a, True), _logits(b, True))


def test_lm_head_precision(tiny_dir):
    lm = quant.load(tiny_dir, precision="nf4", lm_head_precision="int8", device="cpu")
    assert lm.describe()["layers"]["lm_head"] == {"Linear8bitLt": 1}
    assert lm.spec.label() == "nf4+head-int8"
    assert quant.load(tiny_dir, precision="bf16", device="cpu").describe()["layers"]["lm_head"] == {"Linear": 1}


def test_what_cannot_be_streamed_is_refused_before_loading(tiny_dir):
    with pytest.raises(ValueError, match="int8"):
        quant.load(tiny_dir, precision="nf4", vision_precision="int8", device="cpu", offload=("vision",))
    with pytest.raises(ValueError, match="--offload takes"):
        parse_offload("vision,gpu")
    assert parse_offload("none") == () and parse_offload("embeddings, vision") == BOTH


@pytest.mark.parametrize("vision_size", [56, 84])
def test_a_smaller_vision_size_streams_the_same(tiny_dir, vision_size):
    kw = dict(precision="fp32", device="cpu", vision_size=vision_size)
    resident, placed = quant.load(tiny_dir, **kw), quant.load(tiny_dir, **kw, offload=BOTH)
    assert torch.equal(_logits(resident, True), _logits(placed, True))
    # the low-detail path: an image at another size through the same streamed tower
    px = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        assert torch.equal(resident.model.transformer.vision(px), placed.model.transformer.vision(px))
