"""A decode step with fixed shapes, so it can be captured once and replayed: ``torch.compile`` / CUDA graphs.

The ordinary decode step (:class:`~glm4v.kv_cache.CacheStep`) attends over ``max(lengths) + 1`` cache entries — a
shape that grows every step, and a batch that grows and shrinks as requests come and go. A CUDA graph needs the
same shapes and the same buffers at every replay, so this step:

* runs a *bucket* of ``B`` rows (1, 2, 4, 8, …): a batch of 5 runs in the 8-bucket, rows 5..7 as padding;
* attends over the whole cache row (``max_len`` entries) with a mask ``slot <= length``; GLM-4V's cache is small
  (2 KV groups), so reading all of it costs ~1 % of the weight reads per step at 8k context;
* takes its per-row inputs — token, RoPE position, cache slot — as one ``(3, B)`` tensor, built on the host from
  the cache's counters (no device→host sync);
* writes padding rows into their own next free slot (a free row's slot 0, or the slot the prompt being prefilled
  will write next), which the real writes overwrite before anything reads it.

:class:`DecodeGraphs` wraps it: one compiled variant per bucket, compiled and warmed up before the first request,
then ``decode(rows)`` → logits. Without ``mode`` the same fixed-shape step runs eagerly (what tests compare).
"""

from __future__ import annotations

import logging
import time
import types

import torch

from .kv_cache import KVCache

log = logging.getLogger(__name__)

# --compile MODE → torch.compile arguments. "reduce-overhead" is inductor's fused kernels replayed as CUDA graphs;
# "cudagraphs" captures the traced graph as it is (no code generation: works where Triton cannot, e.g. older GPUs);
# "default" is inductor without CUDA graphs. "aot_eager" only traces (tests: proves the step has no graph break).
COMPILE_MODES = {
    "reduce-overhead": dict(backend="inductor", mode="reduce-overhead"),
    "cudagraphs": dict(backend="cudagraphs"),
    "default": dict(backend="inductor"),
    "aot_eager": dict(backend="aot_eager"),
}


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, … up to ``max_batch`` (which is always the last bucket)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class StaticDecodeStep:
    """The :class:`~glm4v.kv_cache.CacheStep` interface for one token per row of rows ``[0, B)``, fixed shapes."""

    def __init__(self, cache: KVCache, slots: torch.Tensor):
        self.cache = cache
        self.batch = slots.shape[0]
        self.rows = torch.arange(self.batch, device=slots.device)
        self.slots = slots
        # (B, 1, 1, max_len): row i sees its cached entries and the one written now.
        self.mask = (torch.arange(cache.max_len, device=slots.device)[None, :] <= slots[:, None])[:, None, None, :]

    def update_and_fetch(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[self.rows, :, self.slots] = k[:, :, 0]
        cv[self.rows, :, self.slots] = v[:, :, 0]
        return ck[: self.batch], cv[: self.batch], self.mask, False


def static_decode(model, cache: KVCache, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` (3, B) = token ids, positions, cache slots of rows ``[0, B)`` → logits (B, vocab).

    Pure tensor code over fixed shapes (no host reads), so it traces into one graph.
    """
    tokens, positions, slots = inputs[0], inputs[1], inputs[2]
    embeds = model.transformer.embedding(tokens[:, None])
    step = StaticDecodeStep(cache, slots)
    return model.forward_embeds(embeds, positions[:, None], step, logits_to_keep=1)[:, -1]


def _fresh_copy(fn):
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class DecodeGraphs:
    """The fixed-shape decode step, compiled per batch bucket (or run eagerly when ``mode`` is None)."""

    def __init__(self, model, cache: KVCache, mode: str | None = None, max_batch: int | None = None):
        if mode is not None and mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {sorted(COMPILE_MODES)}, not {mode!r}")
        self.model = model
        self.cache = cache
        self.mode = mode
        self.buckets = batch_buckets(max_batch or cache.max_batch)
        self.device = cache.k.device
        self.warmup_s = 0.0
        self._fns: dict[int, object] = {}
        if mode is not None:
            # The cache is mutated in place by every replay: tell dynamo its address never changes, so CUDA graphs
            # neither copy it in nor skip the graph for mutating an input (transformers' StaticCache does the same).
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)

    def _fn(self, bucket: int):
        fn = self._fns.get(bucket)
        if fn is None:
            if self.mode is None:
                fn = static_decode
            else:
                # One compiled function per bucket, each with its own fixed shapes. Dynamo keeps compiled graphs per
                # code object, so each gets a copy of static_decode's: its graphs then never compete with another
                # bucket's (or another engine's) for the recompile limit, and its guards never fail while serving.
                fn = torch.compile(_fresh_copy(static_decode), fullgraph=True, dynamic=False,
                                   **COMPILE_MODES[self.mode])
            self._fns[bucket] = fn
        return fn

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest bucket {self.buckets[-1]}")

    @torch.inference_mode()  # as when serving: grad mode is part of what a compiled graph is guarded on
    def warmup(self, iterations: int = 3) -> float:
        """Compile (and for CUDA graphs record) every bucket before serving; returns the seconds it took.

        Runs with every cache row free, so the entries it writes (slot 0 of each row) are overwritten by the first
        prefill of that row.
        """
        t0 = time.perf_counter()
        lengths = list(self.cache.lengths)
        if any(lengths):
            raise RuntimeError("warm up the decode graphs before any sequence is in the cache")
        for b in self.buckets:
            inputs = torch.zeros(3, b, dtype=torch.long, device=self.device)
            for _ in range(iterations):
                self._fn(b)(self.model, self.cache, inputs)
            log.debug("decode graph for batch %d ready", b)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to cache row ``i`` (rows ``0 .. len(tokens) - 1``); return logits (len(tokens), vocab).

        Advances the rows' lengths and positions, like ``model(ids, cache=...)`` does.
        """
        cache, n = self.cache, len(tokens)
        b = self.bucket_for(n)
        last = cache.max_len - 1
        slots = [min(cache.lengths[i], last) for i in range(b)]
        if any(cache.lengths[i] > last for i in range(n)):
            raise ValueError(f"a sequence would need more than the cache's {cache.max_len} entries")
        positions = cache.next_positions[:n] + [0] * (b - n)
        inputs = torch.tensor([tokens + [0] * (b - n), positions, slots], dtype=torch.long).to(self.device)
        logits = self._fn(b)(self.model, cache, inputs)[:n]
        for i in range(n):
            cache.lengths[i] += 1
            cache.next_positions[i] += 1
        return logits
