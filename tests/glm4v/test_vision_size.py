"""Running the vision tower below its trained resolution: token counts, the resampled position table, and
bit-identity at the trained size."""

from __future__ import annotations

import math

import pytest
import torch

import quant
from glm4v import Message, build_prompt
from glm4v.vision import resample_position_table


def test_token_counts_follow_the_vision_size(tiny_dir, load_tiny, red_image):
    for size, tokens in ((112, 18), (84, 11), (56, 6)):
        lm = load_tiny("fp32", vision_size=size)
        assert lm.vision_size == size and lm.image_tokens() == tokens == (size // 28) ** 2 + 2
        px = lm.image_processor(red_image)
        assert px.shape == (3, size, size)
        ids = build_prompt(lm.tokenizer, [Message("user", "hi", has_image=True)]).ids
        with torch.no_grad():
            out = lm.model(torch.tensor([ids]), pixel_values=px[None])
        assert out.logits.shape[1] == len(ids) - 3 + tokens
        patches = tokens - 2
        assert out.position_ids[0].tolist().count(5) == patches  # all patches still share one position


def test_trained_size_is_bit_identical_to_the_unmodified_model(load_tiny, red_image):
    default = load_tiny("fp32")
    explicit = load_tiny("fp32", vision_size=112)
    pe = explicit.model.transformer.vision.patch_embedding
    assert pe.position_table(pe.trained_grid) is pe.position_embedding.weight  # no resampling at all
    px = default.image_processor(red_image)[None]
    with torch.no_grad():
        assert torch.equal(default.model.encode_images(px), explicit.model.encode_images(px))


def test_resampled_grid_reproduces_a_smooth_field():
    """Position rows sampled from a smooth field on an 80×80 grid, resampled to 40 and 32, match the field."""

    def field(g, channels=6):
        c = (torch.arange(g, dtype=torch.float64) + 0.5) / g  # pixel centres in [0, 1]
        y, x = torch.meshgrid(c, c, indexing="ij")
        chans = [
            torch.sin(2 * math.pi * (k + 1) * 0.5 * x) * torch.cos(math.pi * (k % 3 + 1) * 0.5 * y)
            for k in range(channels)
        ]
        return torch.stack(chans, -1).reshape(g * g, channels)

    cls = torch.randn(1, 6, dtype=torch.float64)
    table = torch.cat([cls, field(80)]).to(torch.float32)
    for g in (40, 32, 20):
        out = resample_position_table(table, 80, g)
        assert out.shape == (1 + g * g, 6)
        assert torch.equal(out[0], table[0])  # CLS row kept
        err = (out[1:].double() - field(g)).abs()
        assert err.mean() < 0.003 and err.max() < 0.03, (g, err.mean(), err.max())  # worst at the border
    noisy = table.clone()
    noisy[1:] = torch.randn_like(noisy[1:])  # sanity: the check above is not vacuous
    assert (resample_position_table(noisy, 80, 40)[1:].double() - field(40)).abs().max() > 0.5


def test_resampling_runs_in_fp32_and_returns_the_table_dtype():
    table = torch.randn(1 + 16 * 16, 8).to(torch.bfloat16)
    out = resample_position_table(table, 16, 8)
    assert out.dtype == torch.bfloat16
    ref = resample_position_table(table.float(), 16, 8).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_resampled_tables_are_cached_per_size(load_tiny):
    lm = load_tiny("fp32", vision_size=56)
    pe = lm.model.transformer.vision.patch_embedding
    assert pe.position_table(4) is pe.position_table(4)  # computed once (at load) and reused
    assert pe.position_table(3) is not pe.position_table(4)


@pytest.mark.parametrize("size", [100, 140, 28])
def test_invalid_vision_sizes_are_refused(tiny_dir, size):
    with pytest.raises(ValueError, match="multiple of 28 between 56 and the trained size 112"):
        quant.load(tiny_dir, precision="fp32", device="cpu", vision_size=size)
