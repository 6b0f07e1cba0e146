"""Structured outputs and logprobs over HTTP, with the official ``openai`` client and the libraries that depend on
them: ``chat.completions.parse`` with a pydantic model, LangChain's ``with_structured_output`` (json_schema and
json_mode), instructor (JSON_SCHEMA and JSON modes) — each must come back with a validated object from the random
tiny model, because decoding is constrained, not because the model knows JSON."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from ..support import data_url, png_bytes, serve, user_with_image

SHAPE = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "label": {"type": "string", "maxLength": 8},
    },
    "required": ["colour", "count", "label"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE, "strict": True}}


class Shape(BaseModel):
    colour: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=9)
    label: str = Field(max_length=8)


class Loose(BaseModel):
    """What a JSON-mode client can ask of a random model: any object validates (the schema is only in the prompt)."""

    note: str = "none"


@pytest.fixture(scope="module")
def srv(base_settings, tiny_fp32):
    """Room for the prompts the client libraries build (instructor puts the schema in the system message)."""
    from dataclasses import replace

    with serve(replace(base_settings, max_model_len=1024, default_max_tokens=None), tiny_fp32) as s:
        yield s


def _messages(image: bool = True) -> list[dict]:
    if image:
        return [user_with_image(data_url(png_bytes()), "Describe the shape as JSON.")]
    return [{"role": "user", "content": "Describe a shape as JSON."}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0, 1.2])
def test_json_schema_answers_validate_streamed_and_not(srv, stream, temperature):
    client = srv.client()
    for seed in range(3):
        kw = dict(model="glm-4v", messages=_messages(), response_format=JSON_SCHEMA, max_tokens=100, seed=seed)
        r = client.chat.completions.create(**kw, temperature=temperature, stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SHAPE)


def test_json_object_and_a_cut_off_answer(srv):
    client = srv.client()
    r = client.chat.completions.create(
        model="glm-4v", messages=_messages(False), response_format={"type": "json_object"}, max_tokens=3
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    r = client.chat.completions.create(
        model="glm-4v", messages=_messages(False), response_format=JSON_SCHEMA, max_tokens=4, temperature=0
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_openai_parse_with_a_pydantic_model(srv):
    client = srv.client()
    r = client.chat.completions.parse(model="glm-4v", messages=_messages(), response_format=Shape, max_tokens=100)
    assert isinstance(r.choices[0].message.parsed, Shape)


# A flat distribution closes a random model's strings sooner: most seeds complete within the budget.
JSON_MODE = {"temperature": 2.0, "max_tokens": 400}


def _first_complete(call, seeds=range(12)):
    """JSON mode constrains to *an object*, so a random model's strings are unbounded: try seeded answers until one
    completes (a cut-off one is the client's length error) and return what the client made of it."""
    for seed in seeds:
        try:
            return call(seed)
        except openai.LengthFinishReasonError:
            continue
        except Exception as e:  # instructor and LangChain wrap the cut-off answer in their own errors
            if "length" not in str(e).lower() and "json" not in str(e).lower():
                raise
    pytest.fail("no seeded JSON-mode answer completed")


def test_langchain_with_structured_output(srv):
    from langchain_openai import ChatOpenAI

    def llm(seed=None, **kw):
        return ChatOpenAI(
            base_url=f"{srv.url}/v1",
            api_key="none",
            model="glm-4v",
            max_retries=0,
            seed=seed,
            **{"max_tokens": 300, **kw},
        )

    assert isinstance(llm().with_structured_output(Shape, method="json_schema").invoke("Describe a shape."), Shape)
    got = _first_complete(
        lambda seed: llm(seed, **JSON_MODE).with_structured_output(Loose, method="json_mode").invoke("In JSON.")
    )
    assert isinstance(got, Loose)


def test_instructor_json_schema_and_json_modes(srv):
    import instructor

    def ask(mode, model, **kw):
        client = instructor.from_openai(srv.client(), mode=mode)
        return client.chat.completions.create(
            model="glm-4v", response_model=model, messages=_messages(False), max_retries=0, **{"max_tokens": 300, **kw}
        )

    assert isinstance(ask(instructor.Mode.JSON_SCHEMA, Shape), Shape)
    assert isinstance(_first_complete(lambda seed: ask(instructor.Mode.JSON, Loose, seed=seed, **JSON_MODE)), Loose)


def test_responses_api_text_format(srv):
    client = srv.client()
    fmt = {"type": "json_schema", "name": "shape", "schema": SHAPE, "strict": True}
    r = client.responses.create(model="glm-4v", input="Describe a shape.", text={"format": fmt}, max_output_tokens=100)
    jsonschema.validate(json.loads(r.output_text), SHAPE)
    assert r.text.format.type == "json_schema" and r.text.format.name == "shape"


def test_a_mixed_batch_over_http(srv):
    """Constrained and unconstrained requests at once: the plain greedy answers equal those given alone."""
    import concurrent.futures as cf

    client = srv.client()
    plain = dict(model="glm-4v", messages=_messages(False), max_tokens=20, temperature=0)
    alone = client.chat.completions.create(**plain).choices[0].message.content
    with cf.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(client.chat.completions.create, **plain) for _ in range(3)]
        futs += [
            pool.submit(
                client.chat.completions.create,
                model="glm-4v",
                messages=_messages(),
                response_format=JSON_SCHEMA,
                max_tokens=100,
                seed=i,
            )
            for i in range(3)
        ]
        results = [f.result() for f in futs]
    assert [r.choices[0].message.content for r in results[:3]] == [alone] * 3
    for r in results[3:]:
        jsonschema.validate(json.loads(r.choices[0].message.content), SHAPE)


