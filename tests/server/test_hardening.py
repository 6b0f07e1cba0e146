"""Attacks on the HTTP layer, against a real uvicorn over real sockets: slow and idle connections, connection floods
under a small open-file limit, huge or oddly-shaped bodies, DNS rebinding and cross-site form posts, inputs that
used to be 500s, and the small protocol corners (HEAD /health, trailing slashes, an empty API key)."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
import socket
import time
from dataclasses import replace

import httpx
import pytest

from server.connections import RateLimitFilter
from server.protocol import MAX_MESSAGES, MAX_PARTS_PER_MESSAGE
from server.settings import ServerSettings

from ..support import serve, start_serve

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def raw_connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


@pytest.fixture(scope="module")
def strict(base_settings, tiny_fp32):
    """Short deadlines and a small connection cap, so the limits are reached in a test's time."""
    settings = replace(base_settings, header_timeout=0.5, body_timeout=0.5, max_connections=6)
    with serve(settings, tiny_fp32) as s:
        yield s


# ---- 3. slow and idle connections ---------------------------------------------------------------------------------
def test_idle_and_half_sent_request_heads_are_closed(strict):
    idle = raw_connect(strict.url)
    half = raw_connect(strict.url)
    half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: app")
    assert closed_within(idle, 3) and closed_within(half, 3)
    # A keep-alive connection must send its next head in time, too (uvicorn's keep-alive timer stops at the first
    # byte, so a head trickled after a response would otherwise be held forever).
    ka = raw_connect(strict.url)
    ka.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    time.sleep(0.2)
    ka.sendall(b"GET /hea")
    assert b"200 OK" in read_response(ka, 3)


def test_a_slow_body_gets_408_in_the_envelope(strict):
    s = raw_connect(strict.url)
    body = json.dumps(HI).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    started = time.monotonic()
    for byte in body[:2]:  # one byte every 0.2 s, then nothing: a body that would take forever
        s.sendall(bytes([byte]))
        time.sleep(0.2)
    answer = read_response(s, 3)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(payload)["error"]["code"] == "body_timeout"
    assert time.monotonic() - started < 5
    assert httpx.post(f"{strict.url}/v1/chat/completions", json=HI, timeout=30).status_code == 200


def test_connections_over_the_cap_are_refused_at_once_and_health_recovers(strict):
    held = [raw_connect(strict.url) for _ in range(6)]
    try:
        extra = raw_connect(strict.url)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_response(extra, 3)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b'"too_many_connections"' in answer
    finally:
        for s in held:
            s.close()
    strict.wait(lambda: httpx.get(f"{strict.url}/health", timeout=5).status_code == 200)


def test_request_timeout_covers_the_preparation(base_settings, tiny_fp32, monkeypatch):
    with serve(replace(base_settings, request_timeout=0.5), tiny_fp32) as s:

        async def stalled(url):
            await asyncio.sleep(30)

        monkeypatch.setattr(s.runtime.images, "load_bytes", stalled)
        started = time.monotonic()
        r = s.post(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                    }
                ]
            }
        )
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 5


def test_a_connection_flood_under_a_small_file_limit_neither_locks_out_health_nor_floods_the_log(tiny_dir, tmp_path):
    def small_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    log_path = tmp_path / "serve.log"
    proc, url = start_serve(
        ["--model", str(tiny_dir), "--precision", "fp32", "--header-timeout", "2"],
        {},
        log_path,
        preexec_fn=small_fd_limit,
    )
    socks = []
    try:
        assert "--max-connections 128 lowered to" in log_path.read_text()
        host, port = url.removeprefix("http://").split(":")
        for _ in range(300):  # more sockets than the server may hold descriptors
            try:
                socks.append(socket.create_connection((host, int(port)), timeout=0.5))
            except OSError:  # the kernel's accept queue is full: flooded indeed
                break
        time.sleep(1.0)
        deadline = time.monotonic() + 15
        while True:  # refused connections are answered at once; idle ones close after --header-timeout
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "health stayed locked out"
            time.sleep(0.2)
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert log_path.stat().st_size < 100_000, log_path.read_text()[-2000:]


