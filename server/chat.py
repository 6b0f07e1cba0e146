"""``POST /v1/chat/completions``: protocol request → conversation → prompt + pixels → engine → response or SSE.

Three decisions worth knowing:

* The generation prompt ends ``<|assistant|>\\n`` (:func:`glm4v.chat_template.generation_prompt`, the same for every
  front door). GLM-4V always writes that newline first (it ends the turn's metadata line; HF's
  ``process_response`` splits it off), so putting it in the prompt keeps it out of ``content`` and lets
  ``stop: ["\\n"]`` mean "one line of answer" instead of "nothing".
* A stream's HTTP status is decided by its first engine event: errors before the first token (queue timeout,
  out-of-memory in prefill) still get their real status code; the role chunk then goes out with the first token.
* Once a stream has started, a cut that is not the client's doing (``--request-timeout``, a shutdown that outlasts
  ``--shutdown-timeout``) ends it cleanly with ``finish_reason: "length"`` and ``[DONE]``; an engine error ends it
  with an ``{"error": ...}`` event (the openai SDK raises it) and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine import EngineStoppedError, Event, GenerationRequest, QueueFullError, RequestHandle
from glm4v import Message, SamplingParams, generation_prompt
from glm4v.chat_template import TemplateError

from .conversation import build_conversation
from .errors import (
    APIError,
    BadRequest,
    ContextLengthExceeded,
    InternalError,
    ModelNotFound,
    QueueFull,
    RequestTimeout,
    ServiceUnavailable,
)
from .protocol import (
    SSE_DONE,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
    unsupported_features,
)
from .runtime import Runtime

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499  # nginx's "client closed request"; never delivered, the client is gone


@dataclass
class PreparedChat:
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    generation: GenerationRequest


def resolve_model(name: str | None, served: list[str]) -> str:
    if not name:
        return served[0]
    if name in served:
        return name
    raise ModelNotFound(f"model {name!r} does not exist; this server serves {', '.join(map(repr, served))}",
                        param="model")


def _prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    try:
        return generation_prompt(tokenizer, messages).ids
    except TemplateError as e:
        raise BadRequest(str(e), param="messages") from None


def _sampling(req: ChatCompletionRequest, max_new_tokens: int) -> SamplingParams:
    """OpenAI defaults where the client is silent: temperature 1, top_p 1, no penalties."""
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            stop=req.stop_list,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _completion_budget(req: ChatCompletionRequest, prompt_tokens: int, max_model_len: int, default: int) -> int:
    room = max_model_len - prompt_tokens
    asked = req.completion_limit
    if asked is None and room >= 1:
        return min(default, room)
    if asked is not None and asked <= room:
        return asked
    wanted = f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the completion)" \
        if asked is not None else f"{prompt_tokens} tokens in the messages, leaving no room for a completion"
    raise ContextLengthExceeded(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {wanted}. "
        "Please reduce the length of the messages or the completion (an image counts as its embeddings).",
        param="messages")


async def prepare(req: ChatCompletionRequest, rt: Runtime) -> PreparedChat:
    model = resolve_model(req.model, rt.settings.model_names)
    unsupported_features(req)
    lm, loop = rt.loaded, asyncio.get_running_loop()
    conv = await loop.run_in_executor(rt.pool, build_conversation, req.messages, rt.settings.multi_image)
    pixel_values = None
    if conv.image is not None:
        size = rt.low_detail_size if conv.image.detail == "low" else lm.vision_size
        try:
            data = await rt.images.load_bytes(conv.image.url)
            pixel_values = await loop.run_in_executor(rt.pool, rt.images.preprocess, data, lm.image_processor, size)
        except APIError as e:
            e.param = e.param or conv.image.param
            raise
    ids = await loop.run_in_executor(rt.pool, _prompt_ids, lm.tokenizer, conv.messages)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = GenerationRequest(ids, SamplingParams(), pixel_values, request_id)
    prompt_tokens = rt.engine.prompt_tokens(generation)
    budget = _completion_budget(req, prompt_tokens, rt.engine.max_model_len, rt.settings.default_max_tokens)
    generation.params = _sampling(req, budget)
    return PreparedChat(request_id, int(time.time()), model, bool(req.stream), req.include_usage, generation)


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
        return ServiceUnavailable("the GPU ran out of memory for this request; retry later or with a shorter "
                                  "prompt or fewer max_tokens", code="out_of_memory")
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
        return RequestTimeout(f"the request took longer than the server's limit of "
                              f"{self.rt.settings.request_timeout:g} s (--request-timeout)")

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
        log.info("%s: %s, %d prompt + %d completion tokens, ttft %s, %.3fs", self.handle.request_id, self.outcome,
                 self.handle.prompt_tokens, self.handle.completion_tokens, ttft, time.perf_counter() - t.submitted)


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
    body = ChatCompletion(
        id=p.id, created=p.created, model=p.model, system_fingerprint=rt.system_fingerprint,
        choices=[Choice(message=AssistantMessage(content="".join(parts)), finish_reason=reader.outcome)],
        usage=Usage.of(h.prompt_tokens, h.completion_tokens),
    )
    return JSONResponse(body.model_dump())


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
    return _EventStream(_sse(p, rt, reader, first), reader)


class _EventStream(StreamingResponse):
    """SSE response that always releases its reader: Starlette never starts (so never finalises) the body generator
    when the client is gone before the first byte, and the generation would otherwise run on for nobody."""

    def __init__(self, content, reader: EventReader):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.reader = reader

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reader.close()


async def _sse(p: PreparedChat, rt: Runtime, reader: EventReader, ev: Event):
    def chunk(delta: Delta | None = None, finish_reason: str | None = None, usage: Usage | None = None) -> str:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]
        return ChatCompletionChunk(id=p.id, created=p.created, model=p.model, system_fingerprint=rt.system_fingerprint,
                                   choices=choices, usage=usage).sse(p.include_usage)

    try:
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
                yield f"data: {json.dumps(engine_error(ev.error).body())}\n\n"
                yield SSE_DONE
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
        yield SSE_DONE
    except _ClientGone:
        return
    finally:
        reader.close()
