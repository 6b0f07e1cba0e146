"""Helpers the tests share (not tests themselves): real servers on free ports, images, engine event collection.

* :func:`serve` — a real uvicorn on a free port in a thread, around an already loaded model; :class:`RunningServer`
  gives its URL, the official openai client and raw httpx posts. :class:`SlowHooks` makes the engine sleep per
  decode step, so tests about cancellation, queueing, timeouts and shutdown see generation that is still running.
* :func:`start_serve` — the real ``glm4v-edge serve`` command in a child process.
* :func:`collect` — one engine request's events → (text, token ids, finish reason).
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
from pathlib import Path

import httpx
import openai
from PIL import Image

from glm4v import Message, generation_prompt
from server.app import create_app
from server.launch import make_server
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[1]
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
        return httpx.post(
            f"{self.url}/v1/chat/completions", json=payload, content=content, headers=headers, timeout=30, **kw
        )

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
        proc = subprocess.Popen(
            [str(GLM4V_EDGE), "serve", "--port", str(port), *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            preexec_fn=preexec_fn,
        )
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


def collect(handle):
    text, toks, reason = [], [], None
    for ev in handle:
        if ev.kind == "delta":
            text.append(ev.text)
            toks += ev.token_ids
        elif ev.kind == "finish":
            reason = ev.finish_reason
        else:
            raise ev.error
    return "".join(text), toks, reason


def prompt_ids(lm, text: str, image: bool = False) -> list[int]:
    """The generation prompt of one user message, as every front door builds it."""
    return generation_prompt(lm.tokenizer, [Message("user", text, has_image=image)]).ids


def png_stats(path):
    """(width, height, number of distinct colours) of a PNG: a blank or broken plot has one colour or fails."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        return im.width, im.height, len(colours)
