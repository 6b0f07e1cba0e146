"""Who runs next: the waiting queue, the admission policy, and the running rows.

The policy (:meth:`Scheduler.admit`): first come, first served; one prompt is prefilled at a time, and only while a
KV-cache row is free — so a long prompt never holds more than one row before it can decode, and every running
sequence keeps its row until it finishes. Running sequences occupy rows ``0 .. len(running) - 1`` of the cache:
:meth:`Scheduler.remove` says which row must move into the hole a finished one leaves (the engine moves it).

Not thread-safe by itself: the engine calls it under its lock (submission) or from its own thread (the rest).
"""

from __future__ import annotations

from collections import deque

from .requests import Event, QueueFullError, RequestHandle
from .sequence import Sequence


class Scheduler:
    def __init__(self, max_batch_size: int, max_queue: int):
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.waiting: deque[RequestHandle] = deque()
        self.running: list[Sequence] = []  # row i of the cache holds running[i]
        self.prefilling: Sequence | None = None

    def add(self, handle: RequestHandle) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting (limit {self.max_queue})")
        self.waiting.append(handle)

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    def admit(self, start_sequence) -> None:
        """Start the next prefill if none is in progress and a cache row is free; ``start_sequence(handle)`` builds
        its :class:`Sequence`. Requests cancelled while waiting end here."""
        while self.waiting and self.prefilling is None and len(self.running) < self.max_batch_size:
            handle = self.waiting.popleft()
            if handle.cancelled:
                handle._emit(Event("finish", finish_reason="cancelled"))
                continue
            self.prefilling = start_sequence(handle)

    def next_free_row(self) -> int:
        return len(self.running)

    def promote(self, seq: Sequence) -> int | None:
        """The prefilled ``seq`` starts decoding in the next free row; returns the row it was prefilled in when that
        row must move there (rows finished meanwhile), else None."""
        self.prefilling = None
        moved_from = seq.row if seq.row != len(self.running) else None
        self.running.append(seq)
        return moved_from

    def remove(self, seq: Sequence) -> tuple[int, int]:
        """Take ``seq`` out of the running rows → (last row, row it moves into): the last running row fills the hole
        so rows stay contiguous (equal when ``seq`` was the last)."""
        i = self.running.index(seq)
        last = len(self.running) - 1
        if i != last:
            self.running[i] = self.running[last]
        self.running.pop()
        return last, i

    def in_flight(self) -> list[Sequence]:
        return self.running + ([self.prefilling] if self.prefilling else [])

    def clear(self) -> None:
        self.running = []
        self.prefilling = None
