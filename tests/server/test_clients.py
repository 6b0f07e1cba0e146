"""The client libraries people plug into an OpenAI-compatible server, unmodified, against a real server:
langchain-openai (chat completions and ``use_responses_api=True``), llama-index's ``OpenAILike`` with its defaults
(the legacy completions endpoint), and litellm's ``openai/`` provider — each with the model name the seed article
and THUDM's client send (``glm-4v``)."""

from __future__ import annotations

import os

from ..support import data_url, png_bytes

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list from the web


def test_langchain_chat_openai_text_image_and_stream(api):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{api.url}/v1",
        api_key="none",
        model="glm-4v",
        max_tokens=4,
        temperature=0,
        max_retries=0,
        stream_usage=True,
    )
    assert isinstance(llm.invoke("hello").content, str)
    image = HumanMessage(
        content=[
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
        ]
    )
    reply = llm.invoke([image])
    assert reply.usage_metadata["input_tokens"] > 18  # the image's embeddings are counted
    chunks = list(llm.stream("hi"))
    assert "".join(c.content for c in chunks) == llm.invoke("hi").content


def test_langchain_with_the_responses_api(api):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{api.url}/v1",
        api_key="none",
        model="glm-4v-9b",
        max_tokens=4,
        temperature=0,
        max_retries=0,
        use_responses_api=True,
    )
    reply = llm.invoke("hello")
    assert reply.text and reply.usage_metadata["output_tokens"] >= 1


def test_llama_index_openai_like_with_its_defaults(api):
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(api_base=f"{api.url}/v1", api_key="none", model="glm-4v", max_tokens=4, temperature=0)
    assert isinstance(llm.complete("Once upon a time").text, str)  # /v1/completions: its default
    chat = OpenAILike(api_base=f"{api.url}/v1", api_key="none", model="glm-4v", max_tokens=4, is_chat_model=True)
    from llama_index.core.llms import ChatMessage

    assert isinstance(chat.chat([ChatMessage(role="user", content="hi")]).message.content, str)


def test_litellm_openai_provider(api):
    import litellm

    r = litellm.completion(
        model="openai/glm-4v",
        api_base=f"{api.url}/v1",
        api_key="none",
        max_tokens=4,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
