"""``POST /v1/responses`` with the official openai client: ``responses.create`` and ``responses.stream``, text and
an image, the event sequence, usage, and the stateless refusals."""

from __future__ import annotations

import httpx
import openai
import pytest

from ..support import data_url, png_bytes

GREEDY = {"temperature": 0, "max_output_tokens": 5}


def test_create_answers_like_chat_completions(api):
    client = api.client()
    r = client.responses.create(model="glm-4v-9b", input="hello there", instructions="Be brief.", **GREEDY)
    chat = client.chat.completions.create(
        model="glm-4v-9b",
        max_tokens=5,
        temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
    )
    assert r.object == "response" and r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status in ("completed", "incomplete") and r.output[0].role == "assistant"


def test_an_image_in_message_items(api):
    client = api.client()
    item = {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": data_url(png_bytes())},
        ],
    }
    r = client.responses.create(model="glm-4v-9b", input=[item], **GREEDY)
    assert r.usage.input_tokens > 18 and r.output_text is not None  # the image's embeddings are counted


def test_stream_sends_the_documented_event_sequence(api):
    client = api.client()
    kinds, deltas = [], []
    with client.responses.stream(model="glm-4v-9b", input="hi", **GREEDY) as stream:
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = stream.get_final_response()
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == "response.completed"
    assert final.output_text == "".join(deltas) and final.usage.output_tokens >= 1
    raw = httpx.post(f"{api.url}/v1/responses", json={"input": "hi", "stream": True, **GREEDY}, timeout=30).text
    numbers = [
        int(line.split('"sequence_number": ')[1].split(",")[0]) for line in raw.splitlines() if line.startswith("data:")
    ]
    assert numbers == list(range(1, len(numbers) + 1))


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"previous_response_id": "resp_x"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"text": {"format": {"type": "regex"}}}, "text.format.type"),
    ],
)
def test_stateless_refusals_are_clear_400s(api, extra, param):
    r = httpx.post(f"{api.url}/v1/responses", json={"input": "hi", **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    with pytest.raises(openai.BadRequestError):
        api.client().responses.create(model="glm-4v-9b", input="hi", **extra)
