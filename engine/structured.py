"""Structured outputs: token-level constrained decoding with llguidance (JSON mode and JSON Schema).

Why llguidance: measured against xgrammar with GLM-4's real vocabulary (docs/PERFORMANCE.md, "Structured
outputs"; ``glm4v-edge bench-grammar``) — and it is a single self-contained wheel, where xgrammar pulls triton and a
TVM runtime into an edge install.

Three pieces, split by thread:

* :class:`GrammarCompiler` (one per engine; any thread) turns a response format into a :class:`Grammar`: the JSON
  Schema is translated and checked by llguidance under :data:`LIMITS` (grammar size, lexer fuel — a schema that
  would take too long or too much memory is refused with llguidance's reason), and the result is cached by the
  schema's canonical text. It runs in the request's preparation, never on the engine thread.
* :meth:`Grammar.matcher` (the request's preparation) makes the request's own :class:`Matcher` and computes its
  first mask there, so the engine thread never pays for the first, most expensive mask.
* The engine thread, per decode step, asks each constrained row's matcher for its bitmask, applies all of them to
  those rows' logits in one op (:func:`apply_bitmask`), samples, and advances the matchers. Rows without a grammar
  are not touched. The stop tokens are allowed exactly where the grammar accepts an end; after one of them the
  matcher is stopped.

JSON is written compactly unless the schema says otherwise (``"x-guidance"``): ``", "`` between items, ``": "``
after keys and no other whitespace — free whitespace lets a weak or quantized model spend its whole budget on
newlines, and the output is the same JSON. An object schema that lists ``properties`` and says nothing of
``additionalProperties`` gets no extra keys (as OpenAI's strict mode, xgrammar's strict mode and so vLLM do): the
answer still validates against the schema as written, and does not wander into keys nobody asked for. A schema that
wants extra keys says ``"additionalProperties": true``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

# Per-grammar bounds (llguidance's LLParserLimits). Fuel is llguidance's unit of lexer work: ~50k/ms to build, so the
# initial fuel bounds a grammar's build to ~40 ms of lexer work; a step's fuel bounds a single mask.
LIMITS = {
    "max_grammar_size": 200_000,  # symbols in the grammar's productions (a huge schema)
    "initial_lexer_fuel": 2_000_000,
    "step_lexer_fuel": 200_000,
    "max_lexer_states": 100_000,  # ~1-2 kB each: bounds one matcher's memory at ~200 MB in the worst case
}
MAX_SCHEMA_BYTES = 64 * 1024  # a schema's canonical JSON text
MAX_SCHEMA_DEPTH = 64  # nesting of its JSON (objects and arrays)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The response format cannot be turned into a grammar: invalid, unsupported, or beyond :data:`LIMITS`."""


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile value may be nested hundreds deep)."""
    depth, level = 0, [value]
    while level:
        depth += 1
        nxt = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        if not nxt:
            return depth
        level = nxt
    return depth


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` where each object with ``properties`` and no ``additionalProperties`` gets
    ``"additionalProperties": false``. Not inside ``allOf`` (closing its branches could make them contradict)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(v) for v in out[key]]
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    return out


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """(rows, ⌈V/32⌉) int32, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed."""
    return torch.zeros(rows, bitmask_words(vocab_size), dtype=torch.int32)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def blocked_tokens(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """(B, W) int32 bitmask on the host → (B, V) bool on ``device``, True where a token is *not* allowed.

    On a CPU numpy's ``unpackbits`` does it in one pass (~13 µs a row); on a GPU the 19 KB words are uploaded and
    unpacked there (shifts), rather than uploading 151 KB of unpacked bits a row."""
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab_size]
        return torch.from_numpy(bits ^ 1).view(torch.bool)
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # (B, W, 32), little-endian within a word
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size] == 0


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Give the disallowed tokens the lowest finite logit of the dtype, in place. ``logits`` (B, V'), ``bitmask``
    (len(rows), W); ``rows`` are the logits rows the masks belong to (default: all, in order). Columns past the
    mask's vocabulary (the LM head's padding) are left alone: the sampler never picks them.

    A finite floor rather than -inf: the sampler tells a model's numerical overflow (non-finite logits, an error for
    that row) from a choice; after the softmax the floor is exactly 0, so a masked token is never sampled."""
    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    blocked = blocked_tokens(bitmask, vocab, logits.device)
    floor = torch.finfo(logits.dtype).min
    if rows is None or list(rows) == list(range(logits.shape[0])):
        logits[:, :vocab].masked_fill_(blocked, floor)
        return
    for j, i in enumerate(rows):  # in place, row by row: no gather/scatter copies of the other rows
        logits[i, :vocab].masked_fill_(blocked[j], floor)


