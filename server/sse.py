"""Server-sent events, all of the framing in one place: chunk events, the error event and ``data: [DONE]``.

Exactly what the OpenAI API sends: every event is one ``data: <json>`` line and a blank line; a chunk's ``usage`` key
is present (null, or filled on the usage chunk) only when the client asked for ``stream_options.include_usage``;
deltas carry only the keys they set; an error after the stream began is ``data: {"error": {...}}`` (the openai SDK
raises it), followed by ``[DONE]`` like every stream.
"""

from __future__ import annotations

import json

from fastapi.responses import StreamingResponse

from .errors import APIError
from .protocol import ChatCompletionChunk

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx passes chunks through at once
DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chunk_event(chunk: ChatCompletionChunk, include_usage: bool) -> str:
    d = chunk.model_dump()
    for c in d["choices"]:
        c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
    if not include_usage:
        del d["usage"]
    return event(d)


def error_event(err: APIError) -> str:
    return event(err.body())


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` with the headers above; ``on_close`` runs however the response ends — Starlette never
    starts (so never finalises) the body generator when the client is gone before the first byte."""

    def __init__(self, content, on_close=None, headers: dict[str, str] | None = None):
        super().__init__(content, media_type="text/event-stream", headers={**HEADERS, **(headers or {})})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()
