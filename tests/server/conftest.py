"""Real servers for the API tests: uvicorn on a free port in a thread, the official openai client, raw httpx.

Servers share the session's tiny checkpoint models (loaded once) and start in ~0.1 s, so each concern gets its own
server with the settings it needs. ``SlowHooks`` makes the engine sleep per decode step, so tests about
cancellation, queueing, timeouts and shutdown see generation that is reliably still running.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from server.app import create_app
from server.cli import make_server
from server.settings import ServerSettings


REPO = Path(__file__).resolve().parents[2]
GLM4V_EDGE = Path(sys.executable).with_name("glm4v-edge")


class SlowHooks:
    """Engine hooks that sleep ``delay`` s per decode step: a slow GPU, deterministically."""

    def __init__(self, delay: float):
        self.delay = delay

    def on_event(self, name: str) -> None:
        if name == "token":
            time.sleep(self.delay)


class RunningServer:
    def __init__(self, app, server, thread, port: int):
        self.app, self.server, self.thread = app, server, thread
        self.url = f"http://127.0.0.1:{port}"

    @property
    def runtime(self):
        return self.app.state.runtime

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30, **kw)

    def post(self, payload=None, content: bytes | None = None, headers=None, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=payload, content=content, headers=headers,
                          timeout=30, **kw)

    def wait(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@contextmanager
def serve(settings: ServerSettings, loaded, hooks=None, wait_ready: bool = True):
    settings = replace(settings, host="127.0.0.1", port=0)
    app = create_app(settings, loaded, hooks=hooks)
    server = make_server(settings, app)
    sock = socket.socket()  # bound here, so the port is known even if the server stops at once
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive():
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    running = RunningServer(app, server, thread, port)
    if wait_ready:
        running.wait(lambda: running.runtime.state == "ready")
    try:
        yield running
    finally:
        if thread.is_alive():
            running.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: list[str], env: dict, log_path: Path, preexec_fn=None) -> tuple[subprocess.Popen, str]:
    """The real `glm4v-edge serve` command in a child process; returns once /health says 200."""
    port = free_port()
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([str(GLM4V_EDGE), "serve", "--port", str(port), *args], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def png_bytes(size=(64, 48), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user_with_image(url, text: str = "What is in this image?", detail: str | None = None) -> dict:
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": image_url}]}


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """The folder file:// URLs may read: a PNG, a JPEG, and a symlink that points outside it."""
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
            self.send_header("Location", self.path[len("/redirect"):])
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
def base_settings(media_dir) -> ServerSettings:
    """Secure defaults (no private URLs), small limits the error tests can reach, low detail at 56 px."""
    return ServerSettings(
        max_model_len=256, max_batch_size=4, max_queue=16, low_detail_size=56, default_max_tokens=32,
        allowed_local_media_path=str(media_dir), max_image_bytes=200_000, max_image_pixels=1_000_000,
        max_request_bytes=1_000_000, image_fetch_timeout=5, shutdown_timeout=5,
    )


@pytest.fixture(scope="session")
def api(base_settings, tiny_fp32):
    """The main server: fp32 tiny model, no API key, strict image URL policy."""
    with serve(base_settings, tiny_fp32) as s:
        yield s
