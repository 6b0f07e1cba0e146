"""/v1/chat/completions through a real uvicorn with the official openai client: images from every source, streaming,
usage, sampling controls. Greedy answers are checked token-for-token against the reference decode loop."""

from __future__ import annotations

import json
from dataclasses import replace

import httpx
import pytest
from PIL import Image

from glm4v import Message, SamplingParams, build_prompt
from glm4v.generate import generate_text

from ..support import data_url, png_bytes, serve, user_with_image

RED = png_bytes()
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def expected_ids(lm, messages: list[Message]) -> list[int]:
    """The prompt the server should build: the GLM-4V template, then the assistant's metadata newline."""
    return build_prompt(lm.tokenizer, messages).ids + lm.tokenizer.encode("\n")


def reference_text(lm, ids, pixels, max_tokens: int) -> str:
    return generate_text(
        lm.model, lm.tokenizer, ids, pixels, SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True)
    )[0]


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_image_data_url_non_stream_matches_reference(api, tiny_fp32):
    lm = tiny_fp32
    r = api.client().chat.completions.create(
        model="glm-4v-9b", messages=[user_with_image(data_url(RED))], max_tokens=12, **GREEDY
    )
    ids = expected_ids(lm, [Message("user", "What is in this image?", has_image=True)])
    pixels = lm.image_processor(Image.open(__import__("io").BytesIO(RED)))
    assert r.choices[0].message.content == reference_text(lm, ids, pixels, 12)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "glm-4v-9b"
    # exact usage: the 3 image placeholder ids become image_tokens() = 18 embeddings
    assert r.usage.prompt_tokens == len(ids) - 3 + lm.image_tokens()
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.system_fingerprint.endswith("-fp32")


def test_stream_wire_format_and_include_usage(api):
    payload = {
        "model": "glm-4v-9b",
        "messages": [user_with_image(data_url(RED))],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=payload, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
        plain = sse_events(resp)
    assert plain[-1] == "[DONE]"
    chunks = [json.loads(e) for e in plain[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" and c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)  # not asked for: no usage key, no choices-less chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]

    payload["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=payload, timeout=30) as resp:
        with_usage = [json.loads(e) for e in sse_events(resp)[:-1]]
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_usage[:-1])
    assert text == "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_stream_with_openai_client_equals_non_stream(api):
    client = api.client()
    msgs = [user_with_image(data_url(RED), "describe it")]
    full = client.chat.completions.create(model="glm-4v-9b", messages=msgs, max_tokens=10, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="glm-4v-9b",
            messages=msgs,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_file_url_and_bare_string_image_url(api, media_dir, tiny_fp32):
    client = api.client()
    by_file = client.chat.completions.create(
        model="glm-4v-9b", messages=[user_with_image(f"file://{media_dir}/red.png")], max_tokens=8, **GREEDY
    )
    bare = client.chat.completions.create(
        model="glm-4v-9b",
        max_tokens=8,
        **GREEDY,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": data_url(RED)},
                ],
            }
        ],
    )
    by_data = client.chat.completions.create(
        model="glm-4v-9b", messages=[user_with_image(data_url(RED))], max_tokens=8, **GREEDY
    )
    assert by_file.choices[0].message.content == bare.choices[0].message.content == by_data.choices[0].message.content
    jpeg = client.chat.completions.create(
        model="glm-4v-9b", messages=[user_with_image(f"file://{media_dir}/blue.jpg")], max_tokens=4, **GREEDY
    )
    assert jpeg.usage.prompt_tokens == by_file.usage.prompt_tokens


def test_http_url_with_private_urls_allowed(base_settings, tiny_fp32, image_site):
    from dataclasses import replace

    with serve(replace(base_settings, allow_private_urls=True), tiny_fp32) as s:
        client = s.client()
        direct = client.chat.completions.create(
            model="glm-4v-9b", messages=[user_with_image(f"{image_site}/red.png")], max_tokens=8, **GREEDY
        )
        redirected = client.chat.completions.create(
            model="glm-4v-9b", messages=[user_with_image(f"{image_site}/redirect/red.png")], max_tokens=8, **GREEDY
        )
        inline = client.chat.completions.create(
            model="glm-4v-9b", messages=[user_with_image(data_url(RED))], max_tokens=8, **GREEDY
        )
        assert (
            direct.choices[0].message.content
            == redirected.choices[0].message.content
            == inline.choices[0].message.content
        )
        r = s.post({"messages": [user_with_image(f"{image_site}/missing.png")]})
        assert r.status_code == 400 and "404" in r.json()["error"]["message"]
        r = s.post({"messages": [user_with_image(f"{image_site}/big")]})  # 4 MiB, no Content-Length
        assert r.status_code == 413


def test_text_only_multi_turn_and_system(api, tiny_fp32):
    lm, client = tiny_fp32, api.client()
    text = client.chat.completions.create(
        model="glm-4v-9b", messages=[{"role": "user", "content": "hello"}], max_tokens=6, **GREEDY
    )
    assert text.choices[0].message.content == reference_text(lm, expected_ids(lm, [Message("user", "hello")]), None, 6)
    turns = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        user_with_image(data_url(RED), "What colour?"),
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": "And the shape?"},
    ]
    r = client.chat.completions.create(model="glm-4v-9b", messages=turns, max_tokens=6, **GREEDY)
    ids = expected_ids(
        lm,
        [
            Message("system", "Be brief."),
            Message("user", "What colour?", has_image=True),
            Message("assistant", "Red."),
            Message("user", "And the shape?"),
        ],
    )
    assert ids.count(lm.tokenizer.token_id("<|system|>")) == 1
    pixels = lm.image_processor(Image.new("RGB", (64, 48), (200, 30, 30)))
    assert r.choices[0].message.content == reference_text(lm, ids, pixels, 6)
    assert r.usage.prompt_tokens == len(ids) - 3 + lm.image_tokens()
    # 'developer' (newer OpenAI clients) is a system message
    dev = client.chat.completions.create(
        model="glm-4v-9b",
        max_tokens=6,
        **GREEDY,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    )
    sys_ = client.chat.completions.create(
        model="glm-4v-9b",
        max_tokens=6,
        **GREEDY,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    )
    assert dev.choices[0].message.content == sys_.choices[0].message.content


