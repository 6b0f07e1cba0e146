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


def kv_windows(max_len: int, step: int | None = None) -> list[int]:
    """Attention window lengths: multiples of ``step`` (default an eighth of ``max_len``, at least 256), then
    ``max_len``."""
    step = step or max(256, -(-max_len // 8 // 256) * 256)
    return [w for w in range(step, max_len, step)] + [max_len]


def quantization_state_tensors(model):
    """The bitsandbytes tensors that live beside the weights rather than as parameters (4-bit absmax/code, nested
    statistics; int8 row scales). The compiled step reads them as inputs; unless marked static, a CUDA graph would
    copy them — ~150 MB of absmax for the full model in nf4 — into its own buffers at every replay."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        while state is not None:  # QuantState, then its nested state2
            for name in ("absmax", "code", "offset"):
                t = getattr(state, name, None)
                if isinstance(t, torch.Tensor):
                    yield t
            state = getattr(state, "state2", None)
        # Int8Params holds CB/SCB until the layer's first forward moves them to the layer's MatmulLtState.
        for holder in (weight, getattr(module, "state", None)):
            for name in ("CB", "SCB"):
                t = getattr(holder, name, None)
                if isinstance(t, torch.Tensor):
                    yield t


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


def static_decode(model, cache: KVCache, inputs: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``inputs`` (3, B) = token ids, positions, cache slots of rows ``[0, B)``; ``window`` = ``arange(L)``, the
    cache entries attended → logits (B, vocab).

    Pure tensor code (no host reads), so it traces into one graph.
    """
    tokens, positions, slots = inputs[0], inputs[1], inputs[2]
    embeds = model.transformer.embedding(tokens[:, None])
    step = StaticDecodeStep(cache, slots, window)
    return model.forward_embeds(embeds, positions[:, None], step, logits_to_keep=1)[:, -1]


def _fresh_copy(fn):
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class DecodeGraphs:
    """The fixed-shape decode step, compiled per batch bucket (or run eagerly when ``mode`` is None)."""

    def __init__(self, model, cache: KVCache, mode: str | None = None, max_batch: int | None = None,
                 kv_step: int | None = None):
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
                fn = torch.compile(_fresh_copy(static_decode), fullgraph=True, dynamic=False,
                                   **COMPILE_MODES[self.mode])
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

    @torch.inference_mode()  # as when serving: grad mode is part of what a compiled graph is guarded on
    def warmup(self, iterations: int = 3) -> float:
        """Compile (and for CUDA graphs record) every bucket before serving; returns the seconds it took.

        Runs with every cache row free, so the entries it writes (slot 0 of each row) are overwritten by the first
        prefill of that row.
        """
        t0 = time.perf_counter()
        if any(self.cache.lengths):
            raise RuntimeError("warm up the decode graphs before any sequence is in the cache")
        for b in self.buckets:
            inputs = torch.zeros(3, b, dtype=torch.long, device=self.device)
            for w in self.windows:  # every shape serving can meet: nothing is compiled or recorded later
                for _ in range(iterations):
                    self._step_begin()
                    self._fn(b)(self.model, self.cache, inputs, self._window_tensors[w])
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
        logits = self._fn(b)(self.model, cache, inputs, self._window_tensors[window])[:n]
        for i in range(n):
            cache.lengths[i] += 1
            cache.next_positions[i] += 1
        return logits
