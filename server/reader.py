"""One request's engine events as the HTTP layer reads them: raced against the client disconnecting and the
request deadline (both cancel the generation), engine errors mapped to API errors, the request recorded once."""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from fastapi import Request

from engine import EngineStoppedError, Event, QueueFullError, RequestHandle

from .errors import (
    APIError,
    ContextLengthExceeded,
    InternalError,
    QueueFull,
    RequestTimeout,
    ServiceUnavailable,
)
from .runtime import Runtime
from .translate import PreparedChat

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's "client closed request"; never delivered, the client is gone


def submit(rt: Runtime, p: PreparedChat) -> RequestHandle:
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


class ClientGone(Exception):
    pass


class TimedOut(Exception):
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
            raise ClientGone
        if self._next in done:
            return self._next.result()
        self.handle.cancel()
        self.outcome = "timeout"
        raise TimedOut

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


def deadline(rt: Runtime, arrived: float) -> float | None:
    return arrived + rt.settings.request_timeout if rt.settings.request_timeout > 0 else None
