"""What makes the second question about an image nearly free: the image-feature cache and prefix reuse.

**Image features** (:class:`ImageFeatureCache`). What the vision tower and projector make of an image — the
embeddings spliced into the prompt — kept in host memory, LRU within a byte budget (``--image-cache-mb``), keyed by
:func:`image_key`: a hash of the image's source bytes + the vision size + the vision precision. The server looks the
key up before decoding the image (a hit skips the decode, the resize and the whole vision tower); the engine fills
it after encoding one. On an 8 GB card GPU memory is for weights: an entry is copied to the GPU when used (a few MB).

**Prefix reuse** (:class:`PrefixCache`). Chat UIs resend the whole conversation every turn. When a sequence
finishes, its KV-cache row is *kept* — with a record of exactly what it holds: the token ids (prompt + every
generated token but the last, which was never fed) and the identity of its image — for as long as no one needs the
row. A new request whose expanded sequence starts with a kept row's takes that row, truncated to the common prefix,
and prefills only the rest. Matching is on token ids, so an assistant message whose re-tokenization differs from
what was generated simply shortens the reused prefix; an image matches only the same image key (same bytes, same
vision size), and a prefix never ends inside an image's ``boi, placeholder, eoi`` triple. Positions stay exact: the
position of token ``k`` is ``k`` whether or not an image (1602 cache entries, 3 positions) comes before it.

Kept rows never delay admission: they live in the rows no running sequence uses, and a new request that matches
none takes an empty row, else the least recently used kept row. Neither structure touches tensors of the cache:
the engine moves rows; this module only decides and remembers (the engine thread alone calls :class:`PrefixCache`;
:class:`ImageFeatureCache` is thread-safe, the server's preparation threads read it).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from glm4v.chat_template import IMAGE_PLACEHOLDERS


def image_key(data: bytes, vision_size: int, vision_precision: str) -> str:
    """The identity of an image as the model sees it: its source bytes, at this vision size and precision."""
    return f"{hashlib.sha256(data).hexdigest()}:{vision_size}:{vision_precision}"


class ImageFeatureCache:
    """LRU of image embeddings (host memory) within ``max_bytes``; 0 disables it. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str | None) -> torch.Tensor | None:
        """The cached features, or None. Counts a hit; a miss is counted when the image is encoded (:meth:`put`),
        so an image looked up twice on its way in (server, then engine) is one miss."""
        if key is None or self.max_bytes <= 0:
            return None
        with self._lock:
            t = self._entries.get(key)
            if t is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return t

    def put(self, key: str | None, features: torch.Tensor) -> None:
        """Keep a host copy of the features (P + 2, H) of an image just encoded; older entries leave to make room. An
        entry larger than the whole budget is not kept."""
        if key is None or self.max_bytes <= 0:
            return
        with self._lock:
            self.misses += 1
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        host = features.detach().to("cpu", copy=True)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            while self._entries and self.bytes + size > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self.bytes -= gone.numel() * gone.element_size()
                self.evictions += 1
            self._entries[key] = host
            self.bytes += size


@dataclass
class RowRecord:
    """What one kept cache row holds: the KV of ``tokens`` (ids, before image expansion)."""

    tokens: list[int]
    image_key: str | None = None
    boi: int | None = None  # index of <|begin_of_image|> in tokens
    image_entries: int = 0  # cache entries of the image (boi + patches + eoi)
    last_used: float = field(default_factory=time.monotonic)

    def entries(self, n_tokens: int) -> int:
        """Cache entries taken by the first ``n_tokens`` tokens."""
        if self.boi is not None and n_tokens > self.boi:
            return n_tokens + self.image_entries - IMAGE_PLACEHOLDERS
        return n_tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable(kept: RowRecord, want: RowRecord) -> int:
    """How many leading tokens of ``want`` the kept row can serve: the common prefix, never into an image triple,
    past an image only when it is the same image, and at least one token short of ``want`` (its logits are needed)."""
    n = min(common_prefix(kept.tokens, want.tokens), len(want.tokens) - 1)
    same = want.image_key is not None and want.image_key == kept.image_key and kept.boi == want.boi
    # Either side's image stops the match unless both hold the same image there: a text-only prompt whose ids
    # happen to spell the image placeholders must not attend to another request's patch entries.
    for b in sorted({want.boi, kept.boi} - {None}):
        if n > b and not (same and n >= b + IMAGE_PLACEHOLDERS):
            n = b
    return max(n, 0)


class PrefixCache:
    """The kept rows and what they hold (engine thread only). ``enabled=False``: nothing is kept, rows are taken in
    order, as before."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.kept: dict[int, RowRecord] = {}
        self.hits = self.misses = 0
        self.reused_tokens = 0

    def claim(self, free_rows: list[int], want: RowRecord) -> tuple[int, int]:
        """A row for a new prefill → (row, tokens of ``want`` already in it).

        A kept row whose reusable prefix is at least half of what it holds (a continuation of its conversation —
        the longest such prefix, the most recently used on a tie); else an empty row (a kept row is not cut down to
        the chat template's first few tokens while a free one exists); else the least recently used kept row,
        reset."""
        best, best_n = None, 0
        if self.enabled:
            for row in free_rows:
                rec = self.kept.get(row)
                if rec is None:
                    continue
                n = reusable(rec, want)
                if n < max(1, len(rec.tokens) // 2):
                    continue
                if n > best_n or (n == best_n and rec.last_used > self.kept[best].last_used):
                    best, best_n = row, n
        if best is None:
            empty = [r for r in free_rows if r not in self.kept]
            if empty:
                if self.enabled:
                    self.misses += 1
                return empty[0], 0
            # No empty row: the least recently used kept row is given back whole (a short match is not worth
            # reusing, and reusing it would tell the client how much of someone else's prompt it guessed).
            best = min(free_rows, key=lambda r: self.kept[r].last_used)
            best_n = 0
        if best_n:
            self.hits += 1
            self.reused_tokens += best_n
        else:
            self.misses += 1
        del self.kept[best]
        return best, best_n

    def keep(self, row: int, record: RowRecord) -> None:
        if self.enabled:
            record.last_used = time.monotonic()
            self.kept[row] = record

    def swapped(self, a: int, b: int) -> None:
        """Rows ``a`` and ``b`` exchanged their contents."""
        ra, rb = self.kept.pop(a, None), self.kept.pop(b, None)
        if ra is not None:
            self.kept[b] = ra
        if rb is not None:
            self.kept[a] = rb

    def drop(self, row: int | None = None) -> None:
        """Forget a row (its contents were overwritten), or every row."""
        if row is None:
            self.kept.clear()
        else:
            self.kept.pop(row, None)
