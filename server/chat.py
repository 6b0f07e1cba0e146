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

import asyncio
import logging
import time

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine import EngineStoppedError, Event, QueueFullError, RequestHandle

from . import sse
from .errors import (
    APIError,
    ContextLengthExceeded,
    InternalError,
    QueueFull,
    RequestTimeout,
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
from .runtime import Runtime
from .translate import PreparedChat

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's "client closed request"; never delivered, the client is gone


def _submit(rt: Runtime, p: PreparedChat) -> RequestHandle:
    try:
        return rt.engine.submit(p.generation)
    except QueueFullError as e:
        retry = rt.metrics.retry_after_s(rt.engine.stats())
        raise QueueFull(f"the server is busy: {e}; retry in {retry} s", headers={"Retry-After": str(retry)}) from None
    except EngineStoppedError:
        raise ServiceUnavailable("the server is shutting down", code="shutting_down") from None
    except ValueError as e:
        raise ContextLengthExceeded(str(e), param="messages") from None


def engine_error(err: BaseException | None) -> APIError:
    if isinstance(err, torch.OutOfMemoryError):
        log.warning("out of memory while generating: %s", str(err).split("\n", 1)[0])
        return ServiceUnavailable(
            "the GPU ran out of memory for this request; retry later or with a shorter prompt or fewer max_tokens",
            code="out_of_memory",
        )
    log.error("generation failed", exc_info=err)
    return InternalError("generation failed (details are in the server log)")


class _ClientGone(Exception):
    pass


class _TimedOut(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventReader:
    """A handle's events, raced against the client disconnecting and the request deadline (both cancel it)."""

    def __init__(self, rt: Runtime, handle: RequestHandle, request: Request, deadline: float | None):
        self.rt, self.handle, self.deadline = rt, handle, deadline
        self._events = handle.__aiter__()
        self._gone = asyncio.ensure_future(_wait_disconnect(request))
        self._next: asyncio.Future | None = None
        self._closed = False
        self.outcome = "cancelled"  # for metrics: stop | length | cancelled | timeout | error

    async def next(self) -> Event:
        timeout = None if self.deadline is None else max(0.0, self.deadline - asyncio.get_running_loop().time())
        self._next = asyncio.ensure_future(anext(self._events))
        done, _ = await asyncio.wait({self._next, self._gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._gone in done:
            self.handle.cancel()
            raise _ClientGone
        if self._next in done:
            return self._next.result()
        self.handle.cancel()
        self.outcome = "timeout"
        raise _TimedOut

    def timeout_error(self) -> RequestTimeout:
        return RequestTimeout(
            f"the request took longer than the server's limit of "
            f"{self.rt.settings.request_timeout:g} s (--request-timeout)"
        )

    def close(self) -> None:
        """Stop watching, cancel generation if it is still going, record the request (once; idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._gone.cancel()
        if self._next is not None:
            self._next.cancel()
        if self.handle.finish_reason is None:
            self.handle.cancel()
        self.rt.metrics.observe(self.handle, self.outcome)
        t = self.handle.timings
        ttft = f"{t.first_token - t.submitted:.3f}s" if t.first_token else "-"
        log.info(
            "%s: %s, %d prompt + %d completion tokens, ttft %s, %.3fs",
            self.handle.request_id,
            self.outcome,
            self.handle.prompt_tokens,
            self.handle.completion_tokens,
            ttft,
            time.perf_counter() - t.submitted,
        )


def _deadline(rt: Runtime, arrived: float) -> float | None:
    return arrived + rt.settings.request_timeout if rt.settings.request_timeout > 0 else None


async def complete(p: PreparedChat, rt: Runtime, request: Request, arrived: float) -> Response:
    reader = EventReader(rt, _submit(rt, p), request, _deadline(rt, arrived))
    parts: list[str] = []
    try:
        while True:
            ev = await reader.next()
            if ev.kind == "delta":
                parts.append(ev.text)
            elif ev.kind == "finish":
                reader.outcome = ev.finish_reason
                break
            else:
                reader.outcome = "error"
                raise engine_error(ev.error)
    except _ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except _TimedOut:
        raise reader.timeout_error() from None
    finally:
        reader.close()
    if reader.outcome == "cancelled":  # only the engine's shutdown cancels a request we are still reading
        raise ServiceUnavailable("the server shut down before this request finished", code="shutting_down")
    h = reader.handle
    if p.kind == "text":
        return JSONResponse(_text_completion(p, rt, "".join(parts), reader.outcome, h), headers=p.headers)
    body = ChatCompletion(
        id=p.id,
        created=p.created,
        model=p.model,
        system_fingerprint=rt.system_fingerprint,
        choices=[Choice(message=AssistantMessage(content="".join(parts)), finish_reason=reader.outcome)],
        usage=Usage.of(h.prompt_tokens, h.completion_tokens),
    )
    return JSONResponse(body.model_dump(), headers=p.headers)


async def stream(p: PreparedChat, rt: Runtime, request: Request, arrived: float) -> Response:
    reader = EventReader(rt, _submit(rt, p), request, _deadline(rt, arrived))
    try:
        first = await reader.next()
        if first.kind == "error":
            reader.outcome = "error"
            raise engine_error(first.error)
        if first.kind == "finish" and first.finish_reason == "cancelled":
            raise ServiceUnavailable("the server shut down before this request started", code="shutting_down")
    except _ClientGone:
        reader.close()
        return Response(status_code=CLIENT_CLOSED)
    except _TimedOut:
        reader.close()
        raise reader.timeout_error() from None
    except APIError:
        reader.close()
        raise
    return sse.EventStreamResponse(_sse(p, rt, reader, first), on_close=reader.close, headers=p.headers)


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
        body["usage"] = Usage.of(handle.prompt_tokens, handle.completion_tokens).model_dump()
    return body


async def _sse(p: PreparedChat, rt: Runtime, reader: EventReader, ev: Event):
    def chunk(delta: Delta | None = None, finish_reason: str | None = None, usage: Usage | None = None) -> str:
        if p.kind == "text":
            if delta is None:  # the usage chunk
                return sse.event({**_text_completion(p, rt, None, None), "usage": usage.model_dump()})
            return sse.event(_text_completion(p, rt, delta.content or "", finish_reason))
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]
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
                if ev.text:
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
            except _TimedOut:
                reason = "length"
                break
        yield chunk(Delta(), finish_reason=reason)
        if p.include_usage:
            h = reader.handle
            yield chunk(usage=Usage.of(h.prompt_tokens, h.completion_tokens))
        yield sse.DONE
    except _ClientGone:
        return
    finally:
        reader.close()