def test_the_accept_error_log_line_is_rate_limited():
    f = RateLimitFilter("socket.accept() out of system resource", interval_s=60)

    def record():
        return logging.LogRecord(
            "asyncio",
            logging.ERROR,
            __file__,
            1,
            "socket.accept() out of system resource\nsocket: <x>",
            None,
            (OSError, OSError(24, "Too many open files"), None),
        )

    first = record()
    assert f.filter(first) and first.exc_info is None
    assert not any(f.filter(record()) for _ in range(1000))
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "something else", None, None)
    assert f.filter(other)


# ---- 4. and 5. oversized and oddly-shaped bodies ------------------------------------------------------------------
def test_too_many_messages_or_parts_are_refused_before_validation(api):
    r = api.post({"messages": [{"role": "user", "content": ""}] * (MAX_MESSAGES + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert f"at most {MAX_MESSAGES:,}" in r.json()["error"]["message"]
    parts = [{"type": "text", "text": "a"}] * (MAX_PARTS_PER_MESSAGE + 1)
    r = api.post({"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing(api, monkeypatch):
    tok = api.runtime.loaded.tokenizer
    limit = api.runtime.max_prompt_chars
    assert limit == api.runtime.engine.max_model_len * tok.max_token_bytes
    calls = []
    monkeypatch.setattr(tok, "encode", lambda text: calls.append(len(text)) or [])
    r = api.post(
        {
            "messages": [
                {"role": "system", "content": "x" * (limit // 2)},
                {"role": "user", "content": "y" * (limit // 2 + 1)},
            ]
        }
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in r.json()["error"]["message"]
    assert calls == []


def test_preparation_is_bounded_and_admission_past_it_is_429(base_settings, tiny_fp32, monkeypatch):
    with serve(replace(base_settings, max_preparing=1, max_queue=1), tiny_fp32) as s:
        release = asyncio.Event()
        entered = []

        async def slow(url):
            entered.append(url)
            await release.wait()
            raise AssertionError("not reached")

        monkeypatch.setattr(s.runtime.images, "load_bytes", slow)
        image = {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}
            ]
        }

        async def scenario():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                first = asyncio.ensure_future(c.post("/v1/chat/completions", json=image))
                await asyncio.sleep(0.5)
                second = asyncio.ensure_future(c.post("/v1/chat/completions", json=image))
                await asyncio.sleep(0.5)
                third = await c.post("/v1/chat/completions", json=image)
                assert len(entered) == 1  # one in preparation, one waiting with its body unread
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                first.cancel()
                second.cancel()

        asyncio.run(scenario())


def test_default_limits_fit_one_full_size_image_with_room_to_spare():
    d = ServerSettings()
    assert d.max_image_bytes * 4 / 3 + 1_000_000 < d.max_request_bytes <= 32 * 2**20
    assert d.max_image_pixels <= 4096 * 4096 and d.max_connections <= 128


# ---- 6. Host and Content-Type -------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "192.168.1.5"])
def test_a_keyless_loopback_server_refuses_foreign_host_names(api, host):
    for r in (
        httpx.get(f"{api.url}/v1/models", headers={"Host": host}),
        httpx.post(f"{api.url}/v1/chat/completions", json=HI, headers={"Host": host}),
    ):
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        assert "--allowed-hosts" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "127.0.0.1", "127.1.2.3:80", "[::1]:8000", "app.localhost"]
)
def test_loopback_host_names_are_served(api, host):
    assert httpx.get(f"{api.url}/v1/models", headers={"Host": host}).status_code == 200


def test_allowed_hosts_and_api_keys(base_settings, tiny_fp32):
    with serve(replace(base_settings, allowed_hosts="box.lan"), tiny_fp32) as s:
        assert httpx.get(f"{s.url}/health", headers={"Host": "box.lan:8000"}).status_code == 200
        assert httpx.get(f"{s.url}/health", headers={"Host": "other.lan"}).status_code == 403
    with serve(replace(base_settings, api_key="k"), tiny_fp32) as s:  # a key stops rebinding pages anyway
        assert httpx.get(f"{s.url}/health", headers={"Host": "box.lan"}).status_code == 200


# ---- 7. client input that used to be a 500 ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    ],
)
def test_unparseable_numbers_are_400(api, body):
    r = api.post(content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert r.headers.get("connection") != "close"


def test_a_client_gone_mid_upload_is_a_quiet_499(api, caplog):
    caplog.set_level(logging.INFO)
    s = raw_connect(api.url)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"messages": ['
    )
    time.sleep(0.3)
    s.close()
    api.wait(lambda: "client disconnected while sending its request" in caplog.text)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert api.post(HI).status_code == 200


# ---- 9. and 10. ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "   ", "\t"])
def test_an_empty_api_key_refuses_to_start(key):
    with pytest.raises(ValueError, match="GLM4V_API_KEY"):
        ServerSettings(api_key=key)


def test_head_health_and_paths_with_extra_slashes(api):
    r = httpx.head(f"{api.url}/health")
    assert r.status_code == 200 and r.content == b""
    for path in ("/v1/chat/completions/", "/v1//chat/completions", "//v1/chat/completions"):
        r = httpx.post(f"{api.url}{path}", json=HI, headers={"Host": "localhost"}, follow_redirects=False)
        assert r.status_code == 200, (path, r.status_code, r.headers.get("location"))
    assert httpx.get(f"{api.url}/v1/models/").status_code == 200


# ---- 1. one request cannot end the others' generation -------------------------------------------------------------
BAD_BUT_ACCEPTED = [
    {"temperature": 1e-300},
    {"temperature": 5e-324},
    {"top_p": 1e-300},
    {"top_p": 5e-324},
    {"top_p": 0},
    {"temperature": 2, "top_p": 1e-300},
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e300},
    {"temperature": 1e-300, "presence_penalty": 2, "frequency_penalty": -2, "top_k": 1},
]
OUT_OF_RANGE = [
    {"temperature": -1e-300},
    {"temperature": 2.0000001},
    {"top_p": 1.5},
    {"repetition_penalty": 0},
    {"presence_penalty": 2.5},
    {"top_k": -2},
]


def finished_with(metrics_text: str, reason: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("glm4v_request_finish_total{") and f'finish_reason="{reason}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_extreme_sampling_values_never_disturb_running_streams(base_settings, tiny_fp32):
    from concurrent.futures import ThreadPoolExecutor

    from ..support import SlowHooks

    with serve(base_settings, tiny_fp32, hooks=SlowHooks(0.02)) as s:
        client = s.client()

        def stream_one(i: int) -> tuple[str, str]:
            parts, reason = [], None
            for chunk in client.chat.completions.create(
                model="glm-4v-9b",
                stream=True,
                max_tokens=200,
                temperature=0,
                messages=[{"role": "user", "content": f"stream {i}"}],
                extra_body={"ignore_eos": True},
            ):
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    reason = chunk.choices[0].finish_reason or reason
            return "".join(parts), reason

        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(stream_one, i) for i in range(3)]
            s.wait(lambda: s.runtime.engine.stats().running >= 3)
            for params in BAD_BUT_ACCEPTED:
                r = s.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **params})
                assert r.status_code == 200, (params, r.text)
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            for params in OUT_OF_RANGE:
                r = s.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **params})
                assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (params, r.text)
            assert s.runtime.engine.stats().running >= 3  # still decoding: the bad requests ran beside them
            results = [f.result(timeout=60) for f in streams]
        assert all(reason == "length" for _, reason in results)
        metrics = httpx.get(f"{s.url}/metrics").text
        assert finished_with(metrics, "error") == 0
        assert finished_with(metrics, "length") + finished_with(metrics, "stop") == 3 + len(BAD_BUT_ACCEPTED)


def test_a_base_url_without_v1_works_too(api):
    from openai import OpenAI

    client = OpenAI(base_url=api.url, api_key="none", max_retries=0, timeout=30)  # no /v1
    assert client.models.list().data[0].id == "glm-4v-9b"
    r = client.chat.completions.create(model="glm-4v", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{api.url}//models").status_code == 200
