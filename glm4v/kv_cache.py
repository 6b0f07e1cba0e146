"""Preallocated key/value cache with explicit per-row fill levels and positions.

GLM-4V's cache is small (2 KV groups × 128 dims × 40 layers: 40 KiB per token in bf16), so one buffer of
``[layers, rows, kv_heads, max_len, head_dim]`` for keys and one for values is allocated once and never grown.

Two counters are kept per row, because an image makes them differ (docs/MODEL.md §4.5):

* ``lengths[row]`` — how many cache entries (storage slots) are filled. An image adds (N/28)² + 2 entries.
* ``next_positions[row]`` — the RoPE position the next token gets. All image patches share one position, so an
  image advances it by only 3 (boi, patches, eoi), exactly like the reference's compressed position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        max_batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, max_batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.max_batch = max_batch
        self.lengths = [0] * max_batch
        self.next_positions = [0] * max_batch

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def reset(self, row: int | None = None) -> None:
        rows = range(self.max_batch) if row is None else [row]
        for r in rows:
            self.lengths[r] = 0
            self.next_positions[r] = 0

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange rows ``a`` and ``b`` (their filled parts and counters)."""
        if a == b:
            return
        n = max(self.lengths[a], self.lengths[b])
        for t in (self.k, self.v):
            for layer in t:  # one layer at a time: the temporary is one layer's row (MBs), not all 40 (~160 MiB)
                held = layer[a, :, :n].clone()
                layer[a, :, :n] = layer[b, :, :n]
                layer[b, :, :n] = held
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]
        self.next_positions[a], self.next_positions[b] = self.next_positions[b], self.next_positions[a]

    def truncate(self, row: int, length: int, next_position: int) -> None:
        """Keep only the first ``length`` entries of ``row``; the next token gets ``next_position``."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} entries; cannot keep {length}")
        self.lengths[row] = length
        self.next_positions[row] = next_position

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` (its filled part) into ``dst``; used to keep the running rows contiguous."""
        if src == dst:
            return
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self.next_positions[dst] = self.next_positions[src]


@dataclass
class CacheStep:
    """Where one forward pass reads and writes: contiguous cache rows ``[row0, row0 + B)``.

    ``offsets`` are the storage indices where each row's first new token goes (its current length). Built once per
    forward and shared by all layers, so the per-layer work is only the copy and the attention call.
    """

    cache: KVCache
    row0: int
    batch: int
    seq_len: int
    offsets: list[int]
    mask: torch.Tensor | None  # (B, 1, S, kv_len) bool, True = may attend; None when no mask is needed
    index: tuple[torch.Tensor, torch.Tensor] | None  # (rows, slots) for per-row decode writes

    @classmethod
    def build(cls, cache: KVCache, row0: int, batch: int, seq_len: int, device: torch.device) -> "CacheStep":
        offsets = cache.lengths[row0 : row0 + batch]
        if len(offsets) != batch:
            raise ValueError(f"cache has {cache.max_batch} rows; rows {row0}..{row0 + batch - 1} requested")
        kv_len = max(offsets) + seq_len
        if kv_len > cache.max_len:
            raise ValueError(f"sequence needs {kv_len} cache entries but the cache holds {cache.max_len}")
        uniform = all(o == offsets[0] for o in offsets)
        if not uniform and seq_len != 1:
            raise ValueError("rows at different lengths can only be extended one token at a time")
        mask = index = None
        o = offsets[0]
        if uniform and seq_len > 1 and o > 0:
            # Continuing a sequence with several tokens: new token i sees cached entries and new tokens <= i.
            q = torch.arange(seq_len, device=device)[:, None] + o
            mask = (torch.arange(kv_len, device=device)[None, :] <= q)[None, None]  # (1, 1, S, kv_len)
        elif not uniform:
            off = torch.tensor(offsets, device=device)
            mask = (torch.arange(kv_len, device=device)[None, :] <= off[:, None])[:, None, None, :]  # (B,1,1,kv_len)
            index = (torch.arange(row0, row0 + batch, device=device), off)
        return cls(cache, row0, batch, seq_len, offsets, mask, index)

    @property
    def uniform_offset(self) -> int | None:
        return self.offsets[0] if self.index is None else None

    def update_and_fetch(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store k/v (B, G, S, D) for ``layer``; return (keys, values, mask, is_causal) to attend over."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        rows = slice(self.row0, self.row0 + self.batch)
        o = self.uniform_offset
        if o is not None:
            ck[rows, :, o : o + self.seq_len] = k
            cv[rows, :, o : o + self.seq_len] = v
            if o == 0:  # fresh prefill: nothing cached before, attend over the new tokens only
                return k, v, None, self.seq_len > 1
            end = o + self.seq_len
            return ck[rows, :, :end], cv[rows, :, :end], self.mask, False
        r, s = self.index
        ck[r, :, s] = k[:, :, 0]
        cv[r, :, s] = v[:, :, 0]
        end = max(self.offsets) + 1
        return ck[rows, :, :end], cv[rows, :, :end], self.mask, False

    def commit(self, added_entries: int, next_positions: list[int]) -> None:
        for i in range(self.batch):
            self.cache.lengths[self.row0 + i] += added_entries
            self.cache.next_positions[self.row0 + i] = next_positions[i]
