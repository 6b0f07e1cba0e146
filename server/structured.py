"""Structured outputs and logprobs on the wire: OpenAI's ``response_format`` → the engine's grammar, and the
engine's per-token log-probabilities → OpenAI's ``logprobs.content`` entries.

``response_format`` (chat completions; the Responses API's ``text.format`` is translated into it):

* ``{"type": "text"}`` (or absent): unconstrained;
* ``{"type": "json_object"}``: the answer is one JSON object;
* ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``: the answer is valid
  against ``schema``. Decoding is constrained whatever ``strict`` says (the answer always matches); a schema the
  grammar engine cannot honour is a 400 naming the problem, never silently loosened.

The grammar is compiled in the request's preparation (a worker thread, cached by schema), and the request's own
matcher is made there too, its first mask computed — the engine thread only advances it (:mod:`engine.structured`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from engine.structured import GrammarError, Matcher

from .errors import BadRequest

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name


def grammar_spec(response_format: dict[str, Any] | None, param: str = "response_format") -> dict | None:
    """The request's ``response_format`` → the engine's format (``{"type", "schema"}``), None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise BadRequest("response_format must be an object", param=param)
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise BadRequest(
            f"response_format type {kind!r} is not supported (use 'text', 'json_object' or 'json_schema')",
            param=f"{param}.type",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest("response_format json_schema needs a 'json_schema' object", param=f"{param}.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise BadRequest(
            "json_schema.name is required: 1-64 characters of a-z, A-Z, 0-9, '_' or '-'",
            param=f"{param}.json_schema.name",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise BadRequest("json_schema.schema must be a JSON Schema object", param=f"{param}.json_schema.schema")
    if spec.get("strict") not in (None, True, False):
        raise BadRequest("json_schema.strict must be a boolean", param=f"{param}.json_schema.strict")
    return {"type": "json_schema", "schema": schema}


def _matcher(grammars, spec: dict) -> Matcher:
    return grammars.compile(spec).matcher()


async def prepare_matcher(rt, spec: dict | None, param: str) -> Matcher | None:
    """Compile (or fetch from the cache) the grammar and make this request's matcher, off the event loop; a schema
    the engine refuses is a 400 with its reason, ``param`` naming the schema."""
    if spec is None:
        return None
    try:
        return await asyncio.get_running_loop().run_in_executor(rt.pool, _matcher, rt.engine.grammars, spec)
    except GrammarError as e:
        raise BadRequest(f"the response format cannot be used: {e}", param=param) from None


# ---- logprobs -------------------------------------------------------------------------------------------------
def _entry(tokenizer, token_id: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token_id)
    # A token that is part of a UTF-8 character shows its bytes escaped ("\\xe4\\xbd"); ``bytes`` holds them exactly
    # (join the ``bytes`` of consecutive entries to rebuild the text).
    return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": logprob, "bytes": list(raw)}


def logprob_entries(tokenizer, entries) -> list[dict]:
    """Engine :class:`glm4v.sampling.TokenLogprob` entries → OpenAI's ``logprobs.content`` items."""
    return [
        {**_entry(tokenizer, e.token, e.logprob), "top_logprobs": [_entry(tokenizer, t, lp) for t, lp in e.top]}
        for e in entries
    ]
