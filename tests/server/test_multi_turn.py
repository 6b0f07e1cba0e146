"""Multi-turn chat over HTTP, history resent as chat UIs do: with the caches on, every turn's answer equals the
answer of a server with them off, the image is decoded and encoded once, and /metrics and /v1/models show it."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from ..support import data_url, png_bytes, serve, user_with_image

QUESTIONS = ["What is in this picture?", "What colour is it?", "Say it in French."]


@pytest.fixture(scope="module")
def servers(base_settings, tiny_fp32):
    on = replace(base_settings, max_model_len=512)
    off = replace(on, prefix_cache="off", image_cache_mb=0)
    with serve(on, tiny_fp32) as a, serve(off, tiny_fp32) as b:
        yield a, b


def _conversation(srv, image: str | None, stream: bool = False, image_turn: int = 0) -> list[str]:
    client, messages, answers, cached = srv.client(), [], [], []
    for i, q in enumerate(QUESTIONS):
        if image is not None and i == image_turn:
            messages.append(user_with_image(image, q))
        else:
            messages.append({"role": "user", "content": q})
        kw = dict(model="glm-4v", messages=messages, max_tokens=12, temperature=0)
        if stream:
            chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            r = client.chat.completions.create(**kw)
            text, usage = r.choices[0].message.content, r.usage
        answers.append(text)
        cached.append(usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": text})
    if srv.runtime.engine.prefix.enabled:  # turns 2 and 3 reused more than the chat template's first tokens
        assert cached[1] > 10 and cached[2] > cached[1], cached
    else:
        assert cached == [0, 0, 0]
    return answers


def _metric(srv, name: str) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("image_turn", [0, 1])
def test_every_turn_equals_the_cacheless_server(servers, stream, image_turn):
    on, off = servers
    image = data_url(png_bytes((64, 48), (10 + 40 * image_turn + stream, 200, 30)))  # a new image each time
    hits, img_hits = _metric(on, "glm4v_prefix_hits_total"), _metric(on, "glm4v_image_cache_hits_total")
    assert _conversation(on, image, stream, image_turn) == _conversation(off, image, stream, image_turn)
    assert _metric(on, "glm4v_prefix_hits_total") >= hits + 2  # turns 2 and 3 reused turn 1's row
    # the image is encoded once: later turns either reuse the row holding it or its cached features
    assert _metric(on, "glm4v_image_cache_misses_total") >= 1
    assert _metric(on, "glm4v_prefix_reused_tokens_total") > 0
    assert _metric(on, "glm4v_image_cache_hits_total") >= img_hits
    assert _metric(off, "glm4v_prefix_hits_total") == 0 and _metric(off, "glm4v_image_cache_hits_total") == 0


def test_the_same_image_in_a_new_conversation_hits_the_feature_cache(servers):
    on, _ = servers
    image = data_url(png_bytes((50, 50), (1, 2, 3)))
    client = on.client()
    ask = dict(model="glm-4v", max_tokens=3, temperature=0)
    client.chat.completions.create(messages=[user_with_image(image, "first question")], **ask)
    before = _metric(on, "glm4v_image_cache_hits_total")
    client.chat.completions.create(messages=[user_with_image(image, "a different conversation")], **ask)
    assert _metric(on, "glm4v_image_cache_hits_total") == before + 1
    low = [user_with_image(image, "a different conversation", detail="low")]  # same bytes, another vision size
    client.chat.completions.create(messages=low, **ask)
    assert _metric(on, "glm4v_image_cache_hits_total") == before + 1
    assert _metric(on, "glm4v_image_cache_bytes") <= 64 * 2**20


def test_models_shows_the_cache_settings(servers):
    on, off = servers
    card = on.client().models.list().data[0].model_dump()
    assert card["caches"]["prefix_cache"]["enabled"] is True
    assert (
        card["caches"]["image_cache"]["max_bytes"] == 256 * 2**20 and card["caches"]["image_cache"]["where"] == "host"
    )
    card = off.client().models.list().data[0].model_dump()
    assert card["caches"]["prefix_cache"]["enabled"] is False and card["caches"]["image_cache"]["max_bytes"] == 0