def test_detail_low_runs_the_image_smaller(api, tiny_fp32):
    client = api.client()
    text = client.chat.completions.create(
        model="glm-4v-9b", max_tokens=1, messages=[{"role": "user", "content": "What is in this image?"}]
    )
    usage = {
        d: client.chat.completions.create(
            model="glm-4v-9b", max_tokens=1, messages=[user_with_image(data_url(RED), detail=d)]
        ).usage.prompt_tokens
        for d in ("low", "high", "auto")
    }
    assert usage["high"] - text.usage.prompt_tokens == tiny_fp32.image_tokens() == 18  # (112/28)² + 2
    assert usage["low"] - text.usage.prompt_tokens == tiny_fp32.image_tokens(56) == 6  # (56/28)² + 2
    assert usage["auto"] == usage["high"]


def test_stop_strings_max_tokens_and_max_completion_tokens(api):
    client = api.client()
    msgs = [{"role": "user", "content": "tell me something"}]
    free = client.chat.completions.create(model="glm-4v-9b", messages=msgs, max_tokens=30, **GREEDY)
    text = free.choices[0].message.content
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 30
    k = next(i for i in range(2, len(text) - 2) if text.find(text[i : i + 2]) == i and "\ufffd" not in text[i : i + 2])
    for stop in (text[k : k + 2], [text[k : k + 2], "never-appears"]):
        cut = client.chat.completions.create(model="glm-4v-9b", messages=msgs, max_tokens=30, stop=stop, **GREEDY)
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == text[:k]
    short = client.chat.completions.create(model="glm-4v-9b", messages=msgs, max_completion_tokens=4, **GREEDY)
    assert short.usage.completion_tokens == 4 and short.choices[0].finish_reason == "length"
    default = client.chat.completions.create(model="glm-4v-9b", messages=msgs, **GREEDY)
    assert default.usage.completion_tokens == 32  # --default-max-tokens


def test_seed_makes_sampling_repeatable(api):
    client = api.client()
    kw = dict(
        model="glm-4v-9b",
        messages=[{"role": "user", "content": "pick words"}],
        max_tokens=16,
        temperature=1.0,
        top_p=0.95,
        extra_body={"ignore_eos": True, "top_k": 50, "repetition_penalty": 1.1},
    )
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=999, **kw).choices[0].message.content
    assert a == b and a != c


@pytest.mark.parametrize(
    "extra",
    [
        {
            "user": "someone",
            "store": False,
            "metadata": {"a": "b"},
            "parallel_tool_calls": False,
            "stream_options": {"include_usage": True},
            "brand_new_field": {"x": [1, 2]},
        },
        {"n": 1, "logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}},
        {"presence_penalty": 0.5, "frequency_penalty": 0.5, "top_p": 0.9, "temperature": 0.7},
    ],
)
def test_unknown_and_harmless_fields_are_accepted(api, extra):
    r = api.post({"model": "glm-4v-9b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_model_field_may_be_omitted(api):
    r = api.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "glm-4v-9b"


def test_curl_form_posts_need_the_json_header_without_a_key(api, base_settings, tiny_fp32):
    # curl -d sends application/x-www-form-urlencoded unless told otherwise. Without an API key that is refused:
    # a web page could send such a "simple" cross-origin POST without a CORS preflight. The message says the fix.
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(f"{api.url}/v1/chat/completions", timeout=30, content=body, headers=form)
    assert r.status_code == 415, r.text
    assert "-H 'Content-Type: application/json'" in r.json()["error"]["message"]
    for ctype in ("text/plain", ""):
        r = httpx.post(f"{api.url}/v1/chat/completions", timeout=30, content=body, headers={"Content-Type": ctype})
        assert r.status_code == 415
    r = httpx.post(
        f"{api.url}/v1/chat/completions",
        timeout=30,
        content=body,
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200
    # With a key, a cross-site page cannot authenticate, so the body's type does not matter.
    with serve(replace(base_settings, api_key="k"), tiny_fp32) as keyed:
        r = httpx.post(
            f"{keyed.url}/v1/chat/completions", timeout=30, content=body, headers={**form, "Authorization": "Bearer k"}
        )
        assert r.status_code == 200 and r.json()["model"] == "glm-4v-9b"
