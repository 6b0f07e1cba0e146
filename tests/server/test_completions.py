"""``POST /v1/completions`` — the legacy API (LlamaIndex ``OpenAILike``'s default, many scripts): a raw prompt,
continued without the chat template, through the same engine; with the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from glm4v import SamplingParams
from glm4v.generate import generate_text


def test_text_completion_equals_the_raw_prompt_continued(api, tiny_fp32):
    client = api.client()
    r = client.completions.create(
        model="glm-4v", prompt="Once upon a time", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    tok = tiny_fp32.tokenizer
    ids = [tok.token_id("[gMASK]"), tok.token_id("<sop>")] + tok.encode("Once upon a time")
    text, _, _ = generate_text(
        tiny_fp32.model, tok, ids, None, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    )
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(ids)


def test_streamed_and_token_id_prompts(api, tiny_fp32):
    client = api.client()
    whole = client.completions.create(
        model="glm-4v-9b", prompt=["hello"], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    parts, usage = [], None
    for chunk in client.completions.create(
        model="glm-4v-9b",
        prompt="hello",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].text and usage.completion_tokens == 5
    tok = tiny_fp32.tokenizer
    ids = [tok.token_id("[gMASK]"), tok.token_id("<sop>")] + tok.encode("hello")
    by_ids = client.completions.create(
        model="glm-4v-9b", prompt=ids, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == whole.choices[0].text


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"n": 2}, "n"),
        ({"echo": True}, "echo"),
        ({"logprobs": 2}, "logprobs"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_what_is_not_supported_is_a_clear_400(api, extra, param):
    r = httpx.post(f"{api.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    with pytest.raises(openai.BadRequestError):
        api.client().completions.create(model="glm-4v-9b", max_tokens=2, **{"prompt": "hi", **extra})
