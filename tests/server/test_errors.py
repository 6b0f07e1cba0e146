"""Every bad input answers its status in the OpenAI error envelope, and the server still serves the next request."""

from __future__ import annotations

import base64
import os

import openai
import pytest

from ..support import data_url, png_bytes, user_with_image

GOOD = {"model": "glm-4v-9b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _counts(usage: dict) -> tuple:
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


def _deep(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def msg(content) -> dict:
    return {"model": "glm-4v-9b", "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def image_msg(url: str, **extra) -> dict:
    return {"model": "glm-4v-9b", "messages": [user_with_image(url)], "max_tokens": 2, **extra}


def assert_envelope(r, status: int, code=None, param=None, says: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert says.lower() in err["message"].lower()
    return err


# (id, payload or raw bytes, status, code, param, a phrase the message must contain)
CASES = [
    ("broken-json", b'{"messages": [', 400, None, None, "not valid JSON"),
    ("not-an-object", b"[1, 2]", 400, None, None, "JSON object"),
    ("nested-bomb", b'{"messages": ' + b"[" * 100_000, 400, None, None, "nested"),
    ("not-utf8", b'{"messages": "\xff\xfe"}', 400, None, None, "not valid JSON"),
    ("no-messages", {"model": "glm-4v-9b"}, 400, None, "messages", ""),
    ("empty-messages", {"messages": []}, 400, None, "messages", ""),
    ("all-empty", msg(""), 400, None, "messages", "empty"),
    ("unknown-role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None, "messages.0.role", "wizard"),
    ("tool-role", {"messages": [{"role": "tool", "content": "42"}]}, 400, None, "messages.0.role", "tool"),
    (
        "audio-part",
        msg([{"type": "input_audio", "input_audio": {"data": "x"}}]),
        400,
        None,
        "messages.0.content.0",
        "input_audio",
    ),
    ("bad-base64", image_msg("data:image/png;base64,@@@not*base64@@@"), 400, None, "messages.0.content.1", "base64"),
    ("not-an-image", image_msg(data_url(b"hello, these bytes are not an image")), 400, None, None, "image"),
    ("one-pixel", image_msg(data_url(png_bytes((1, 1)))), 400, None, None, "at least"),
    ("too-many-pixels", image_msg(data_url(png_bytes((1200, 1000)))), 413, "payload_too_large", None, "pixels"),
    ("too-many-bytes", image_msg(data_url(os.urandom(210_000))), 413, "payload_too_large", None, "limit"),
    (
        "two-images-in-one-message",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                    ],
                }
            ]
        },
        400,
        "too_many_images",
        "messages.0.content.1",
        "one image",
    ),
    (
        "metadata-ip",
        image_msg("http://169.254.169.254/latest/meta-data/"),
        400,
        "image_url_forbidden",
        None,
        "non-public",
    ),
    ("localhost", image_msg("http://localhost:9/x.png"), 400, "image_url_forbidden", None, "non-public"),
    ("mapped-loopback", image_msg("http://[::ffff:127.0.0.1]:9/x.png"), 400, "image_url_forbidden", None, ""),
    ("ftp", image_msg("ftp://example.com/x.png"), 400, None, None, "scheme"),
    ("etc-passwd", image_msg("file:///etc/passwd"), 400, None, None, "outside"),
    ("unknown-model", {**GOOD, "model": "gpt-4o"}, 404, "model_not_found", "model", "gpt-4o"),
    (
        "prompt-too-long",
        {"messages": [{"role": "user", "content": "word " * 400}]},
        400,
        "context_length_exceeded",
        "messages",
        "no room",
    ),
    ("n2", {**GOOD, "n": 2}, 400, None, "n", "n > 1"),
    ("top-logprobs-alone", {**GOOD, "top_logprobs": 2}, 400, None, "top_logprobs", "logprobs: true"),
    ("top-logprobs-21", {**GOOD, "logprobs": True, "top_logprobs": 21}, 400, None, "top_logprobs", ""),
    ("tools", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, None, "tools", "tool"),
    ("regex-format", {**GOOD, "response_format": {"type": "regex"}}, 400, None, "response_format.type", "regex"),
    (
        "deep-schema",
        {**GOOD, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _deep(200)}}},
        400,
        None,
        "response_format.json_schema.schema",
        "nested",
    ),
    ("seventeen-stops", {**GOOD, "stop": [f"s{i}" for i in range(17)]}, 400, None, "stop", "at most 16"),
    ("long-stop", {**GOOD, "stop": ["x" * 257]}, 400, None, "stop", "256 characters"),
    ("hot", {**GOOD, "temperature": 5}, 400, None, "temperature", ""),
    ("zero-tokens", {**GOOD, "max_tokens": 0}, 400, None, "max_tokens", ""),
    ("huge-seed", {**GOOD, "seed": 2**70}, 400, None, "seed", ""),
    (
        "detail-ultra",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes()), "detail": "ultra"}}],
                }
            ]
        },
        400,
        None,
        None,
        "",
    ),
    (
        "body-too-large",
        {"messages": [{"role": "user", "content": "x" * 1_100_000}]},
        413,
        "payload_too_large",
        None,
        "max-request-bytes",
    ),
]


