"""Hostile image input against the real server (and the library path): decoder allow-list, no Ghostscript, no
decoding before the size check, no Pillow text in responses, file:// paths that cannot be encoded."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib

import pytest
from PIL import EpsImagePlugin, IcnsImagePlugin, IcoImagePlugin, Image

from glm4v import image_processor
from glm4v.image_processor import ImageError, ImageProcessor, open_image
from server import images

from ..support import data_url, png_bytes, user_with_image

GOOD = {"model": "glm-4v-9b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ACCEPTED = ("PNG", "JPEG", "WebP", "GIF", "BMP", "TIFF")  # what the 400 must name (docs/SERVER.md)

EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)


def image_msg(url: str) -> dict:
    return {"model": "glm-4v-9b", "messages": [user_with_image(url)], "max_tokens": 2}


def saved(fmt: str, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def big_png(w: int, h: int) -> bytes:
    """A w×h grayscale PNG of zeros, built by hand: a few KB on the wire, w·h pixels when decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def ico_around(png: bytes) -> bytes:
    """An ICO whose single entry is ``png`` (the header says 256×256; Pillow decodes the PNG's real size)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def assert_refused_format(r) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    for name in ACCEPTED:
        assert name in err["message"], err["message"]
    return err["message"]


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A stand-in ``gs`` first on PATH that records every call; Pillow's cached Ghostscript lookup is reset."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "gs-was-run"
    gs = bindir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 0\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    # Control: without an allow-list Pillow really runs our gs for this EPS, so the test below can see a call.
    with pytest.raises(Exception):  # noqa: B017 — whatever Pillow raises: the point is that gs ran
        with Image.open(io.BytesIO(EPS)) as im:
            im.load()
    assert marker.exists(), "Pillow did not call the stand-in gs: the test would prove nothing"
    marker.unlink()
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


@pytest.fixture
def plugin_opens(monkeypatch):
    """Records every _open of the ICO, ICNS and EPS plugins (ICO/ICNS decode their frames while opening)."""
    calls = []
    for cls in (IcoImagePlugin.IcoImageFile, IcnsImagePlugin.IcnsImageFile, EpsImagePlugin.EpsImageFile):

        def wrapped(self, _orig=cls._open, _name=cls.format):
            calls.append(_name)
            return _orig(self)

        monkeypatch.setattr(cls, "_open", wrapped)
    return calls


def test_server_uses_the_library_allow_list():
    allowed = image_processor.ALLOWED_FORMATS
    assert images.ALLOWED_FORMATS is allowed == ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@pytest.mark.parametrize("mime", ["image/eps", "image/png"])  # the label a client gives changes nothing
def test_eps_data_url_never_reaches_ghostscript(api, fake_gs, plugin_opens, mime):
    r = api.post(image_msg(data_url(EPS, mime)))
    assert not fake_gs.exists(), f"Ghostscript was run: {fake_gs.read_text()!r}"
    assert plugin_opens == []  # the EPS plugin did not even parse the header
    message = assert_refused_format(r)
    assert "/tmp" not in message and "cannot identify" not in message
    assert api.post(GOOD).status_code == 200


def test_library_path_refuses_eps_without_ghostscript(fake_gs, plugin_opens):
    with pytest.raises(ImageError) as e:
        open_image(EPS)
    with pytest.raises(ImageError):
        ImageProcessor(56)(EPS)
    assert not fake_gs.exists(), f"Ghostscript was run: {fake_gs.read_text()!r}"
    assert plugin_opens == []
    assert all(name in str(e.value) for name in ACCEPTED) and "/tmp" not in str(e.value)


@pytest.mark.parametrize("kind", ["ico", "icns", "ico-16M-pixel-frame"])
def test_icon_formats_are_400_naming_the_accepted_formats_without_decoding(api, plugin_opens, kind):
    data = {
        "ico": lambda: saved("ICO"),
        "icns": lambda: saved("ICNS"),
        "ico-16M-pixel-frame": lambda: ico_around(big_png(4000, 4000)),
    }[kind]()
    t0 = time.monotonic()
    r = api.post(image_msg(data_url(data, "image/x-icon")))
    elapsed = time.monotonic() - t0
    assert_refused_format(r)
    assert plugin_opens == []  # the ICO/ICNS decoders never ran, so nothing was decoded before a size check
    assert elapsed < 5, f"refusing an icon took {elapsed:.1f} s"
    with pytest.raises(ImageError, match="accepted format"):
        open_image(data, max_pixels=1_000_000)
    assert plugin_opens == []
    assert api.post(GOOD).status_code == 200


def _truncated(fmt: str) -> bytes:
    rng = __import__("numpy").random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype="uint8"))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _pillow_message(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # what Pillow says about these bytes
        return str(e)
    pytest.fail("Pillow decoded the truncated image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "BMP"])
def test_pillow_error_text_never_reaches_the_client(api, fmt):
    data = _truncated(fmt)
    pillow_says = _pillow_message(data)
    r = api.post(image_msg(data_url(data)))
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert pillow_says and pillow_says not in message and "truncated (" not in message
    assert message == "image could not be used: image data is corrupt or truncated and could not be decoded"
    assert api.post(GOOD).status_code == 200


def _raw_post(api, url: str):
    body = json.dumps(image_msg(url))  # ensure_ascii: a lone surrogate travels as the JSON escape "\ud800"
    return api.post(content=body.encode("ascii"), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    "name", ["nul-tmp", "nul-inside", "nul-escaped-json", "surrogate-json", "surrogate-pct", "bad-ipv6-netloc"]
)
def test_unencodable_file_urls_are_400_and_the_server_keeps_serving(api, media_dir, name):
    url = {
        "nul-tmp": "file:///tmp/a%00b.png",
        "nul-inside": f"file://{media_dir}/a%00b.png",
        "nul-escaped-json": f"file://{media_dir}/a\x00b.png",
        "surrogate-json": f"file://{media_dir}/\ud800.png",
        "surrogate-pct": f"file://{media_dir}/%ED%A0%80.png",
        "bad-ipv6-netloc": "file://[/x.png",
    }[name]
    r = _raw_post(api, url)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert api.post(GOOD).status_code == 200


def test_file_url_with_undecodable_bytes_reaches_that_file(api, media_dir):
    """Percent-escapes are file-name bytes (not UTF-8 text): %FF names the file whose name holds byte 0xFF."""
    path = os.path.join(os.fsencode(media_dir), b"odd\xff.png")
    with open(path, "wb") as f:
        f.write(png_bytes())
    try:
        assert _raw_post(api, f"file://{media_dir}/odd%FF.png").status_code == 200
    finally:
        os.unlink(path)
