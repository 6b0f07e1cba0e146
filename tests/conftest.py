"""Shared fixtures: one tiny checkpoint per test session, in the official layout, models loaded from it, and the
servers and image sources the HTTP tests share (helpers are in :mod:`tests.support`)."""

from __future__ import annotations

import logging
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from glm4v.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sharded_dir(tmp_path_factory):
    from glm4v.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sharded", preset="tiny", seed=0, shards=3)


_loaded = {}


@pytest.fixture(scope="session")
def load_tiny(tiny_dir):
    """load_tiny(precision, vision_precision=None, **kw) → quant.LoadedModel, cached per argument set."""
    import quant

    def _load(precision="fp32", vision_precision=None, **kw):
        key = (precision, vision_precision, tuple(sorted(kw.items())))
        if key not in _loaded:
            _loaded[key] = quant.load(
                tiny_dir, precision=precision, vision_precision=vision_precision, device="cpu", **kw
            )
        return _loaded[key]

    return _load


@pytest.fixture(scope="session")
def tiny_fp32(load_tiny):
    return load_tiny("fp32")


@pytest.fixture(scope="session")
def red_image():
    from PIL import Image

    return Image.new("RGB", (200, 120), (220, 30, 30))


def pytest_configure(config):
    logging.getLogger("transformers").setLevel(logging.ERROR)


# ---- servers ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """The folder file:// URLs may read: a PNG, a JPEG, and a symlink that points outside it."""
    from .support import png_bytes

    root = tmp_path_factory.mktemp("media")
    (root / "red.png").write_bytes(png_bytes())
    (root / "blue.jpg").write_bytes(png_bytes(color=(20, 20, 220), fmt="JPEG"))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png_bytes(color=(0, 255, 0)))
    (root / "escape.png").symlink_to(outside / "secret.png")
    return root


class _ImageHandler(SimpleHTTPRequestHandler):
    """Static files, plus ``/redirect/<path>`` → 302 to ``/<path>`` and ``/big`` streaming without a length."""

    def do_GET(self):
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect") :])
            self.end_headers()
            return
        if self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def image_site(media_dir):
    """A local http server for image URLs (on 127.0.0.1, so only servers with allow_private_urls may fetch it)."""

    def handler(*a, **kw):
        return _ImageHandler(*a, directory=str(media_dir), **kw)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="session")
def base_settings(media_dir):
    """Secure defaults (no private URLs), small limits the error tests can reach, low detail at 56 px."""
    from server.settings import ServerSettings

    return ServerSettings(
        max_model_len=256,
        max_batch_size=4,
        max_queue=16,
        low_detail_size=56,
        default_max_tokens=32,
        allowed_local_media_path=str(media_dir),
        max_image_bytes=200_000,
        max_image_pixels=1_000_000,
        max_request_bytes=1_000_000,
        image_fetch_timeout=5,
        shutdown_timeout=5,
    )


@pytest.fixture(scope="session")
def api(base_settings, tiny_fp32):
    """The main server: fp32 tiny model, no API key, strict image URL policy."""
    from .support import serve

    with serve(base_settings, tiny_fp32) as s:
        yield s
