"""Image preprocessing: RGB + EXIF, bicubic stretch, CLIP normalization, and the guards against bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from glm4v.image_processor import CLIP_MEAN, CLIP_STD, ImageError, ImageProcessor, open_image


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_shape_dtype_and_normalization():
    t = ImageProcessor(56)(Image.new("RGB", (30, 70), (255, 255, 255)))
    assert t.shape == (3, 56, 56) and t.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    torch.testing.assert_close(t[:, 10, 10], torch.tensor(expected))


def test_bicubic_stretch_matches_pil_exactly():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))
    t = ImageProcessor(112)(im)
    ref = np.asarray(im.resize((112, 112), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(t, ref)


def test_size_per_call_overrides_default():
    p = ImageProcessor(112)
    assert p(Image.new("RGB", (10, 10)), size=56).shape == (3, 56, 56)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    out = open_image(buf.getvalue())
    assert out.size == (20, 40)  # portrait after applying the tag
    r, g, b = out.getpixel((10, 5))  # displayed top = stored left half (red)
    assert r > 200 and b < 60


def test_transparency_is_composited_on_white_and_modes_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert open_image(_png(rgba)).getpixel((1, 1)) == (255, 255, 255)
    gray = Image.new("L", (8, 8), 128)
    assert open_image(_png(gray)).mode == "RGB"


def test_non_image_bytes_are_rejected():
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"certainly not a picture")


def test_pixel_cap_is_checked_before_decoding():
    big = Image.new("RGB", (3000, 2000))
    with pytest.raises(ImageError, match="over the limit"):
        open_image(_png(big), max_pixels=1_000_000)


def test_degenerate_image_is_rejected():
    with pytest.raises(ImageError, match="at least"):
        open_image(_png(Image.new("RGB", (1, 50))))


def test_large_jpeg_is_decoded_at_reduced_scale():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    out = open_image(buf.getvalue(), target=448)
    assert out.size == (1000, 750)  # DCT-domain 1/2 decode: the largest reduction that keeps both sides >= 448
