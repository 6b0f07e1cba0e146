"""Token ids → text pieces for streaming, with OpenAI-style stop strings.

Text that might be the start of a stop string is held back until it is clear either way, so a stop string is never
half-sent and never appears in the output (OpenAI excludes it, as do vLLM and llama.cpp).
"""

from __future__ import annotations

from .tokenizer import GLM4Tokenizer, IncrementalDetokenizer


class TextStream:
    def __init__(self, tokenizer: GLM4Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self._pending = ""
        self.stopped_on: str | None = None

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text that is safe to emit now, whether a stop string was hit)."""
        return self._feed(self.detok.push(token_id))

    def _feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped_on is not None:
            return "", True
        text = self._pending + piece
        if not self.stop:
            self._pending = ""
            return text, False
        hits = [(text.find(s), s) for s in self.stop if s in text]
        if hits:
            idx, s = min(hits)
            self.stopped_on = s
            self._pending = ""
            return text[:idx], True
        hold = self._held_suffix(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def finish(self) -> str:
        """End of generation: release held-back text (and any incomplete UTF-8 as U+FFFD)."""
        text, _ = self._feed(self.detok.flush())
        rest, self._pending = self._pending, ""
        return text + rest
