"""Image preprocessing: RGB + EXIF, bicubic stretch, CLIP normalization, and the guards against bad input."""

from __future__ import annotations

import io
import struct

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
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(t[:, 10, 10], torch.tensor(expected))


def test_bicubic_stretch_matches_pil_exactly():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))
    t = ImageProcessor(112)(im)
    ref = np.asarray(im.resize((112, 112), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(
        CLIP_STD
    ).view(3, 1, 1)
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


# ---- untrusted input: decoder allow-list, size check before any decoding, safe messages ------------------------

ACCEPTED = ("PNG", "JPEG", "WebP", "GIF", "BMP", "TIFF")


def _saved(fmt: str, size=(32, 24), color=(10, 200, 30), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def decoders(monkeypatch):
    """Counts pixel decoders created: Pillow's codec lookup (every ImageFile.load) and libwebp's decoder."""
    from PIL import WebPImagePlugin

    calls = []
    real_getdecoder, real_webp = Image._getdecoder, WebPImagePlugin._webp

    def getdecoder(*a, **kw):
        calls.append(a[1] if len(a) > 1 else "?")
        return real_getdecoder(*a, **kw)

    class Webp:
        def __getattr__(self, name):
            return getattr(real_webp, name)

        def WebPAnimDecoder(self, *a):  # noqa: N802 — the name libwebp's binding has
            calls.append("webp")
            return real_webp.WebPAnimDecoder(*a)

    monkeypatch.setattr(Image, "_getdecoder", getdecoder)
    monkeypatch.setattr(WebPImagePlugin, "_webp", Webp())
    return calls


def test_allowed_formats_is_the_documented_list():
    from glm4v import image_processor

    assert image_processor.ALLOWED_FORMATS == ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format_decodes(fmt):
    out = open_image(_saved(fmt, color=(250, 10, 10)), max_pixels=1_000_000)
    assert out.mode == "RGB" and out.size == (32, 24)
    r, g, b = out.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("fmt", ["ICO", "ICNS", "PPM", "TGA", "PCX", "SGI", "DDS", "QOI", "JPEG2000"])
def test_other_formats_are_refused_naming_the_accepted_ones(fmt, decoders):
    with pytest.raises(ImageError) as e:
        open_image(_saved(fmt))
    assert all(name in str(e.value) for name in ACCEPTED), str(e.value)
    assert decoders == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO"])
def test_no_pixel_is_decoded_before_the_size_check(fmt, decoders):
    """1200×1000 over a 1 M pixel cap: refused from the header (or the format), with no decoder ever created — the
    WebP canvas included, which libwebp allocates when its decoder is made, and ICO, which decodes while opening."""
    if fmt == "ICO":  # one entry holding a 1200×1000 PNG (Pillow decodes its real size, whatever the entry says)
        png = _saved("PNG", size=(1200, 1000))
        data = struct.pack("<HHHBBBBHHII", 0, 1, 1, 0, 0, 0, 0, 1, 32, len(png), 22) + png
    else:
        data = _saved(fmt, size=(1200, 1000), **({"lossless": True} if fmt == "WEBP" else {}))
    with pytest.raises(ImageError, match="over the limit" if fmt != "ICO" else "accepted format"):
        open_image(data, max_pixels=1_000_000)
    assert decoders == []


def test_multi_frame_images_use_the_first_frame_only(decoders):
    """Page 2 of the TIFF is over the pixel cap, frame 2 of the GIF is blue: neither is decoded nor used."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (250, 0, 0)).save(
        buf, "TIFF", save_all=True, append_images=[Image.new("RGB", (1200, 1000), (0, 0, 250))]
    )
    out = open_image(buf.getvalue(), max_pixels=1_000_000)
    assert out.size == (40, 30) and out.getpixel((3, 3)) == (250, 0, 0)
    assert len(decoders) == 1
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (250, 0, 0)).save(
        buf, "GIF", save_all=True, append_images=[Image.new("RGB", (40, 30), (0, 0, 250))]
    )
    r, g, b = open_image(buf.getvalue()).getpixel((3, 3))
    assert r > 200 and b < 60


def test_pillows_own_bomb_guard_is_reported_without_its_text(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 32×24 = 768 pixels warns; 64×48 is over 2× → error
    with pytest.raises(ImageError) as e:
        open_image(_saved("PNG", size=(64, 48)), max_pixels=1_000_000)
    assert str(e.value) == "image is over the limit of 2,000 pixels"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_corrupt_image_message_is_fixed_text(fmt):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(ImageError) as e:
        open_image(data)
    assert str(e.value) == "image data is corrupt or truncated and could not be decoded"


def test_paths_are_opened_with_the_allow_list_too(tmp_path):
    (tmp_path / "ok.png").write_bytes(_saved("PNG"))
    (tmp_path / "icon.png").write_bytes(_saved("ICO"))  # the name does not choose the decoder
    assert open_image(tmp_path / "ok.png").size == (32, 24)
    assert ImageProcessor(56)(str(tmp_path / "ok.png")).shape == (3, 56, 56)
    with pytest.raises(ImageError, match="accepted format"):
        open_image(tmp_path / "icon.png")
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "missing.png")
    assert str(tmp_path) not in str(e.value)


def _tiled_tiff(side: int, tile: int) -> bytes:
    """A side×side grayscale TIFF stored as one deflate-compressed tile×tile tile, built by hand."""
    import zlib

    body = zlib.compress(bytes(tile * tile))
    entries = [
        (256, 3, side),
        (257, 3, side),
        (258, 3, 8),
        (259, 3, 8),
        (262, 3, 1),
        (277, 3, 1),
        (322, 4, tile),
        (323, 4, tile),
        (324, 4, 8 + 2 + 10 * 12 + 4),
        (325, 4, len(body)),
    ]
    out = b"II*\0" + struct.pack("<IH", 8, len(entries))
    for tag, typ, value in entries:
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, 1) + packed
    return out + b"\0\0\0\0" + body


def test_tiff_tile_size_is_bounded_before_decoding(decoders):
    """16×16 pixels in one 8192×8192 tile: a 64 KB file for which libtiff would allocate a 64 MB tile buffer."""
    assert open_image(_tiled_tiff(16, 256), max_pixels=1_000_000).size == (16, 16)  # ordinary tiles are fine
    decoders.clear()
    with pytest.raises(ImageError, match="tiles"):
        open_image(_tiled_tiff(16, 8192), max_pixels=1_000_000)
    assert decoders == []
