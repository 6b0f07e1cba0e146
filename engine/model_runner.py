"""The model side of the engine: the KV cache, prefill in bounded units, the batched decode step, CUDA graphs.

A prefill is cut into units so that a new prompt never stalls the running streams for long: first the image, a
group of ``vision_layers_per_step`` ViT layers at a time, then the spliced prompt, ``prefill_chunk`` entries at a
time. Each call of :meth:`ModelRunner.prefill_unit` does one unit and returns the last position's logits when the
prompt is done. :meth:`ModelRunner.decode` runs one token for every running row (rows ``0 .. B-1``) — the ordinary
forward, or with ``decode_graphs`` the fixed-shape step compiled per batch bucket (:mod:`engine.cuda_graphs`).
"""

from __future__ import annotations

import logging

import torch

from glm4v.generate import GenerationHooks
from glm4v.kv_cache import CacheStep, KVCache

from .cuda_graphs import DecodeGraphs
from .sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model,
        max_batch_size: int,
        max_model_len: int,
        prefill_chunk: int,
        vision_layers_per_step: int,
        decode_graphs: str | None,
        hooks: GenerationHooks | None = None,
        image_cache=None,
    ):
        self.model = model
        self.image_cache = image_cache  # engine.prefix_cache.ImageFeatureCache, filled when an image is encoded
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.vision_layers_per_step = vision_layers_per_step
        self.decode_graphs = decode_graphs
        self.hooks = hooks
        self.device = model.embed_device
        self.cache: KVCache | None = None
        self.graphs: DecodeGraphs | None = None
        self.compile_error: str | None = None
        c = model.config
        self.kv_cache_bytes = (
            max_batch_size
            * max_model_len
            * KVCache.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, model.embed_dtype)
        )

    # ---- start ----------------------------------------------------------------------------------------------
    def allocate(self) -> None:
        """Allocate the KV cache (raises MemoryError with the flags to change), then build the decode graphs."""
        try:
            spare = DecodeGraphs.spare_slots(None if self.decode_graphs in (None, "static") else self.decode_graphs)
            self.cache = self.model.new_cache(max_len=self.max_model_len + spare, max_batch=self.max_batch_size)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # CPU allocators raise RuntimeError, CUDA OutOfMemory
            raise MemoryError(
                f"the KV cache for {self.max_batch_size} sequences × {self.max_model_len} tokens "
                f"({self.kv_cache_bytes / 2**30:.2f} GiB) could not be allocated ({type(e).__name__}): "
                "lower --max-batch-size or --max-model-len"
            ) from None
        if self.decode_graphs is not None:
            self._build_graphs()

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
            self.after_error(e)
            return
        self.graphs = graphs
        log.info("decode step compiled (%s) in %.1f s", self.decode_graphs, graphs.warmup_s)

    def compile_status(self) -> dict | None:
        """What /v1/models reports about --compile: None when it was not asked for."""
        if self.decode_graphs is None:
            return None
        g = self.graphs
        return {
            "mode": self.decode_graphs,
            "active": g is not None,
            "batch_buckets": g.buckets if g is not None else [],
            "warmup_s": round(g.warmup_s, 2) if g is not None else None,
            "error": self.compile_error,
        }

    # ---- rows -----------------------------------------------------------------------------------------------
    def reset_row(self, row: int | None = None) -> None:
        self.cache.reset(row)

    def move_row(self, src: int, dst: int) -> None:
        """Move row ``src`` into ``dst`` and free ``src``."""
        if src != dst:
            self.cache.move_row(src, dst)
        self.cache.reset(src)

    def swap_rows(self, a: int, b: int) -> None:
        self.cache.swap_rows(a, b)

    def reuse_row(self, row: int, entries: int, next_position: int) -> None:
        """Start a prefill on a kept row: keep its first ``entries`` entries (a reused prefix)."""
        self.cache.truncate(row, entries, next_position)

    # ---- prefill --------------------------------------------------------------------------------------------
    def prefill_unit(self, seq: Sequence) -> torch.Tensor | None:
        """One unit of ``seq``'s prefill into its row: a group of ViT layers, or one chunk of the spliced prompt.
        Returns (1, vocab) logits of the last prompt position when the prompt is complete, else None."""
        if seq.embeds is None:
            if self._encode_image_step(seq):
                return None  # more ViT layers to go; decode steps for the others run in between
            self._build_embeds(seq)
        logits = self._prefill_chunk(seq)
        if logits is None:
            return None  # more chunks to go
        seq.embeds = seq.positions = None
        return logits[:, -1]

    def image_in_suffix(self, seq: Sequence) -> bool:
        """Whether the part of the prompt still to prefill holds the image (not when a kept prefix already does)."""
        req = seq.request
        if not req.has_image:
            return False
        boi = self.model.config.boi_token_id
        return boi not in req.prompt_ids or seq.reused_tokens <= req.prompt_ids.index(boi)  # no boi: embed says so

    def _encode_image_step(self, seq: Sequence) -> bool:
        """Advance the image through the vision tower by one group of layers; True while layers remain. Nothing to
        do when the image's features came from the cache or a reused prefix already holds the image."""
        px = seq.request.pixel_values
        if px is None or seq.image_features is not None or not self.image_in_suffix(seq):
            return False
        vision = self.model.vision
        if seq.vision_x is None:
            self._hook("vision_start")
            seq.vision_x = vision.embed_patches(self.model.pixels_to_vision(px[None]))
        end = min(seq.vision_layers_done + self.vision_layers_per_step, vision.num_layers)
        seq.vision_x = vision.run_layers(seq.vision_x, seq.vision_layers_done, end)
        seq.vision_layers_done = end
        return end < vision.num_layers

    def _build_embeds(self, seq: Sequence) -> None:
        """Embeddings of the prompt tokens still to prefill (after a reused prefix), with the image spliced in when
        it is among them, and their compressed positions (docs/MODEL.md): token ``k`` is at position ``k``."""
        req = seq.request
        image_embeds = None
        if seq.vision_x is not None:
            image_embeds = self.model.image_features_to_lm(self.model.vision.project(seq.vision_x))
            seq.vision_x = None
            self._hook("vision_end")
            if self.image_cache is not None:
                self.image_cache.put(req.image_key, image_embeds[0])
        elif seq.image_features is not None and self.image_in_suffix(seq):
            image_embeds = seq.image_features[None].to(self.device, non_blocking=True)
        seq.image_features = None
        start = seq.reused_tokens
        ids = torch.tensor([req.prompt_ids[start:]], device=self.device)
        pos = torch.arange(start, len(req.prompt_ids), device=self.device)[None]
        seq.embeds, seq.positions = self.model.embed(ids, pos, image_embeds=image_embeds)
        seq.next_position = len(req.prompt_ids)

    def _prefill_chunk(self, seq: Sequence) -> torch.Tensor | None:
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

    # ---- decode ---------------------------------------------------------------------------------------------
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to cache row ``i`` → logits (len(tokens), vocab)."""
        if self.graphs is not None:
            return self.graphs.decode(tokens)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        return self.model(ids, cache=self.cache, cache_row=0, logits_to_keep=1).logits[:, -1]

    # ---- errors and hooks -----------------------------------------------------------------------------------
    def after_error(self, e: BaseException) -> None:
        if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _hook(self, name: str) -> None:
        if self.hooks is not None:
            self.hooks.on_event(name)
