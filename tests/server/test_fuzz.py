"""Nothing a client sends crashes the server: every field given every wrong type, broken messages and bodies.

Each answer is a 200 or a 4xx in the OpenAI error envelope — never a 5xx — and the server still serves afterwards.
(`test_errors.py` pins the exact status and code for each class of mistake; this sweeps the combinations.)
"""

from __future__ import annotations

import httpx
import pytest

BASE = {"model": "glm-4v-9b", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
WRONG_VALUES = [None, 0, -1, 1.5, 10**30, "x", "", [], {}, [1], {"a": 1}, True, 1e308, "\x00", "🙂" * 3]
FIELDS = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "messages",
    "stream_options",
    "response_format",
    "tools",
    "tool_choice",
    "logprobs",
    "top_logprobs",
    "top_k",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
]


def _part(**kw):
    return {"role": "user", "content": [kw]}


BAD_MESSAGES = [
    {"role": "user"},
    {"role": "user", "content": None},
    {"role": "bogus", "content": "x"},
    {"content": "x"},
    _part(type="image_url"),
    _part(type="image_url", image_url={"url": 5}),
    _part(type="image_url", image_url={"url": "data:image/png;base64,!!!"}),
    _part(type="image_url", image_url={"url": "file:///etc/passwd"}),
    _part(type="image_url", image_url={"url": "http://169.254.169.254/x.png"}),
    _part(type="input_audio", input_audio={}),
    _part(type="text"),
    _part(type="text", text=5),
    {"role": "assistant", "content": "only assistant"},
    {"role": "tool", "content": "x"},
    {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    5,
    "str",
    None,
]
BAD_BODIES = [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"messages": []}', b"1" * 100]


def _assert_handled(r: httpx.Response, what) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"], (what, r.text[:300])


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_with_every_wrong_type(api, field):
    with httpx.Client(timeout=30) as c:
        for value in WRONG_VALUES:
            body = dict(BASE, **{field: value})
            _assert_handled(c.post(f"{api.url}/v1/chat/completions", json=body), (field, value))


def test_broken_messages_and_bodies(api):
    with httpx.Client(timeout=30) as c:
        for m in BAD_MESSAGES:
            _assert_handled(c.post(f"{api.url}/v1/chat/completions", json=dict(BASE, messages=[m])), m)
        for raw in BAD_BODIES:
            r = c.post(f"{api.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code < 500 and "error" in r.json(), (raw, r.status_code)
        assert c.get(f"{api.url}/health").status_code == 200
        ok = c.post(f"{api.url}/v1/chat/completions", json=BASE)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0
