"""The engine: one thread owns the model and runs continuous batching over a preallocated KV cache.

Its step reads ``schedule → run → postprocess``:

* **schedule** (:class:`engine.scheduler.Scheduler`): admit the next waiting request into prefill when a cache
  row is free (first come, first served; one prefill at a time);
* **run** (:class:`engine.model_runner.ModelRunner`): one unit of that prompt's prefill — a group of
  ``vision_layers_per_step`` ViT layers, or ``prefill_chunk`` prompt entries — then one decode step for every
  running sequence together (decode on one GPU is memory-bound: a batch of 8 costs little more than one);
* **postprocess** (:meth:`engine.sequence.Sequence.accept_token`): sample, detokenize, apply stops, stream events;
  finished sequences leave at once, and the last running row moves into the hole so rows stay contiguous.

Multi-turn (:mod:`engine.prefix_cache`): a finished sequence's row is *kept* outside the running rows with a record
of the tokens it holds; a new prefill claims the kept row holding the longest start of its prompt and prefills only
the rest (else an empty row, else the least recently used kept row — kept rows never delay admission), and an
image's vision-tower output is cached in host memory by the image's bytes, vision size and precision.

How long a new prompt can stall everyone else's stream: one unit of prefill work between two decode steps. With
``decode_graphs`` (``serve --compile``) the decode step is the fixed-shape one compiled per batch bucket when the
engine starts (:mod:`engine.cuda_graphs`); prefill is always the ordinary forward.

Failure isolation: an error in one sequence — its sampler, stop handling or detokenizer, or non-finite logits for
its row (:class:`glm4v.sampling.NumericalError`), at its first token or any later one — ends that sequence alone
with an ``error`` event and frees its row; the others keep decoding. Only a failure of the shared forward pass
ends every sequence in the step. No sampling parameter the API accepts can make sampling fail (:mod:`glm4v.sampling`).

The engine knows nothing of HTTP: it takes token ids, pixels and sampling parameters, and streams events back to
whoever submitted them (see :mod:`engine.requests`) — an asyncio consumer (the server) or a plain thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

from glm4v.generate import GenerationHooks

from .config import EngineConfig, choose_max_model_len, compile_mode
from .model_runner import ModelRunner
from .prefix_cache import ImageFeatureCache, PrefixCache, RowRecord
from .requests import EngineStoppedError, Event, GenerationRequest, RequestHandle
from .sample_step import sample_step
from .scheduler import Scheduler
from .sequence import Sequence
from .structured import GrammarCompiler

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    waiting: int
    running: int
    prefilling: int
    max_batch_size: int
    max_model_len: int
    requests_total: int
    kv_cache_bytes: int
    # engine.prefix_cache: the image-feature cache and prefix reuse (counters since start)
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    image_cache_bytes: int = 0
    image_cache_entries: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_reused_tokens: int = 0
    prefix_kept_rows: int = 0


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        vision_layers_per_step: int = 8,
        decode_graphs: str | None = None,
        hooks: GenerationHooks | None = None,
        prefix_cache: bool = True,
        image_cache_mb: float = 256,
    ):
        """``decode_graphs``: None decodes with the ordinary forward; a :data:`engine.cuda_graphs.COMPILE_MODES`
        key compiles the fixed-shape decode step per batch bucket before serving (``--compile``); "static" runs that
        step uncompiled. A compile that fails logs why and falls back to the ordinary forward. ``prefix_cache``
        keeps finished rows for prefix reuse; ``image_cache_mb`` bounds the image-feature cache (0 = off); see
        :mod:`engine.prefix_cache`."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len or model.config.seq_length
        self.max_queue = max_queue
        self.hooks = hooks
        self.vocab_size = min(tokenizer.vocab_size, model.config.padded_vocab_size)
        self.device = model.embed_device
        # Response formats → grammars, compiled and cached in the requests' preparation threads, never on this one.
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, model.config.eos_token_ids)
        self.scheduler = Scheduler(max_batch_size, max_queue)
        self.image_cache = ImageFeatureCache(int(image_cache_mb * 2**20))
        self.prefix = PrefixCache(prefix_cache)
        # The cache is allocated by the engine thread when it starts (see _loop).
        self.runner = ModelRunner(
            model,
            max_batch_size,
            self.max_model_len,
            prefill_chunk,
            vision_layers_per_step,
            decode_graphs,
            hooks,
            image_cache=self.image_cache,
        )
        self.kv_cache_bytes = self.runner.kv_cache_bytes
        self._cv = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.requests_total = 0

    @classmethod
    def for_model(cls, lm, config: EngineConfig, hooks=None) -> Engine:
        """An engine for a loaded model (:class:`quant.LoadedModel`): the context sized for the device, --compile
        applied where it pays."""
        return cls(
            lm.model,
            lm.tokenizer,
            max_batch_size=config.max_batch_size,
            max_model_len=choose_max_model_len(lm, config),
            max_queue=config.max_queue,
            prefill_chunk=config.prefill_chunk,
            vision_layers_per_step=config.vision_layers_per_step,
            decode_graphs=compile_mode(config.compile, lm.device),
            hooks=hooks,
            prefix_cache=config.prefix_cache,
            image_cache_mb=config.image_cache_mb,
        )

    # ---- public API (any thread) ----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the engine thread; returns once its KV cache is allocated (raises if it cannot be)."""
        if self._thread is None:
            self._started = threading.Event()
            self._start_error: BaseException | None = None
            self._thread = threading.Thread(target=self._loop, name="glm4v-engine", daemon=True)
            self._thread.start()
            self._started.wait()
            if self._start_error is not None:
                self._thread.join()
                raise self._start_error
        return self

    def prompt_tokens(self, request: GenerationRequest) -> int:
        if not request.has_image:
            return len(request.prompt_ids)
        if request.image_features is not None:
            return request.cache_entries(request.image_features.shape[0])
        return request.cache_entries(self.model.config.vision.image_tokens(request.vision_size))

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises QueueFullError / EngineStoppedError / ValueError (does not fit the context)."""
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        prompt_tokens = self.prompt_tokens(request)
        if prompt_tokens + 1 > self.max_model_len:
            raise ValueError(
                f"prompt needs {prompt_tokens} tokens but the context (max_model_len) is {self.max_model_len}"
            )
        handle = RequestHandle(request, prompt_tokens)
        with self._cv:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            self.scheduler.add(handle)
            self.requests_total += 1
            self._cv.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._cv:
            s = self.scheduler
            return EngineStats(
                waiting=len(s.waiting),
                running=len(s.running),
                prefilling=int(s.prefilling is not None),
                max_batch_size=self.max_batch_size,
                max_model_len=self.max_model_len,
                requests_total=self.requests_total,
                kv_cache_bytes=self.kv_cache_bytes,
                image_cache_hits=self.image_cache.hits,
                image_cache_misses=self.image_cache.misses,
                image_cache_bytes=self.image_cache.bytes,
                image_cache_entries=len(self.image_cache),
                prefix_hits=self.prefix.hits,
                prefix_misses=self.prefix.misses,
                prefix_reused_tokens=self.prefix.reused_tokens,
                prefix_kept_rows=len(self.prefix.kept),
            )

    def compile_status(self) -> dict | None:
        """What /v1/models reports about --compile: None when it was not asked for."""
        return self.runner.compile_status()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let running ones finish for up to ``timeout`` s, then cancel the rest."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if s.waiting == 0 and s.running == 0 and s.prefilling == 0:
                break
            time.sleep(0.02)
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        # Anything still queued ends cleanly for its consumer.
        for h in list(self.scheduler.waiting):
            h._emit(Event("finish", finish_reason="cancelled"))
        self.scheduler.waiting.clear()

    # ---- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        # All of the engine's torch work — the cache allocation included — happens on this one thread. On a CPU,
        # every other thread that ran a parallel torch op keeps an idle OpenMP team, and libgomp then throttles the
        # spin-waiting of ours: small ops get many times slower (docs/PERFORMANCE.md). Request threads therefore do
        # no torch math.
        torch.set_grad_enabled(False)
        try:
            self.runner.allocate()
        except MemoryError as e:
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self.scheduler.has_work():
                        self._cv.wait()
                    if self._stopping:
                        break
                    self.scheduler.admit(self._start_sequence)  # schedule
                try:
                    self.step()  # run → postprocess
                except Exception as e:  # never let the thread die: fail what was in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_in_flight(e)
            for seq in self.scheduler.in_flight():
                seq.cancel()
            self.scheduler.clear()

    def step(self) -> None:
        """One unit of the current prefill, then one decode step for every running sequence."""
        if self.scheduler.prefilling is not None:
            self._prefill_step()
        if self.scheduler.running:
            self._decode_step()

    def _start_sequence(self, handle: RequestHandle) -> Sequence:
        return Sequence.start(handle, self.model, self.tokenizer, self.vocab_size, self.device, self.max_model_len)

    def _fail_in_flight(self, err: BaseException) -> None:
        """An unexpected error outside the model calls: end every in-flight request with it, free every row."""
        for seq in self.scheduler.in_flight():
            seq.fail(err)
        self.scheduler.clear()
        self.runner.reset_row()
        self.prefix.drop()
        self.runner.after_error(err)

    def _prefill_step(self) -> None:
        """One unit of the current prompt's prefill; the last unit samples its first token."""
        seq = self.scheduler.prefilling
        if seq.handle.cancelled:
            self.scheduler.prefilling = None
            seq.cancel()
            return
        try:
            if seq.row < 0:
                seq.handle.timings.started = time.perf_counter()
                self._claim_row(seq)
            logits = self.runner.prefill_unit(seq)
        except Exception as e:  # this prompt's problem alone (its image, its row, out of memory in its prefill)
            self.scheduler.prefilling = None
            if seq.row >= 0:
                self.runner.reset_row(seq.row)
                self.prefix.drop(seq.row)
            self.runner.after_error(e)
            seq.fail(e)
            return
        if logits is None:
            return
        moved_from = self.scheduler.promote(seq)
        if moved_from is not None:  # rows finished meanwhile: close the gap so running rows stay contiguous
            self._swap(moved_from, len(self.scheduler.running) - 1)
        self._postprocess([seq], *self._sample([seq], logits), first=True)

    def _decode_step(self) -> None:
        seqs = list(self.scheduler.running)
        try:  # the shared forward: when it fails, it fails for every row
            logits = self.runner.decode([s.last_token for s in seqs])
        except Exception as e:
            self.runner.after_error(e)
            for s in seqs:
                s.fail(e)
            self.scheduler.running = []
            return
        self._postprocess(seqs, *self._sample(seqs, logits), first=False)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list, list, list]:
        return sample_step(seqs, logits, self.vocab_size)

    def _postprocess(
        self, seqs: list[Sequence], tokens: list[int], errors: list[Exception | None], logprobs: list, first: bool
    ) -> None:
        """Stream each row's token; a row that finished or failed leaves (failing ends that request alone)."""
        now = time.perf_counter()
        self._hook("first_token" if first else "token")
        leaving = []
        for seq, tok, err, lp in zip(seqs, tokens, errors, logprobs, strict=True):
            try:
                if err is not None:
                    raise err
                if seq.accept_token(tok, first, now, lp):
                    leaving.append(seq)
            except Exception as e:  # its sampler, stop handling or detokenizer: this request's problem alone
                log.warning("request %s failed: %s: %s", seq.handle.request_id, type(e).__name__, e)
                self.runner.after_error(e)
                seq.fail(e)
                leaving.append(seq)
        for seq in leaving:
            self._leave(seq)

    # ---- rows: prefix reuse (engine.prefix_cache) -------------------------------------------------------------
    def _record(self, req, tokens: list[int]) -> RowRecord:
        boi = self.model.config.boi_token_id
        has_image = req.has_image and boi in req.prompt_ids
        return RowRecord(
            tokens,
            image_key=req.image_key if has_image else None,
            boi=req.prompt_ids.index(boi) if has_image else None,
            image_entries=self.prompt_tokens(req) - len(req.prompt_ids) + 3 if has_image else 0,
        )

    def _claim_row(self, seq: Sequence) -> None:
        """Give a new prefill its row: a kept row holding the longest prefix of its prompt (truncated to it, and
        only the rest is prefilled), else an empty or the least recently used kept row."""
        req = seq.request
        free = [r for r in range(len(self.scheduler.running), self.max_batch_size)]
        want = self._record(req, req.prompt_ids)
        seq.row, seq.reused_tokens = self.prefix.claim(free, want)
        if seq.reused_tokens:
            seq.handle.cached_tokens = want.entries(seq.reused_tokens)
            self.runner.reuse_row(seq.row, seq.handle.cached_tokens, seq.reused_tokens)
        else:
            self.runner.reset_row(seq.row)
        seq.image_features = req.image_features
        if seq.image_features is None and req.has_image and self.runner.image_in_suffix(seq):
            seq.image_features = self.image_cache.get(req.image_key)

    def _swap(self, a: int, b: int) -> None:
        """Exchange two rows; a kept row's contents travel with it (without prefix reuse: a plain move)."""
        if a == b:
            return
        if self.prefix.enabled:
            self.runner.swap_rows(a, b)
            self.prefix.swapped(a, b)
        else:
            self.runner.move_row(a, b)

    def _leave(self, seq: Sequence) -> None:
        """A finished or failed sequence leaves the running rows; the last running row fills its hole, and a
        finished one's row is kept for prefix reuse (it holds the prompt and every generated token but the last)."""
        last, hole = self.scheduler.remove(seq)
        self._swap(last, hole)  # the finished row's contents end up in row `last`, now outside the running rows
        if not self.prefix.enabled or seq.handle.finish_reason in (None, "error"):
            self.runner.reset_row(last)
            self.prefix.drop(last)
            return
        req = seq.request
        self.prefix.keep(last, self._record(req, req.prompt_ids + seq.output_ids[:-1]))

    def _hook(self, name: str) -> None:
        if self.hooks is not None:
            self.hooks.on_event(name)
