"""The plain single-sequence decode loop: ``prefill`` then ``decode_one_token`` until a stop condition.

Short enough to hold in your head (gpt-fast style). The server's batched engine runs the same two steps for many
sequences at once; this loop is the reference it is checked against and what the CLI and the profiler use.

Timing hooks are optional callbacks (see :class:`GenerationHooks`); with none given, nothing extra runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .kv_cache import KVCache
from .sampling import Sampler, SamplingParams, sample_batch
from .text_stream import TextStream
from .tokenizer import GLM4Tokenizer


class GenerationHooks(Protocol):
    """Called at phase boundaries; ``profiling`` implements it to time them. All methods are optional."""

    def on_event(self, name: str) -> None: ...


@dataclass
class StepOutput:
    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" once finished


def _hook(hooks, name: str) -> None:
    if hooks is not None:
        hooks.on_event(name)


@torch.inference_mode()
def prefill(
    model,
    cache: KVCache,
    input_ids: list[int],
    pixel_values: torch.Tensor | None = None,
    row: int = 0,
    hooks: GenerationHooks | None = None,
) -> torch.Tensor:
    """Run the prompt (with its image, if any) into cache row ``row``; return the last position's logits (V,)."""
    image_embeds = None
    if pixel_values is not None:
        _hook(hooks, "vision_start")
        image_embeds = model.encode_images(pixel_values.unsqueeze(0) if pixel_values.dim() == 3 else pixel_values)
        _hook(hooks, "vision_end")
    ids = torch.tensor([input_ids], device=model.embed_device)
    out = model(ids, cache=cache, cache_row=row, logits_to_keep=1, image_embeds=image_embeds)
    return out.logits[0, -1]


@torch.inference_mode()
def decode_one_token(model, cache: KVCache, tokens: list[int], row0: int = 0) -> torch.Tensor:
    """Feed one new token to each of the contiguous rows ``row0 .. row0 + len(tokens) - 1``; return (B, V) logits."""
    ids = torch.tensor(tokens, device=model.embed_device)[:, None]
    return model(ids, cache=cache, cache_row=row0, logits_to_keep=1).logits[:, -1]


def stop_token_ids(model, params: SamplingParams) -> set[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids |= set(model.config.eos_token_ids)
    return ids


def generate(
    model,
    tokenizer: GLM4Tokenizer,
    input_ids: list[int],
    pixel_values: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    max_len: int | None = None,
    hooks: GenerationHooks | None = None,
) -> Iterator[StepOutput]:
    """Yield one :class:`StepOutput` per generated token; the last one carries ``finish_reason``.

    ``max_len`` bounds the cache (prompt entries, image expansion included, plus new tokens); it defaults to the
    config's ``seq_length``. Running out of room ends generation with ``finish_reason="length"``.
    """
    params = params or SamplingParams()
    max_len = max_len or model.config.seq_length
    cache = model.new_cache(max_len=max_len)
    sampler = Sampler(params, tokenizer.vocab_size, model.embed_device, input_ids)
    stream = TextStream(tokenizer, params.stop)
    stops = stop_token_ids(model, params)

    _hook(hooks, "prefill_start")
    logits = prefill(model, cache, input_ids, pixel_values, hooks=hooks)
    for i in range(params.max_new_tokens):
        token = sample_batch(logits[None], [sampler])[0]
        if i == 0:
            _hook(hooks, "first_token")
        else:
            _hook(hooks, "token")
        if token in stops:
            yield StepOutput(token, stream.finish(), "stop")
            return
        text, hit_stop = stream.push(token)
        if hit_stop:
            yield StepOutput(token, text, "stop")
            return
        last = i == params.max_new_tokens - 1 or cache.lengths[0] >= max_len
        if last:
            yield StepOutput(token, text + stream.finish(), "length")
            return
        yield StepOutput(token, text)
        logits = decode_one_token(model, cache, [token])[0]


def generate_text(model, tokenizer, input_ids, pixel_values=None, params=None, **kw) -> tuple[str, list[int], str]:
    """Run :func:`generate` to the end: (text, token ids, finish_reason)."""
    text, ids, reason = [], [], None
    for step in generate(model, tokenizer, input_ids, pixel_values, params, **kw):
        text.append(step.text)
        ids.append(step.token_id)
        reason = step.finish_reason
    return "".join(text), ids, reason
