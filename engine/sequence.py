"""One request's state inside the engine: its sampler and stop rules, its prefill progress, its output so far.

:meth:`Sequence.accept_token` is the postprocessing of one sampled token — stop tokens, stop strings, the length
limit, UTF-8-safe detokenizing — and streams the resulting events to the request's handle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from glm4v.generate import stop_token_ids
from glm4v.sampling import Sampler, TokenLogprob
from glm4v.text_stream import TextStream

from .requests import Event, RequestHandle


@dataclass
class Sequence:
    handle: RequestHandle
    sampler: Sampler
    stream: TextStream
    stops: set[int]
    max_new: int
    generated: int = 0
    last_token: int = -1
    matcher: Any = None  # engine.structured.Matcher when the request is constrained by a grammar
    output_ids: list[int] = field(default_factory=list)  # every sampled token, in order
    # prefill state
    reused_tokens: int = 0  # leading prompt tokens whose KV a kept row already held (engine.prefix_cache)
    image_features: torch.Tensor | None = None  # cached (P + 2, H) image embeddings: the vision tower is skipped
    vision_x: torch.Tensor | None = None  # (1, 1 + g², C) ViT hidden state while the image is being encoded
    vision_layers_done: int = 0
    embeds: torch.Tensor | None = None  # (1, S, H) with the image spliced in
    positions: torch.Tensor | None = None  # (1, S)
    next_position: int = 0
    done_entries: int = 0
    row: int = -1  # cache row written during prefill (the first free row when it began)

    @classmethod
    def start(cls, handle: RequestHandle, model, tokenizer, vocab_size: int, device, max_model_len: int) -> Sequence:
        req, p = handle.request, handle.request.params
        return cls(
            handle=handle,
            sampler=Sampler(p, vocab_size, device, req.prompt_ids),
            stream=TextStream(tokenizer, p.stop),
            stops=stop_token_ids(model, p),
            max_new=min(p.max_new_tokens, max_model_len - handle.prompt_tokens),
            matcher=req.matcher,
        )

    @property
    def request(self):
        return self.handle.request

    def accept_token(self, tok: int, first: bool, now: float, logprob: TokenLogprob | None = None) -> bool:
        """Record and stream one sampled token; True when the sequence has finished. A grammar that refuses the
        token raises (the engine fails this sequence alone)."""
        h = self.handle
        if self.matcher is not None:
            self.matcher.accept(tok)
        if first:
            h.timings.first_token = now
        h.timings.token_times.append(now)
        self.generated += 1
        h.completion_tokens = self.generated
        self.last_token = tok
        self.output_ids.append(tok)
        reason = None
        if h.cancelled:
            reason, text, logprob = "cancelled", "", None
        elif tok in self.stops:
            reason, text, logprob = "stop", self.stream.finish(), None  # the stop token is not part of the answer
        else:
            text, hit = self.stream.push(tok)
            if hit:
                reason = "stop"
            elif self.matcher is not None and self.matcher.stopped:  # the grammar is complete: nothing may follow
                reason, text = "stop", text + self.stream.finish()
            elif self.generated >= self.max_new:
                reason, text = "length", text + self.stream.finish()
        if text or reason is None or logprob is not None:
            h._emit(Event("delta", text=text, token_ids=[tok], logprobs=None if logprob is None else [logprob]))
        if reason is not None:
            h.finish_reason = reason
            h.timings.finished = now
            h._emit(Event("finish", finish_reason=reason))
        return reason is not None

    def fail(self, err: BaseException) -> None:
        self.handle.finish_reason = "error"
        self.handle.timings.finished = time.perf_counter()
        self.handle._emit(Event("error", error=err))

    def cancel(self) -> None:
        self.handle._emit(Event("finish", finish_reason="cancelled"))
