"""The fixed-shape decode step (:mod:`glm4v.static_decode`) compiled once per batch bucket and replayed.

:class:`DecodeGraphs` compiles (``torch.compile``; with ``reduce-overhead`` or ``cudagraphs``, CUDA graphs) one
variant per batch bucket and warms every (bucket, window) shape up before the first request, then
``decode(tokens)`` → logits. Without ``mode`` the same fixed-shape step runs eagerly (what tests compare). The KV
cache and bitsandbytes' quantization statistics are marked static addresses, so replays never copy them.
"""

from __future__ import annotations

import logging
import time
import types

import torch

from glm4v.kv_cache import KVCache
from glm4v.static_decode import batch_buckets, kv_windows, static_decode
from quant.memory import quantization_state_tensors

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


def _fresh_copy(fn):
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class DecodeGraphs:
    """The fixed-shape decode step, compiled per batch bucket (or run eagerly when ``mode`` is None)."""

    def __init__(
        self, model, cache: KVCache, mode: str | None = None, max_batch: int | None = None, kv_step: int | None = None
    ):
        if mode is not None and mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {sorted(COMPILE_MODES)}, not {mode!r}")
        self.model = model
        self.cache = cache
        self.mode = mode
        self.buckets = batch_buckets(max_batch or cache.max_batch)
        self.device = cache.k.device
        # Compiled, the longest window stays one entry short of the row: a window as long as the row would be a
        # contiguous view, which the compiler would specialize into a second graph. The engine allocates that
        # spare entry (``spare_slots``); it is never filled.
        self.windows = kv_windows(cache.max_len - self.spare_slots(mode), kv_step)
        self._window_tensors = {}
        for w in self.windows:
            t = torch.arange(w, device=self.device)
            if mode is not None:
                torch._dynamo.mark_dynamic(t, 0)  # one graph for every window length, not one per window
            self._window_tensors[w] = t
        self.warmup_s = 0.0
        self._fns: dict[int, object] = {}
        # An input table in host memory (--offload embeddings: not a plain nn.Embedding) is read outside the graph;
        # the rows come in as an input.
        self.lookup_outside = not isinstance(model.transformer.embedding.word_embeddings, torch.nn.Embedding)
        if mode is not None:
            # The cache is mutated in place by every replay: tell dynamo its address never changes, so CUDA graphs
            # neither copy it in nor skip the graph for mutating an input (transformers' StaticCache does the same).
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            for t in quantization_state_tensors(model):
                torch._dynamo.mark_static_address(t)

    @staticmethod
    def spare_slots(mode: str | None) -> int:
        """Cache entries to allocate beyond the context for this mode."""
        return 0 if mode is None else 1

    def _fn(self, bucket: int):
        fn = self._fns.get(bucket)
        if fn is None:
            if self.mode is None:
                fn = static_decode
            else:
                # One compiled function per bucket (its batch size fixed, its window dynamic). Dynamo keeps graphs per
                # code object, so each gets a copy of static_decode's: its graphs then never compete with another
                # bucket's (or another engine's) for the recompile limit, and its guards never fail while serving.
                fn = torch.compile(
                    _fresh_copy(static_decode), fullgraph=True, dynamic=False, **COMPILE_MODES[self.mode]
                )
            self._fns[bucket] = fn
        return fn

    def _step_begin(self) -> None:
        # Each call is a new inference step: CUDA-graph trees may then reuse the previous step's output memory
        # (the engine has read the logits by then), instead of checking whether they are still alive.
        if self.mode is not None:
            torch.compiler.cudagraph_mark_step_begin()

    def window_for(self, entries: int) -> int:
        for w in self.windows:
            if w >= entries:
                return w
        raise ValueError(f"a sequence would need {entries} cache entries; the decode graphs hold {self.windows[-1]}")

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest bucket {self.buckets[-1]}")

    def _embeds(self, inputs: torch.Tensor) -> torch.Tensor | None:
        return self.model.transformer.embedding(inputs[0][:, None]) if self.lookup_outside else None

    @torch.inference_mode()  # as when serving: grad mode is part of what a compiled graph is guarded on
    def warmup(self, iterations: int = 3, buckets: list[int] | None = None) -> float:
        """Compile (and for CUDA graphs record) every bucket before serving; returns the seconds it took.

        Runs with every cache row free, so the entries it writes (slot 0 of each row) are overwritten by the first
        prefill of that row.
        """
        t0 = time.perf_counter()
        if any(self.cache.lengths):
            raise RuntimeError("warm up the decode graphs before any sequence is in the cache")
        for b in buckets or self.buckets:  # a benchmark may warm up one bucket at a time
            inputs = torch.zeros(3, b, dtype=torch.long, device=self.device)
            for w in self.windows:  # every shape serving can meet: nothing is compiled or recorded later
                for _ in range(iterations):
                    self._step_begin()
                    self._fn(b)(self.model, self.cache, inputs, self._window_tensors[w], self._embeds(inputs))
            log.debug("decode graphs for batch %d ready", b)
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
        window = self.window_for(max(cache.lengths[:n]) + 1)
        positions = cache.next_positions[:n] + [0] * (b - n)
        inputs = torch.tensor([tokens + [0] * (b - n), positions, slots], dtype=torch.long).to(self.device)
        self._step_begin()
        logits = self._fn(b)(self.model, cache, inputs, self._window_tensors[window], self._embeds(inputs))[:n]
        for i in range(n):
            cache.lengths[i] += 1
            cache.next_positions[i] += 1
        return logits
