"""A decode step with fixed shapes, so it can be captured once and replayed: ``torch.compile`` / CUDA graphs.

The ordinary decode step (:class:`~glm4v.kv_cache.CacheStep`) attends over ``max(lengths) + 1`` cache entries — a
shape that grows every step, and a batch that grows and shrinks as requests come and go. A CUDA graph needs the
same shapes and the same buffers at every replay, so this step:

* runs a *bucket* of ``B`` rows (1, 2, 4, 8, …): a batch of 5 runs in the 8-bucket, rows 5..7 as padding;
* attends over a *window* of the first ``L`` cache entries with a mask ``slot <= length``, ``L`` the smallest
  multiple of ``kv_step`` (an eighth of the row, at least 256) that holds the longest running row. The window
  length is a dynamic dimension of the compiled step: one compilation per batch bucket, one recorded CUDA graph
  per (batch, window) pair. Reading up to ``kv_step`` unused entries per row costs little: GLM-4V's cache is
  40 KiB per token against ~5–18 GB of weights read per step;
* takes its per-row inputs — token, RoPE position, cache slot — as one ``(3, B)`` tensor, built on the host from
  the cache's counters (no device→host sync);
* writes padding rows into their own next free slot (a free row's slot 0, or the slot the prompt being prefilled
  will write next), which the real writes overwrite before anything reads it.

:class:`engine.cuda_graphs.DecodeGraphs` compiles it per batch bucket and replays it; this module is only the
network-level step (the network knows nothing of compilers or quantization).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


def kv_windows(max_len: int, step: int | None = None) -> list[int]:
    """Attention window lengths: multiples of ``step`` (default an eighth of ``max_len``, at least 256), then
    ``max_len``."""
    step = step or max(256, -(-max_len // 8 // 256) * 256)
    return [w for w in range(step, max_len, step)] + [max_len]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, … up to ``max_batch`` (which is always the last bucket)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class StaticDecodeStep:
    """The :class:`~glm4v.kv_cache.CacheStep` interface for one token per row of rows ``[0, B)``, fixed shapes."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, window: torch.Tensor):
        self.cache = cache
        self.batch = slots.shape[0]
        self.window = window.shape[0]
        self.rows = torch.arange(self.batch, device=slots.device)
        self.slots = slots
        # (B, 1, 1, L): row i sees its cached entries and the one written now.
        self.mask = (window[None, :] <= slots[:, None])[:, None, None, :]

    def update_and_fetch(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        # Writes go to the whole row: a padding row's next free slot may lie beyond the window.
        ck[self.rows, :, self.slots] = k[:, :, 0]
        cv[self.rows, :, self.slots] = v[:, :, 0]
        # narrow, not [:L]: a slice would make the compiler specialize L when it equals the row length.
        k_win = ck[: self.batch].narrow(2, 0, self.window)
        v_win = cv[: self.batch].narrow(2, 0, self.window)
        return k_win, v_win, self.mask, False


def static_decode(
    model, cache: KVCache, inputs: torch.Tensor, window: torch.Tensor, embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """``inputs`` (3, B) = token ids, positions, cache slots of rows ``[0, B)``; ``window`` = ``arange(L)``, the
    cache entries attended → logits (B, vocab). ``embeds`` (B, 1, H): the tokens' input embeddings when the caller
    looked them up itself (a table in host memory cannot be read inside a captured graph).

    Pure tensor code (no host reads), so it traces into one graph.
    """
    tokens, positions, slots = inputs[0], inputs[1], inputs[2]
    if embeds is None:
        embeds = model.transformer.embedding(tokens[:, None])
    step = StaticDecodeStep(cache, slots, window)
    return model.forward_embeds(embeds, positions[:, None], step, logits_to_keep=1)[:, -1]
