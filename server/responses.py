"""``POST /v1/responses`` — the core of OpenAI's Responses API (the Agents SDK, Codex,
``ChatOpenAI(use_responses_api=True)``) on the same engine as chat completions.

Accepted: ``input`` as a string or message items (``role`` + ``content`` as a string or ``input_text`` /
``input_image`` / ``output_text`` parts), ``instructions`` (a system message), ``max_output_tokens``,
``temperature``/``top_p``, ``stream``, and ``text.format`` (``json_object`` / ``json_schema``, as chat completions'
``response_format``: :mod:`server.structured`). Stateless: nothing is stored (``store`` is answered ``false``), so
``previous_response_id`` is a 400; tools are a 400 (GLM-4V-9B has no tool calling).
Streaming sends the documented event sequence — ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta`` …,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``, ``response.completed``
(also when cut off by ``max_output_tokens``: its response says ``status: "incomplete"``; ``response.failed`` on an
engine error) — each as ``event: <type>`` + ``data: {...}``, numbered by
``sequence_number``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, ValidationError

from .errors import BadRequest, validation_message
from .protocol import ChatCompletionRequest, _Lenient, check_size, load_json
from .reader import ClientGone, TimedOut, engine_error
from .runtime import Runtime
from .structured import grammar_spec
from .translate import PreparedChat, prepare

ROLES = ("user", "system", "developer", "assistant")


class ResponsesRequest(_Lenient):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool | None = False
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None


def _part(part: Any, param: str) -> dict:
    if not isinstance(part, dict):
        raise BadRequest("a content part must be an object", param=param)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "input_image":
        url = part.get("image_url") or part.get("file_id")
        if not isinstance(url, str):
            raise BadRequest("an input_image part needs an image_url (a data: or http(s) URL)", param=param)
        return {"type": "image_url", "image_url": {"url": url, "detail": part.get("detail") or "auto"}}
    raise BadRequest(f"content part type {kind!r} is not supported (use input_text or input_image)", param=param)


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The Responses request as the chat request it means (one translation into the engine, not two)."""
    if req.previous_response_id:
        raise BadRequest(
            "previous_response_id is not supported: this server stores no responses (store: false); "
            "send the whole conversation in input",
            param="previous_response_id",
        )
    if req.tools:
        raise BadRequest("GLM-4V-9B does not support tool calls; remove 'tools'", param="tools")
    fmt = (req.text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise BadRequest("text.format must be an object", param="text.format")
    response_format = fmt
    if fmt.get("type") == "json_schema":  # the Responses API puts name/schema/strict beside type
        response_format = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    grammar_spec(response_format, param="text.format")  # a bad format is a 400 naming text.format
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            role = item.get("role")
            if item.get("type", "message") != "message" or role not in ROLES:
                raise BadRequest(
                    f"input.{i}: only message items with role {', '.join(ROLES)} are supported", param=f"input.{i}"
                )
            content = item.get("content")
            if isinstance(content, list):
                content = [_part(p, f"input.{i}.content.{j}") for j, p in enumerate(content)]
            messages.append({"role": role, "content": content})
    data = {
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": req.stream,
        "response_format": response_format,
    }
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise BadRequest(message, param=param) from None


def parse_responses_request(body: bytes, max_text_chars: int | None = None) -> ChatCompletionRequest:
    data = load_json(body)
    try:
        req = ResponsesRequest.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise BadRequest(message, param=param) from None
    chat = to_chat_request(req)
    check_size(chat.model_dump(), max_text_chars)
    return chat


async def prepare_response(req: ChatCompletionRequest, rt: Runtime) -> PreparedChat:
    return await prepare(req, rt, kind="responses")


def response_object(
    p: PreparedChat, rt: Runtime, text: str | None, outcome: str | None, handle=None, status: str | None = None
) -> dict:
    """The ``response`` object: in progress (``text`` None), or finished with its one output message."""
    params = p.generation.params
    if status is None:
        status = "in_progress" if text is None else ("incomplete" if outcome == "length" else "completed")
    body = {
        "id": p.id,
        "object": "response",
        "created_at": p.created,
        "status": status,
        "model": p.model,
        "output": [] if text is None else [_message(p, text, "completed")],
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": None,
        "max_output_tokens": params.max_new_tokens,
        "parallel_tool_calls": False,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": _text_format(p.response_format)},
        "store": False,
        "usage": None,
    }
    if handle is not None:
        body["usage"] = {
            "input_tokens": handle.prompt_tokens,
            "input_tokens_details": {"cached_tokens": handle.cached_tokens},
            "output_tokens": handle.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": handle.prompt_tokens + handle.completion_tokens,
        }
    return body


def _text_format(response_format: dict | None) -> dict:
    """The chat-form response_format back in the Responses API's ``text.format`` shape."""
    if not response_format:
        return {"type": "text"}
    if response_format.get("type") == "json_schema":
        return {"type": "json_schema", **response_format.get("json_schema", {})}
    return response_format


def _message(p: PreparedChat, text: str, status: str) -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {"type": "message", "id": "msg_" + p.id[5:], "status": status, "role": "assistant", "content": content}


async def response_events(p: PreparedChat, rt: Runtime, reader, ev):
    """The streamed event sequence (see the module docstring); ``ev`` is the engine's first event."""
    seq = 0
    item_id = "msg_" + p.id[5:]

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **fields})}\n\n"

    parts: list[str] = []
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    try:
        yield event("response.created", response=response_object(p, rt, None, None))
        yield event("response.in_progress", response=response_object(p, rt, None, None))
        yield event("response.output_item.added", output_index=0, item={**_message(p, None, "in_progress")})
        yield event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
        while True:
            if ev.kind == "delta":
                if ev.text:
                    parts.append(ev.text)
                    yield event("response.output_text.delta", **where, delta=ev.text)
            elif ev.kind == "finish":
                reader.outcome = ev.finish_reason
                break
            else:
                reader.outcome = "error"
                err = engine_error(ev.error)
                yield event(
                    "response.failed",
                    response={
                        **response_object(p, rt, None, None, status="failed"),
                        "error": {"code": err.code, "message": err.message},
                    },
                )
                return
            try:
                ev = await reader.next()
            except TimedOut:
                reader.outcome = "length"
                break
        text = "".join(parts)
        outcome = "length" if reader.outcome in ("cancelled", "timeout") else reader.outcome
        yield event("response.output_text.done", **where, text=text)
        yield event(
            "response.content_part.done", **where, part={"type": "output_text", "text": text, "annotations": []}
        )
        yield event("response.output_item.done", output_index=0, item=_message(p, text, "completed"))
        final = response_object(p, rt, text, outcome, reader.handle)
        # Always response.completed (a cut-off answer says status "incomplete" inside), as vLLM does: the openai
        # SDK's stream helper and the Agents SDK wait for that event to get the final response.
        yield event("response.completed", response=final)
    except ClientGone:
        return
    finally:
        reader.close()
