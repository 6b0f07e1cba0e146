"""The routes, as module-level routers (FastAPI's "bigger applications" layout): ``v1`` carries the API-key
dependency for every API route and is mounted at ``/v1`` and at the root; ``public`` has ``/health`` and
``/metrics``. Handlers find the app's
:class:`~server.runtime.Runtime` through :func:`runtime_of`, and never build protocol objects themselves: requests
go through :mod:`server.translate`, responses through :mod:`server.chat`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from . import chat
from .errors import ModelNotFound, QueueFull, RequestTimeout, Unauthorized
from .protocol import ModelList, parse_chat_request, parse_completion_request
from .reader import CLIENT_CLOSED
from .runtime import Runtime
from .translate import prepare, prepare_completion

log = logging.getLogger(__name__)


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def require_api_key(request: Request) -> None:
    """Bearer auth with a constant-time compare; a dependency of every /v1 route."""
    key = runtime_of(request).settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized()


class PreparationSlots:
    """At most ``slots`` requests are read, parsed and preprocessed at once — their bodies, decoded images and
    token ids are the memory a burst of large requests costs — and at most ``max_waiting`` wait for a slot (their
    bodies still unread, held back by TCP flow control); one more is a 429. Preparation is admission, too."""

    def __init__(self, slots: int, max_waiting: int):
        self._sem = asyncio.Semaphore(slots)
        self.max_waiting = max_waiting
        self.waiting = 0

    @asynccontextmanager
    async def hold(self):
        if self._sem.locked() and self.waiting >= self.max_waiting:
            raise QueueFull(
                f"the server is busy: {self.waiting} requests are waiting to be read; retry in 1 s",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._sem.release()


# The API, mounted at /v1 and at the root too (llama.cpp's server answers /chat/completions and /models: a base URL
# typed without /v1 works).
v1 = APIRouter(dependencies=[Depends(require_api_key)])
public = APIRouter()


@v1.get("/models")
async def list_models(request: Request) -> JSONResponse:
    rt = runtime_of(request)
    rt.require_ready()
    return JSONResponse(ModelList(data=rt.model_cards()).model_dump())


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    rt.require_ready()
    for card in rt.model_cards():
        if card.id == model_id:
            return JSONResponse(card.model_dump())
    raise ModelNotFound(f"model {model_id!r} does not exist", param="model")


@v1.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, parse_chat_request, prepare)


async def _serve(request: Request, parse, prepare_request) -> Response:
    """Read, parse and prepare within the preparation slots and --request-timeout, then answer (JSON or SSE)."""
    rt = runtime_of(request)
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    rt.require_ready()
    timeout = rt.settings.request_timeout or None  # covers the upload and the preparation, too
    async with request.app.state.preparation_slots.hold():
        try:
            async with asyncio.timeout(None if timeout is None else arrived + timeout - loop.time()):
                body = await request.body()
                # json + pydantic on a large body and the prompt's preparation are CPU work: off the loop
                req = await loop.run_in_executor(rt.pool, parse, body, rt.max_prompt_chars)
                prepared = await prepare_request(req, rt)
        except ClientDisconnect:
            log.info("client disconnected while sending its request (499)")
            return Response(status_code=CLIENT_CLOSED)
        except TimeoutError:
            raise RequestTimeout(
                f"the request was not read and prepared within the server's limit of "
                f"{rt.settings.request_timeout:g} s (--request-timeout)"
            ) from None
    handler = chat.stream if prepared.stream else chat.complete
    return await handler(prepared, rt, request, arrived)


@v1.post("/completions")
async def completions(request: Request) -> Response:
    """The legacy completions API: a raw prompt, no chat template (LlamaIndex OpenAILike's default)."""
    return await _serve(request, parse_completion_request, prepare_completion)


@v1.post("/responses")
async def responses(request: Request) -> Response:
    """The core of the Responses API (server/responses.py), stateless."""
    from .responses import parse_responses_request, prepare_response

    return await _serve(request, parse_responses_request, prepare_response)


@public.api_route("/health", methods=["GET", "HEAD"])  # uptime monitors use HEAD
async def health(request: Request) -> JSONResponse:
    rt = runtime_of(request)
    rt.require_ready()
    return JSONResponse(
        {"status": "ok", "model": rt.served_names[0], "precision": rt.loaded.spec.label(), "demo": rt.demo}
    )


@public.get("/metrics")
async def prometheus(request: Request) -> Response:
    rt = runtime_of(request)
    engine = rt.engine
    body = rt.metrics.render(
        engine.stats() if engine else None, rt.settings.max_queue, rt.loaded.device if rt.loaded else None
    )
    return Response(body, media_type=CONTENT_TYPE_LATEST)
