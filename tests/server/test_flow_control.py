"""Generation under pressure: client disconnects, a full queue, timeouts, out-of-memory, graceful shutdown."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import httpx
import openai
import pytest
import torch

import quant

from ..support import SlowHooks, serve

LONG = {
    "model": "glm-4v-9b",
    "messages": [{"role": "user", "content": "go on"}],
    "max_tokens": 200,
    "temperature": 0,
    "ignore_eos": True,
}


def metric(server, name: str, missing_ok: bool = False, **labels) -> float:
    """One sample from /metrics (summed over series matching ``labels``)."""
    total, found = 0.0, False
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total, found = total + float(line.rsplit(" ", 1)[1]), True
    assert found or missing_ok, f"{name} {labels} not in /metrics"
    return total


@pytest.fixture(scope="module")
def slow(base_settings, tiny_fp32):
    """10 ms per decode step: a 200-token answer takes ~2 s, so there is time to act while it runs."""
    with serve(replace(base_settings, max_batch_size=1, max_queue=1), tiny_fp32, hooks=SlowHooks(0.01)) as s:
        yield s


def test_stream_disconnect_stops_generation(slow):
    engine = slow.runtime.engine
    before = metric(slow, "glm4v_request_finish_total", missing_ok=True, finish_reason="cancelled")
    tokens_before = metric(slow, "glm4v_generation_tokens_total", missing_ok=True)
    with httpx.stream("POST", f"{slow.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(5)]
        assert any('"content"' in line for line in got)
    slow.wait(lambda: engine.stats().running == 0, timeout=1.0)  # far sooner than the ~2 s the answer needs
    assert metric(slow, "glm4v_request_finish_total", finish_reason="cancelled") == before + 1
    assert metric(slow, "glm4v_generation_tokens_total") - tokens_before < 100  # of the 200 asked for


def test_non_stream_disconnect_stops_generation(slow):
    engine = slow.runtime.engine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow.url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(30, read=0.3))
    slow.wait(lambda: engine.stats().running == 0, timeout=1.0)
    assert engine.stats().waiting == 0


def test_full_queue_answers_429_with_retry_after(slow):
    engine = slow.runtime.engine
    with httpx.stream("POST", f"{slow.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30) as a:
        a_lines = a.iter_lines()  # keep the generator: dropping it closes the connection
        next(a_lines)  # a holds the only batch slot
        queued: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: queued.append(
                httpx.post(f"{slow.url}/v1/chat/completions", json={**LONG, "max_tokens": 3}, timeout=30)
            )
        )
        t.start()
        slow.wait(lambda: engine.stats().waiting == 1)
        assert metric(slow, "glm4v_requests_waiting") == 1
        with pytest.raises(openai.RateLimitError) as e:
            slow.client().chat.completions.create(model="glm-4v-9b", messages=[{"role": "user", "content": "x"}])
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.code == "queue_full"
    t.join(timeout=10)  # closing a freed the slot: the queued request ran
    assert queued[0].status_code == 200 and queued[0].json()["usage"]["completion_tokens"] == 3
    assert metric(slow, "glm4v_requests_total", status="429") == 1


def test_request_timeout(base_settings, tiny_fp32):
    with serve(replace(base_settings, request_timeout=0.4), tiny_fp32, hooks=SlowHooks(0.01)) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=LONG, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert r.headers["x-should-retry"] == "false"
        stream = s.client().chat.completions.create(
            stream=True,
            stream_options={"include_usage": True},
            model="glm-4v-9b",
            messages=LONG["messages"],
            max_tokens=200,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)  # ends cleanly: final chunk + usage + [DONE]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert 0 < chunks[-1].usage.completion_tokens < 200
        s.wait(lambda: s.runtime.engine.stats().running == 0, timeout=1.0)
        assert metric(s, "glm4v_request_finish_total", finish_reason="timeout") == 2


def test_out_of_memory_fails_the_request_and_the_server_keeps_serving(base_settings, tiny_dir):
    lm = quant.load(tiny_dir, precision="fp32", device="cpu")  # its own copy: we break its forward on purpose
    fail = {"prefill": 0, "decode": 0}
    prefill, decode = lm.model.forward_embeds, lm.model.forward

    def oom(kind, real):
        def wrapped(*a, **kw):
            if fail[kind]:
                fail[kind] -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return real(*a, **kw)

        return wrapped

    lm.model.forward_embeds, lm.model.forward = oom("prefill", prefill), oom("decode", decode)
    with serve(base_settings, lm) as s:
        client = s.client()
        fail["prefill"] = 1
        for stream in (False, True):  # before the first token: a real 503, streaming or not
            fail["prefill"] = 1
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model="glm-4v-9b", messages=LONG["messages"], stream=stream)
            assert e.value.status_code == 503 and e.value.code == "out_of_memory"
        fail["decode"] = 1  # mid-stream: an error event, then [DONE]
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json={**LONG, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "out_of_memory"
        ok = client.chat.completions.create(model="glm-4v-9b", messages=LONG["messages"], max_tokens=3)
        assert ok.usage.completion_tokens == 3


def test_graceful_shutdown_ends_streams_cleanly(base_settings, tiny_fp32):
    with serve(replace(base_settings, shutdown_timeout=0.3), tiny_fp32, hooks=SlowHooks(0.01)) as s:
        with httpx.stream(
            "POST",
            f"{s.url}/v1/chat/completions",
            timeout=30,
            json={**LONG, "stream": True, "stream_options": {"include_usage": True}},
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.server.should_exit = True  # what SIGTERM does
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        final = json.loads(rest[-3])
        assert final["choices"][0]["finish_reason"] == "length"
        assert 0 < json.loads(rest[-2])["usage"]["completion_tokens"] < 200
        s.thread.join(timeout=10)
        assert not s.thread.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/health")
