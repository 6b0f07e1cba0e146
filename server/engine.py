"""The engine: one thread owns the model and runs continuous batching over a preallocated KV cache.

Requests queue (bounded) and are admitted while cache rows are free. Each loop iteration does at most one unit of
one prompt's prefill and then one decode step for every running sequence together — decode on one GPU is
memory-bound, so a batch of 8 costs little more than a batch of 1. A
sequence that finishes or is cancelled leaves at the next step; its cache row is refilled by moving the last
running row into it, so running rows stay contiguous and a decode step reads one slice of the cache.

How long a new prompt can stall everyone else's stream: one unit of prefill work between two decode steps — at
most ``vision_layers_per_step`` ViT layers of its image (default 8 of GLM-4V's 63) plus ``prefill_chunk`` prompt
entries (default 512). The image is encoded layer group by layer group, the spliced prompt chunk by chunk, with a
decode step for the running sequences after each unit.

With ``decode_graphs`` (``serve --compile``) the decode step is the fixed-shape one of :mod:`glm4v.static_decode`,
compiled per batch bucket when the engine starts; prefill is always the ordinary forward.

Failure isolation: an error in one sequence — its sampler, stop handling or detokenizer, or non-finite logits for
its row (:class:`glm4v.sampling.NumericalError`), at its first token or any later one — ends that sequence alone
with an ``error`` event and frees its row; the others keep decoding. Only a failure of the shared forward pass
ends every sequence in the step. No sampling parameter the API accepts can make sampling fail (:mod:`glm4v.sampling`).

The engine knows nothing of HTTP: it takes token ids, pixels and sampling parameters, and streams events back to
whoever submitted them (see :mod:`server.requests`) — an asyncio consumer (the server) or a plain thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from glm4v.generate import stop_token_ids
from glm4v.kv_cache import CacheStep, KVCache
from glm4v.sampling import Sampler, sample_rows
from glm4v.static_decode import DecodeGraphs
from glm4v.text_stream import TextStream

from .requests import EngineStoppedError, Event, GenerationRequest, QueueFullError, RequestHandle

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    handle: RequestHandle
    sampler: Sampler
    stream: TextStream
    stops: set[int]
    max_new: int
    generated: int = 0
    last_token: int = -1
    # prefill state
    vision_x: torch.Tensor | None = None  # (1, 1 + g², C) ViT hidden state while the image is being encoded
    vision_layers_done: int = 0
    embeds: torch.Tensor | None = None  # (1, S, H) with the image spliced in
    positions: torch.Tensor | None = None  # (1, S)
    next_position: int = 0
    done_entries: int = 0
    row: int = -1  # cache row written during prefill (the first free row when it began)


@dataclass
class EngineStats:
    waiting: int
    running: int
    prefilling: int
    max_batch_size: int
    max_model_len: int
    requests_total: int
    kv_cache_bytes: int


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
        hooks=None,
    ):
        """``decode_graphs``: None decodes with the ordinary forward; a :data:`glm4v.static_decode.COMPILE_MODES`
        key compiles the fixed-shape decode step per batch bucket before serving (``--compile``); "static" runs that
        step uncompiled. A compile that fails logs why and falls back to the ordinary forward."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len or model.config.seq_length
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.vision_layers_per_step = vision_layers_per_step
        self.hooks = hooks
        self.decode_graphs = decode_graphs
        self.graphs: DecodeGraphs | None = None
        self.compile_error: str | None = None
        self.vocab_size = min(tokenizer.vocab_size, model.config.padded_vocab_size)
        self.device = model.embed_device
        # Allocated by the engine thread when it starts (see _loop); a prefill always writes the first free row.
        self.cache = None
        c = model.config
        self.kv_cache_bytes = max_batch_size * self.max_model_len * KVCache.bytes_per_token(
            c.num_layers, c.num_kv_heads, c.head_dim, model.embed_dtype)
        self._waiting: deque[RequestHandle] = deque()
        self._running: list[_Sequence] = []  # row i of the cache holds _running[i]
        self._prefilling: _Sequence | None = None
        self._cv = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.requests_total = 0

    # ---- public API (any thread) ----------------------------------------------------------------------------
    def start(self) -> "Engine":
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
        if request.pixel_values is None:
            return len(request.prompt_ids)
        return request.cache_entries(self.model.config.vision.image_tokens(request.pixel_values.shape[-1]))

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
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (limit {self.max_queue})")
            self._waiting.append(handle)
            self.requests_total += 1
            self._cv.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(
                waiting=len(self._waiting),
                running=len(self._running),
                prefilling=int(self._prefilling is not None),
                max_batch_size=self.max_batch_size,
                max_model_len=self.max_model_len,
                requests_total=self.requests_total,
                kv_cache_bytes=self.kv_cache_bytes,
            )

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
        # Anything still queued or running ends cleanly for its consumer.
        for h in list(self._waiting):
            h._emit(Event("finish", finish_reason="cancelled"))
        self._waiting.clear()

    # ---- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        # All of the engine's torch work — the cache allocation included — happens on this one thread. On a CPU,
        # every other thread that ran a parallel torch op keeps an idle OpenMP team, and libgomp then throttles the
        # spin-waiting of ours: small ops get many times slower (docs/PERFORMANCE.md). Request threads therefore do
        # no torch math.
        torch.set_grad_enabled(False)
        try:
            spare = DecodeGraphs.spare_slots(None if self.decode_graphs in (None, "static") else self.decode_graphs)
            self.cache = self.model.new_cache(max_len=self.max_model_len + spare, max_batch=self.max_batch_size)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # CPU allocators raise RuntimeError, CUDA OutOfMemory
            self._start_error = MemoryError(
                f"the KV cache for {self.max_batch_size} sequences × {self.max_model_len} tokens "
                f"({self.kv_cache_bytes / 2**30:.2f} GiB) could not be allocated ({type(e).__name__}): "
                "lower --max-batch-size or --max-model-len"
            )
            self._started.set()
            return
        if self.decode_graphs is not None:
            self._build_graphs()
        self._started.set()
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._has_work():
                        self._cv.wait()
                    if self._stopping:
                        break
                    self._admit()
                try:
                    if self._prefilling is not None:
                        self._prefill_step()
                    if self._running:
                        self._decode_step()
                except Exception as e:  # never let the thread die: fail what was in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_in_flight(e)
            for seq in self._running + ([self._prefilling] if self._prefilling else []):
                seq.handle._emit(Event("finish", finish_reason="cancelled"))
            self._running.clear()
            self._prefilling = None

    def _build_graphs(self) -> None:
        mode = None if self.decode_graphs == "static" else self.decode_graphs
        try:
            graphs = DecodeGraphs(self.model, self.cache, mode, self.max_batch_size)
            log.info("compiling the decode step (%s) for batch sizes %s", self.decode_graphs, graphs.buckets)
            graphs.warmup()
        except Exception as e:  # a backend that cannot capture this model (e.g. int8's outlier path): run eagerly
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:3]  # dynamo's advice follows
            self.compile_error = f"{type(e).__name__}: {' '.join(lines)}"[:500]
            log.warning("--compile %s failed, decoding without it: %s", self.decode_graphs, self.compile_error)
            self.cache.reset()
            self._after_error(e)
            return
        self.graphs = graphs
        log.info("decode step compiled (%s) in %.1f s", self.decode_graphs, graphs.warmup_s)

    def compile_status(self) -> dict | None:
        """What /v1/models reports about --compile: None when it was not asked for."""
        if self.decode_graphs is None:
            return None
        return {
            "mode": self.decode_graphs,
            "active": self.graphs is not None,
            "batch_buckets": self.graphs.buckets if self.graphs is not None else [],
            "warmup_s": round(self.graphs.warmup_s, 2) if self.graphs is not None else None,
            "error": self.compile_error,
        }

    def _has_work(self) -> bool:
        return bool(self._running or self._prefilling or self._waiting)

    def _admit(self) -> None:
        """Start the next prefill if none is in progress and a cache row is free (called under the lock)."""
        while self._waiting and self._prefilling is None and len(self._running) < self.max_batch_size:
            handle = self._waiting.popleft()
            if handle.cancelled:
                handle._emit(Event("finish", finish_reason="cancelled"))
                continue
            self._prefilling = self._new_sequence(handle)

    def _new_sequence(self, handle: RequestHandle) -> _Sequence:
        req = handle.request
        p = req.params
        return _Sequence(
            handle=handle,
            sampler=Sampler(p, self.vocab_size, self.device, req.prompt_ids),
            stream=TextStream(self.tokenizer, p.stop),
            stops=stop_token_ids(self.model, p),
            max_new=min(p.max_new_tokens, self.max_model_len - handle.prompt_tokens),
        )

    def _fail_in_flight(self, err: BaseException) -> None:
        """An unexpected error outside the model calls: end every in-flight request with it, free every row."""
        for seq in self._running + ([self._prefilling] if self._prefilling else []):
            self._fail(seq, err)
        self._running = []
        self._prefilling = None
        self.cache.reset()
        self._after_error(err)

    def _fail(self, seq: _Sequence, err: BaseException) -> None:
        seq.handle.finish_reason = "error"
        seq.handle.timings.finished = time.perf_counter()
        seq.handle._emit(Event("error", error=err))

    def _prefill_step(self) -> None:
        """One unit of the current prompt's prefill: a group of ViT layers, or one chunk of the spliced prompt."""
        seq = self._prefilling
        h = seq.handle
        if h.cancelled:
            self._prefilling = None
            h._emit(Event("finish", finish_reason="cancelled"))
            return
        if seq.row < 0:
            seq.row = len(self._running)
            h.timings.started = time.perf_counter()
            self.cache.reset(seq.row)
        try:
            if seq.embeds is None:
                if self._encode_image_step(seq):
                    return  # more ViT layers to go; decode steps for the others run in between
                self._build_embeds(seq)
            logits = self._prefill_chunk(seq)
        except Exception as e:
            self._prefilling = None
            self.cache.reset(seq.row)
            self._after_error(e)
            self._fail(seq, e)
            return
        if logits is None:
            return  # more chunks to go
        seq.embeds = seq.positions = None
        self._prefilling = None
        if seq.row != len(self._running):  # rows finished meanwhile: close the gap so running rows stay contiguous
            self.cache.move_row(seq.row, len(self._running))
            self.cache.reset(seq.row)
        self._running.append(seq)
        self._accept_tokens([seq], *sample_rows(logits[:, -1], [seq.sampler]), first=True)

    def _encode_image_step(self, seq: _Sequence) -> bool:
        """Advance the image through the vision tower by one group of layers; True while layers remain."""
        px = seq.handle.request.pixel_values
        if px is None:
            return False
        vision = self.model.vision
        if seq.vision_x is None:
            self._hook("vision_start")
            seq.vision_x = vision.embed_patches(self.model.pixels_to_vision(px[None]))
        end = min(seq.vision_layers_done + self.vision_layers_per_step, vision.num_layers)
        seq.vision_x = vision.run_layers(seq.vision_x, seq.vision_layers_done, end)
        seq.vision_layers_done = end
        return end < vision.num_layers

    def _build_embeds(self, seq: _Sequence) -> None:
        """Token embeddings with the finished image spliced in, and their compressed positions (spec §4.5)."""
        req = seq.handle.request
        image_embeds = None
        if seq.vision_x is not None:
            image_embeds = self.model.image_features_to_lm(self.model.vision.project(seq.vision_x))
            seq.vision_x = None
            self._hook("vision_end")
        ids = torch.tensor([req.prompt_ids], device=self.device)
        pos = torch.arange(len(req.prompt_ids), device=self.device)[None]
        seq.embeds, seq.positions = self.model.embed(ids, pos, image_embeds=image_embeds)
        seq.next_position = len(req.prompt_ids)

    def _prefill_chunk(self, seq: _Sequence) -> torch.Tensor | None:
        """Run the next ``prefill_chunk`` entries into the cache; the last chunk returns its logits."""
        start = seq.done_entries
        end = min(start + self.prefill_chunk, seq.embeds.shape[1])
        step = CacheStep.build(self.cache, seq.row, 1, end - start, self.device)
        logits = self.model.forward_embeds(
            seq.embeds[:, start:end], seq.positions[:, start:end], step, logits_to_keep=1
        )
        step.commit(end - start, [seq.next_position])
        seq.done_entries = end
        return logits if end == seq.embeds.shape[1] else None

    def _decode_step(self) -> None:
        seqs = self._running
        tokens = [s.last_token for s in seqs]
        try:  # the shared forward: when it fails, it fails for every row
            if self.graphs is not None:
                logits = self.graphs.decode(tokens)
            else:
                ids = torch.tensor(tokens, device=self.device)[:, None]
                logits = self.model(ids, cache=self.cache, cache_row=0, logits_to_keep=1).logits[:, -1]
        except Exception as e:
            self._after_error(e)
            for s in seqs:
                self._fail(s, e)
            self._running = []
            return
        self._accept_tokens(list(seqs), *sample_rows(logits, [s.sampler for s in seqs]), first=False)

    def _accept_tokens(self, seqs: list[_Sequence], tokens: list[int], errors: list[Exception | None],
                       first: bool) -> None:
        """Stream each row's token; a row that finished or failed leaves (failing ends that request alone)."""
        now = time.perf_counter()
        self._hook("first_token" if first else "token")
        leaving = []
        for seq, tok, err in zip(seqs, tokens, errors):
            try:
                if err is not None:
                    raise err
                if self._accept_token(seq, tok, first, now):
                    leaving.append(seq)
            except Exception as e:  # its sampler, stop handling or detokenizer: this request's problem alone
                log.warning("request %s failed: %s: %s", seq.handle.request_id, type(e).__name__, e)
                self._after_error(e)
                self._fail(seq, e)
                leaving.append(seq)
        for seq in leaving:
            self._remove(seq)

    def _accept_token(self, seq: _Sequence, tok: int, first: bool, now: float) -> bool:
        """Record and stream one sampled token; True when the sequence has finished."""
        h = seq.handle
        if first:
            h.timings.first_token = now
        h.timings.token_times.append(now)
        seq.generated += 1
        h.completion_tokens = seq.generated
        seq.last_token = tok
        reason = None
        if h.cancelled:
            reason = "cancelled"
            text = ""
        elif tok in seq.stops:
            reason, text = "stop", seq.stream.finish()
        else:
            text, hit = seq.stream.push(tok)
            if hit:
                reason = "stop"
            elif seq.generated >= seq.max_new:
                reason, text = "length", text + seq.stream.finish()
        if text or reason is None:
            h._emit(Event("delta", text=text, token_ids=[tok]))
        if reason is not None:
            h.finish_reason = reason
            h.timings.finished = now
            h._emit(Event("finish", finish_reason=reason))
        return reason is not None

    def _remove(self, seq: _Sequence) -> None:
        """Free the sequence's row; the last running row moves into it so rows stay contiguous."""
        i = self._running.index(seq)
        last = len(self._running) - 1
        if i != last:
            self.cache.move_row(last, i)
            self._running[i] = self._running[last]
        self._running.pop()
        self.cache.reset(last)

    def _after_error(self, e: BaseException) -> None:
        if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _hook(self, name: str) -> None:
        if self.hooks is not None:
            self.hooks.on_event(name)