@pytest.mark.parametrize(
    "fmt, param, words",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}, "schema", "frob"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"format": "nope"}}}, "schema", "nope"),
        ({"type": "json_schema", "json_schema": {"schema": SHAPE}}, "json_schema.name", "name"),
        ({"type": "json_schema"}, "response_format.json_schema", "json_schema"),
        ({"type": "regex"}, "response_format.type", "regex"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["y" * 99] * 999}}}, "schema", "KiB"),
    ],
)
def test_bad_formats_are_400s_that_name_the_problem(srv, fmt, param, words):
    r = srv.post({"messages": [{"role": "user", "content": "hi"}], "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].endswith(param) and words in err["message"]
    assert srv.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


# ---- logprobs -----------------------------------------------------------------------------------------------------
def test_logprobs_shapes_streamed_and_not(srv):
    client = srv.client()
    kw = dict(model="glm-4v", messages=_messages(), max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely
    streamed = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs]
    entries = [e for c in streamed for e in c.choices[0].logprobs.content]
    # the second request reuses the first's prompt from the kept cache row: equal up to float rounding
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in entries] == [
        (e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content
    ]
    flat = lambda es: [lp for e in es for lp in (e.logprob, *(t.logprob for t in e.top_logprobs))]  # noqa: E731
    assert flat(entries) == pytest.approx(flat(content), abs=1e-5)
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_partial_utf8_tokens_carry_their_bytes(srv):
    """Chinese text in the tiny vocabulary splits characters across byte tokens: each entry's ``bytes`` is exact."""
    client = srv.client()
    for seed in range(6):
        r = client.chat.completions.create(
            model="glm-4v",
            messages=[{"role": "user", "content": "这是一个红色的圆"}],
            max_tokens=24,
            temperature=1.5,
            seed=seed,
            logprobs=True,
        )
        content = r.choices[0].logprobs.content
        joined = b"".join(bytes(e.bytes) for e in content)
        assert joined.decode("utf-8", errors="replace") == r.choices[0].message.content
        partial = [e for e in content if "\\x" in e.token]
        if partial:
            assert all(bytes(e.bytes).decode("utf-8", errors="backslashreplace") == e.token for e in partial)
            return
    pytest.fail("no partial-UTF-8 token came up in 6 seeded answers")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_still_refused(srv, extra, param):
    r = srv.post({"messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_openai_client_raises_a_bad_request_for_a_bad_schema(srv):
    with pytest.raises(openai.BadRequestError, match="frob"):
        srv.client().chat.completions.create(
            model="glm-4v",
            messages=_messages(False),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}},
        )
    assert httpx.get(f"{srv.url}/health").status_code == 200
