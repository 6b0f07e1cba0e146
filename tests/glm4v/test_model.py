"""The network: reference math, image splice, compressed positions, KV cache, text-only, batching."""

from __future__ import annotations

import pytest
import torch

from glm4v import Message, build_prompt
from glm4v.positions import expand_position_ids

from .reference_impl import Reference


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return Reference(tiny_dir)


def _prompt(lm, text="What is in this image?", image=True):
    return build_prompt(lm.tokenizer, [Message("user", text, has_image=image)]).ids


def test_logits_match_independent_reference_with_image(tiny_fp32, reference, red_image):
    ids = _prompt(tiny_fp32)
    px = tiny_fp32.image_processor(red_image)
    with torch.no_grad():
        out = tiny_fp32.model(torch.tensor([ids]), pixel_values=px[None])
    ref_logits, ref_pos = reference.logits(ids, px)
    assert out.logits.shape == (1, len(ids) - 3 + tiny_fp32.image_tokens(), tiny_fp32.config.padded_vocab_size)
    assert torch.equal(out.position_ids[0], ref_pos)
    torch.testing.assert_close(out.logits[0], ref_logits, atol=2e-4, rtol=1e-4)


def test_logits_match_independent_reference_text_only(tiny_fp32, reference):
    ids = _prompt(tiny_fp32, "Hello there, how are you?", image=False)
    with torch.no_grad():
        out = tiny_fp32.model(torch.tensor([ids]))
    ref_logits, _ = reference.logits(ids)
    assert out.logits.shape[1] == len(ids)  # no image, no expansion, no dummy image
    torch.testing.assert_close(out.logits[0], ref_logits, atol=2e-4, rtol=1e-4)


def test_compressed_positions_of_standard_prompt(tiny_fp32, red_image):
    """docs/MODEL.md §4.5: boi at index 4 gets 4, every patch 5, eoi 6, text continues at 7."""
    ids = _prompt(tiny_fp32)
    cfg = tiny_fp32.config
    assert ids[4] == cfg.boi_token_id and ids[6] == cfg.eoi_token_id
    px = tiny_fp32.image_processor(red_image)
    with torch.no_grad():
        pos = tiny_fp32.model(torch.tensor([ids]), pixel_values=px[None]).position_ids[0].tolist()
    patches = tiny_fp32.image_tokens() - 2
    assert pos[:5] == [0, 1, 2, 3, 4]
    assert pos[5 : 5 + patches] == [5] * patches
    assert pos[5 + patches] == 6
    assert pos[5 + patches + 1 :] == list(range(7, len(ids)))
    assert len(pos) == len(ids) + patches - 1


def test_expand_position_ids_keeps_caller_numbering():
    pos = torch.tensor([10, 11, 12, 13, 14, 15])
    out = expand_position_ids(pos, boi_index=2, num_patches=4)
    assert out.tolist() == [10, 11, 12, 13, 13, 13, 13, 14, 15]


def test_image_embeddings_replace_the_three_image_tokens(tiny_fp32, red_image):
    """The splice drops the boi/placeholder/eoi token embeddings: changing those ids must not change logits."""
    cfg = tiny_fp32.config
    ids = _prompt(tiny_fp32)
    px = tiny_fp32.image_processor(red_image)
    with torch.no_grad():
        a = tiny_fp32.model(torch.tensor([ids]), pixel_values=px[None]).logits
        ids2 = list(ids)
        ids2[5] = 42  # the placeholder
        b = tiny_fp32.model(torch.tensor([ids2]), pixel_values=px[None]).logits
        feats = tiny_fp32.model.encode_images(px[None])
    assert torch.equal(a, b)
    assert feats.shape == (1, tiny_fp32.image_tokens(), cfg.hidden_size)