class Matcher:
    """One request's grammar state. Made by :meth:`Grammar.matcher` (with its first mask precomputed); used by the
    engine thread only after that."""

    def __init__(self, ll, vocab_size: int):
        self._ll = ll
        self.vocab_size = vocab_size
        self._first: torch.Tensor | None = new_bitmask(1, vocab_size)
        self._fill(self._first, 0)

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        self._ll.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())
        if self._ll.is_error():
            raise GrammarError(self._ll.get_error())

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]``; raises :class:`GrammarError` if the matcher failed."""
        if self._first is not None:
            bitmask[row].copy_(self._first[0])
            self._first = None
            return
        self._fill(bitmask, row)

    def accept(self, token: int) -> None:
        """Advance by the sampled token (which the mask allowed); raises :class:`GrammarError` otherwise."""
        if not self._ll.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._ll.get_error()}")

    @property
    def stopped(self) -> bool:
        """A stop token was accepted: the answer is complete."""
        return self._ll.is_stopped()


class Grammar:
    """A compiled response format; shared (read-only) by every request with the same schema."""

    def __init__(self, ll_tokenizer, grammar: str, vocab_size: int, limits):
        import llguidance

        self.grammar = grammar
        self.vocab_size = vocab_size
        self._template = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0, limits=limits)
        self._lock = threading.Lock()  # requests with the same schema copy the template from several threads
        if self._template.is_error():
            raise GrammarError(_short(self._template.get_error()))

    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar, its first mask computed (call from the request's thread)."""
        with self._lock:
            ll = self._template.deep_copy()
        try:
            return Matcher(ll, self.vocab_size)
        except GrammarError as e:
            raise GrammarError(_short(str(e))) from None


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


class GrammarCompiler:
    """Response formats → :class:`Grammar`, cached (LRU by the schema's canonical JSON). Thread-safe.

    ``stop_ids``: the model's end-of-turn tokens, allowed exactly where the grammar accepts an end. The tokenizer
    view llguidance needs (~1 s for GLM-4's 151k tokens) is built on first use, not at start-up.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], cache_size: int = 64):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self.hits = self.misses = 0

    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance.tiktoken import lltokenizer_from_encoding

                self._ll_tokenizer = lltokenizer_from_encoding(
                    self.tokenizer.encoding, n_vocab=self.vocab_size, eos_token=self.stop_ids
                )
            return self._ll_tokenizer

    def compile(self, fmt: dict[str, Any]) -> Grammar:
        """``{"type": "json_object"}`` or ``{"type": "json_schema", "schema": {...}}`` → a :class:`Grammar`;
        raises :class:`GrammarError` saying what is wrong."""
        kind = fmt.get("type")
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            schema = fmt.get("schema")
            if not isinstance(schema, dict):
                raise GrammarError("json_schema.schema must be a JSON Schema object")
        else:
            raise GrammarError(f"unknown response format type {kind!r}")
        if json_depth(schema) > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the JSON Schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise GrammarError(f"the JSON Schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
        key = hashlib.sha256(text.encode()).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        grammar = self._build(close_objects(schema))
        with self._lock:
            if self.cache_size > 0:
                self._cache[key] = grammar
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return grammar

    def _build(self, schema: dict) -> Grammar:
        import llguidance

        limits = llguidance.LLParserLimits(**LIMITS, verbose_errors=False)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(_short(str(e))) from None
        tokenizer = self.ll_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=limits)
        if error and not error.startswith("WARNING"):
            raise GrammarError(_short(error))
        return Grammar(tokenizer, grammar, self.vocab_size, limits)
