"""What the engine hands its callers: requests in, a stream of events out, per-request timings.

A :class:`RequestHandle` is the caller's side of one generation. The engine thread pushes :class:`Event`s into it;
the caller iterates it with ``async for`` (the server, from its event loop) or a plain ``for`` (benchmarks, tests),
and can ``cancel()`` it at any time. Nothing here touches the model.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from glm4v.chat_template import expanded_length
from glm4v.sampling import SamplingParams, TokenLogprob


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    pixel_values: torch.Tensor | None = None  # (3, N, N) normalized
    request_id: str = ""
    matcher: Any = None  # engine.structured.Matcher: this request's own grammar state (response_format), or None
    # The image's identity (engine.prefix_cache.image_key) lets the engine cache its features and reuse a kept
    # prefix that holds it; image_features (P + 2, H), when the caller found them cached, stand in for pixel_values.
    image_key: str | None = None
    image_features: torch.Tensor | None = None
    image_size: int | None = None  # vision input side N; taken from pixel_values when they are given

    @property
    def has_image(self) -> bool:
        return self.pixel_values is not None or self.image_features is not None

    @property
    def vision_size(self) -> int | None:
        return self.pixel_values.shape[-1] if self.pixel_values is not None else self.image_size

    def cache_entries(self, image_tokens: int) -> int:
        """Cache entries the prompt occupies: the image's 3 placeholder tokens become ``image_tokens`` entries."""
        return expanded_length(len(self.prompt_ids), image_tokens if self.has_image else None)


@dataclass
class Event:
    kind: str  # "delta" | "finish" | "error"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    error: BaseException | None = None
    logprobs: list[TokenLogprob] | None = None  # one per entry of token_ids, when the request asked for them


@dataclass
class Timings:
    """Wall-clock timestamps (time.perf_counter) of one request, for metrics and profiling."""

    submitted: float = 0.0
    started: float | None = None  # left the queue, prefill began
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)


class _Channel:
    """Delivers events from the engine thread to an asyncio consumer or to a blocking reader."""

    def __init__(self):
        try:
            self.loop = asyncio.get_running_loop()
            self.aq: asyncio.Queue | None = asyncio.Queue()
            self.q = None
        except RuntimeError:
            self.loop, self.aq, self.q = None, None, queue.Queue()

    def put(self, ev: Event) -> None:
        if self.aq is not None:
            try:
                self.loop.call_soon_threadsafe(self.aq.put_nowait, ev)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass
        else:
            self.q.put(ev)


class RequestHandle:
    """What ``submit`` returns: iterate it (async or not) for events; ``cancel()`` stops generation."""

    def __init__(self, request: GenerationRequest, prompt_tokens: int):
        self.request = request
        self.request_id = request.request_id
        self.prompt_tokens = prompt_tokens  # as the model sees it: image embeddings counted
        self.cached_tokens = 0  # of those, entries a kept cache row already held (prefix reuse): not prefilled
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.timings = Timings(submitted=time.perf_counter())
        self._cancelled = threading.Event()
        self._channel = _Channel()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, ev: Event) -> None:
        self._channel.put(ev)

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        if self._channel.aq is None:
            raise RuntimeError("this handle was created outside an event loop; iterate it synchronously")
        while True:
            ev = await self._channel.aq.get()
            yield ev
            if ev.kind != "delta":
                return

    def __iter__(self):
        if self._channel.q is None:
            raise RuntimeError("this handle was created inside an event loop; iterate it with `async for`")
        while True:
            ev = self._channel.q.get()
            yield ev
            if ev.kind != "delta":
                return