@pytest.mark.parametrize("payload,status,code,param,says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_answers_envelope_then_server_still_serves(api, payload, status, code, param, says):
    if isinstance(payload, bytes):
        r = api.post(content=payload, headers={"Content-Type": "application/json"})
    else:
        r = api.post(payload)
    assert_envelope(r, status, code, param, says)
    assert api.post(GOOD).status_code == 200


def test_private_http_url_refused_without_the_flag(api, image_site):
    """The same local URL the permissive server fetches (test_chat_api) is refused here, before any connection."""
    err = assert_envelope(api.post(image_msg(f"{image_site}/red.png")), 400, "image_url_forbidden")
    assert "127.0.0.1" in err["message"] and "--allow-private-urls" in err["message"]


@pytest.mark.parametrize("name", ["escape.png", "../outside/secret.png", "missing.png", ""])
def test_file_urls_cannot_leave_the_allowed_folder(api, media_dir, name):
    r = api.post(image_msg(f"file://{media_dir}/{name}"))
    assert_envelope(r, 400)
    assert "secret" not in r.text  # the refusal says nothing about what lies outside
    assert api.post(GOOD).status_code == 200


def test_file_urls_refused_when_no_folder_is_allowed(base_settings, tiny_fp32, media_dir):
    from dataclasses import replace

    from ..support import serve

    with serve(replace(base_settings, allowed_local_media_path=None), tiny_fp32) as s:
        assert_envelope(s.post(image_msg(f"file://{media_dir}/red.png")), 400, says="disabled")


def test_multi_image_policy_first_keeps_the_first_image(base_settings, tiny_fp32):
    from dataclasses import replace

    from ..support import serve

    red, blue = data_url(png_bytes()), data_url(png_bytes(color=(0, 0, 255)))
    two = {"messages": [user_with_image(red), user_with_image(blue)], "max_tokens": 4, "temperature": 0}
    with serve(replace(base_settings, multi_image="first"), tiny_fp32) as s:
        both = s.post(two).json()
        first = s.post(
            {
                **two,
                "messages": [
                    user_with_image(red),
                    {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}]},
                ],
            }
        ).json()
        assert both["choices"][0]["message"] == first["choices"][0]["message"]
        assert _counts(both["usage"]) == _counts(first["usage"])  # cached_tokens: the second reused the first


def test_max_tokens_beyond_the_context_is_clamped_or_rejected(api, base_settings, tiny_fp32):
    """Continue sends max_tokens 4096 by default: clamped to the room left (the default, as llama.cpp and Ollama do),
    or OpenAI's 400 with --max-tokens-policy reject. Without max_tokens the whole rest of the context may be used."""
    from dataclasses import replace

    from ..support import serve

    body = {**GOOD, "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    r = api.post(body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] == 256 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.headers["x-glm4v-max-tokens-clamped"] == f"250->{256 - usage['prompt_tokens']}"
    with api.client().chat.completions.with_streaming_response.create(
        model="glm-4v-9b", messages=GOOD["messages"], max_tokens=250, stream=True
    ) as resp:
        assert resp.headers["x-glm4v-max-tokens-clamped"].startswith("250->")
    r = api.post({**GOOD, "max_tokens": 3})
    assert "x-glm4v-max-tokens-clamped" not in r.headers
    with serve(replace(base_settings, max_tokens_policy="reject", default_max_tokens=None), tiny_fp32) as s:
        assert_envelope(s.post(body), 400, "context_length_exceeded", "messages", "256 tokens")
        no_limit = {"messages": GOOD["messages"], "temperature": 0, "ignore_eos": True}
        r = s.post(no_limit)  # no max_tokens: the rest of the context
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 256


def test_newest_image_policy_answers_about_the_new_image(api, base_settings, tiny_fp32):
    """Chat UIs resend the history: after a first image, the second upload is what the model sees (default)."""
    from dataclasses import replace

    from ..support import serve

    red, blue = data_url(png_bytes()), data_url(png_bytes(color=(0, 0, 255)))
    history = [user_with_image(red, "first picture?"), {"role": "assistant", "content": "a red square"}]
    new = user_with_image(blue, "and this one?")
    both = api.post({"messages": [*history, new], "max_tokens": 4, "temperature": 0})
    assert both.status_code == 200, both.text
    # the same as if the old image had never been sent (its text kept), and not the same as the first image
    only_new = api.post(
        {
            "messages": [{"role": "user", "content": "first picture?"}, history[1], new],
            "max_tokens": 4,
            "temperature": 0,
        }
    )
    assert both.json()["choices"][0]["message"] == only_new.json()["choices"][0]["message"]
    assert _counts(both.json()["usage"]) == _counts(only_new.json()["usage"])
    with serve(replace(base_settings, multi_image="reject"), tiny_fp32) as s:
        r = s.post({"messages": [*history, new], "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"


def test_openai_client_sees_typed_errors(api):
    client = api.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="glm-4v-9b", messages=[{"role": "user", "content": "hi"}], n=3)
    assert e.value.param == "n"
    bad_b64 = "data:image/jpeg;base64," + base64.b64encode(b"GIF89a-but-not-really").decode()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="glm-4v-9b", messages=[user_with_image(bad_b64)], stream=True)


def test_unknown_route_and_method_use_the_envelope(api):
    import httpx

    assert_envelope(httpx.get(f"{api.url}/v1/completions_typo"), 404, "not_found")
    assert_envelope(httpx.get(f"{api.url}/v1/chat/completions"), 405, "method_not_allowed")
    assert_envelope(httpx.get(f"{api.url}/v1/models/gpt-4o"), 404, "model_not_found")


def test_six_stop_strings_are_accepted(api):
    r = api.post({**GOOD, "stop": ["\n\n", "```", "</s>", "User:", "###", "<|end|>"]})  # Continue's kind of list
    assert r.status_code == 200, r.text