def test_malformed_image_tokens_are_rejected(tiny_fp32, red_image):
    cfg = tiny_fp32.config
    ids = _prompt(tiny_fp32)
    px = tiny_fp32.image_processor(red_image)
    bad = list(ids)
    bad[6] = 42  # eoi no longer two after boi
    with pytest.raises(ValueError, match="image tokens malformed"):
        tiny_fp32.model(torch.tensor([bad]), pixel_values=px[None])
    no_boi = [i for i in ids if i not in (cfg.boi_token_id, cfg.eoi_token_id)]
    with pytest.raises(ValueError, match="begin_of_image"):
        tiny_fp32.model(torch.tensor([no_boi]), pixel_values=px[None])


@pytest.mark.parametrize("with_image", [True, False])
def test_prefill_then_decode_equals_full_forward(tiny_fp32, red_image, with_image):
    model = tiny_fp32.model
    ids = _prompt(tiny_fp32, image=with_image)
    px = tiny_fp32.image_processor(red_image)[None] if with_image else None
    cache = model.new_cache(max_len=256)
    seq = list(ids)
    with torch.no_grad():
        step = model(torch.tensor([ids]), pixel_values=px, cache=cache).logits[:, -1]
        for _ in range(6):
            nxt = int(step[0].argmax())
            seq.append(nxt)
            step = model(torch.tensor([[nxt]]), cache=cache).logits[:, -1]
            full = model(torch.tensor([seq]), pixel_values=px).logits[:, -1]
            torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    expanded = len(seq) + (tiny_fp32.image_tokens() - 3 if with_image else 0)
    assert cache.lengths[0] == expanded
    assert cache.next_positions[0] == len(seq)  # compressed numbering continues after the image


def test_chunked_prefill_matches_single_prefill(tiny_fp32):
    """A prompt fed in two pieces through the cache gives the same last logits as one piece."""
    model = tiny_fp32.model
    ids = _prompt(tiny_fp32, "one two three four five six seven eight nine ten", image=False)
    with torch.no_grad():
        one = model(torch.tensor([ids])).logits[:, -1]
        cache = model.new_cache(max_len=64)
        model(torch.tensor([ids[:7]]), cache=cache)
        two = model(torch.tensor([ids[7:]]), cache=cache).logits[:, -1]
    torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-4)


def test_batched_decode_rows_at_different_lengths(tiny_fp32):
    """Rows of one cache at different fill levels decode together like each alone (the engine's hot path)."""
    model = tiny_fp32.model
    prompts = [_prompt(tiny_fp32, t, image=False) for t in ("short", "a much longer question about colours", "hm?")]
    cache = model.new_cache(max_len=64, max_batch=3)
    with torch.no_grad():
        last = [model(torch.tensor([p]), cache=cache, cache_row=r).logits[0, -1] for r, p in enumerate(prompts)]
        toks = [int(row.argmax()) for row in last]
        batched = model(torch.tensor(toks)[:, None], cache=cache, cache_row=0).logits[:, -1]
        for r, p in enumerate(prompts):
            alone = model(torch.tensor([p + [toks[r]]])).logits[0, -1]
            torch.testing.assert_close(batched[r], alone, atol=1e-4, rtol=1e-4)


def test_batch_of_two_images_in_one_forward(tiny_fp32, red_image):
    from PIL import Image

    ids = _prompt(tiny_fp32)
    px = torch.stack(
        [tiny_fp32.image_processor(red_image), tiny_fp32.image_processor(Image.new("RGB", (64, 64), "blue"))]
    )
    with torch.no_grad():
        both = tiny_fp32.model(torch.tensor([ids, ids]), pixel_values=px).logits
        first = tiny_fp32.model(torch.tensor([ids]), pixel_values=px[:1]).logits
    torch.testing.assert_close(both[:1], first, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


def test_cache_overflow_is_an_error(tiny_fp32):
    model = tiny_fp32.model
    cache = model.new_cache(max_len=8)
    with pytest.raises(ValueError, match="cache holds 8"):
        model(torch.tensor([list(range(9))]), cache=cache)
