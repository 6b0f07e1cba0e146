"""``POST /v1/chat/completions`` serving: a prepared request (:mod:`server.translate`) → the engine → one JSON
response or an SSE stream (framed by :mod:`server.sse`).

Two decisions worth knowing:

* A stream's HTTP status is decided by its first engine event: errors before the first token (queue timeout,
  out-of-memory in prefill) still get their real status code; the role chunk then goes out with the first token.
* Once a stream has started, a cut that is not the client's doing (``--request-timeout``, a shutdown that outlasts
  ``--shutdown-timeout``) ends it cleanly with ``finish_reason: "length"`` and ``[DONE]``; an engine error ends it
  with an ``{"error": ...}`` event (the openai SDK raises it) and ``[DONE]``.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine import Event

from . import sse
from .errors import (
    APIError,
    ServiceUnavailable,
)
from .protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from .reader import CLIENT_CLOSED, ClientGone, EventReader, TimedOut, deadline, engine_error, submit
from .responses import response_events, response_object
from .runtime import Runtime
from .structured import logprob_entries
from .translate import PreparedChat

log = logging.getLogger(__name__)


async def complete(p: PreparedChat, rt: Runtime, request: Request, arrived: float) -> Response:
    """One JSON answer: a chat completion, a text completion or a Responses-API response (``p.kind``)."""
    reader = EventReader(rt, submit(rt, p), request, deadline(rt, arrived))
    parts: list[str] = []
    entries: list = []
    try:
        while True:
            ev = await reader.next()
            if ev.kind == "delta":
                parts.append(ev.text)
                entries.extend(ev.logprobs or ())
            elif ev.kind == "finish":
                reader.outcome = ev.finish_reason
                break
            else:
                reader.outcome = "error"
                raise engine_error(ev.error)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except TimedOut:
        raise reader.timeout_error() from None
    finally:
        reader.close()
    if reader.outcome == "cancelled":  # only the engine's shutdown cancels a request we are still reading
        raise ServiceUnavailable("the server shut down before this request finished", code="shutting_down")
    h = reader.handle
    if p.kind == "text":
        return JSONResponse(_text_completion(p, rt, "".join(parts), reader.outcome, h), headers=p.headers)
    if p.kind == "responses":
        body = response_object(p, rt, "".join(parts), reader.outcome, h)
        return JSONResponse(body, headers=p.headers)
    body = ChatCompletion(
        id=p.id,
        created=p.created,
        model=p.model,
        system_fingerprint=rt.system_fingerprint,
        choices=[
            Choice(
                message=AssistantMessage(content="".join(parts)),
                logprobs=_logprobs(p, rt, entries),
                finish_reason=reader.outcome,
            )
        ],
        usage=Usage.of_handle(h),
    )
    return JSONResponse(body.model_dump(), headers=p.headers)


async def stream(p: PreparedChat, rt: Runtime, request: Request, arrived: float) -> Response:
    reader = EventReader(rt, submit(rt, p), request, deadline(rt, arrived))
    try:
        first = await reader.next()
        if first.kind == "error":
            reader.outcome = "error"
            raise engine_error(first.error)
        if first.kind == "finish" and first.finish_reason == "cancelled":
            raise ServiceUnavailable("the server shut down before this request started", code="shutting_down")
    except ClientGone:
        reader.close()
        return Response(status_code=CLIENT_CLOSED)
    except TimedOut:
        reader.close()
        raise reader.timeout_error() from None
    except APIError:
        reader.close()
        raise
    if p.kind == "responses":
        events = response_events(p, rt, reader, first)
    else:
        events = _sse(p, rt, reader, first)
    return sse.EventStreamResponse(events, on_close=reader.close, headers=p.headers)


def _logprobs(p: PreparedChat, rt: Runtime, entries: list) -> dict | None:
    if p.generation.params.logprobs is None:
        return None
    return {"content": logprob_entries(rt.loaded.tokenizer, entries), "refusal": None}


def _text_completion(p: PreparedChat, rt: Runtime, text: str | None, finish_reason, handle=None) -> dict:
    """A ``text_completion`` object (whole or a stream chunk; a chunk without choices carries the usage)."""
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    body = {
        "id": p.id,
        "object": "text_completion",
        "created": p.created,
        "model": p.model,
        "system_fingerprint": rt.system_fingerprint,
        "choices": choices,
    }
    if handle is not None:
        body["usage"] = Usage.of_handle(handle).model_dump()
    return body


async def _sse(p: PreparedChat, rt: Runtime, reader: EventReader, ev: Event):
    def chunk(
        delta: Delta | None = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        logprobs: dict | None = None,
    ) -> str:
        if p.kind == "text":
            if delta is None:  # the usage chunk
                return sse.event({**_text_completion(p, rt, None, None), "usage": usage.model_dump()})
            return sse.event(_text_completion(p, rt, delta.content or "", finish_reason))
        choices = [] if delta is None else [ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)]
        return sse.chunk_event(
            ChatCompletionChunk(
                id=p.id,
                created=p.created,
                model=p.model,
                system_fingerprint=rt.system_fingerprint,
                choices=choices,
                usage=usage,
            ),
            p.include_usage,
        )

    try:
        if p.kind == "chat":
            yield chunk(Delta(role="assistant", content=""))
        while True:
            if ev.kind == "delta":
                if ev.logprobs and p.kind == "chat":  # a chunk per token: text held back still shows its token
                    yield chunk(Delta(content=ev.text), logprobs=_logprobs(p, rt, ev.logprobs))
                elif ev.text:
                    yield chunk(Delta(content=ev.text))
            elif ev.kind == "finish":
                reader.outcome = ev.finish_reason
                reason = "length" if ev.finish_reason == "cancelled" else ev.finish_reason
                break
            else:
                reader.outcome = "error"
                yield sse.error_event(engine_error(ev.error))
                yield sse.DONE
                return
            try:
                ev = await reader.next()
            except TimedOut:
                reason = "length"
                break
        yield chunk(Delta(), finish_reason=reason)
        if p.include_usage:
            h = reader.handle
            yield chunk(usage=Usage.of_handle(h))
        yield sse.DONE
    except ClientGone:
        return
    finally:
        reader.close()
