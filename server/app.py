"""The FastAPI app: routes, the API-key dependency, the request guards (:mod:`server.http_guards`), startup and
shutdown.

``create_app(settings, loaded=None)`` is all a caller needs. ``loaded`` may be a ``LoadedModel`` (tests, embedding),
a zero-argument callable returning one (run in the loading thread), or None to load what ``settings`` names.
The model loads in the background, so ``/health`` answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from quant import LoadedModel

from . import chat
from .errors import ModelNotFound, QueueFull, RequestTimeout, Unauthorized, install_error_handlers
from .http_guards import BodyLimits, HostCheck, JsonOnly, NormalizePath
from .metrics import Metrics
from .protocol import parse_chat_request
from .runtime import Loader, Runtime
from .settings import ServerSettings
from .version import __version__

log = logging.getLogger(__name__)


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
            raise QueueFull(f"the server is busy: {self.waiting} requests are waiting to be read; retry in 1 s",
                            headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._sem.release()


class StatusMetrics:
    """Counts the HTTP status of every chat-completion response (401s and 400s included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/chat/"):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_status(message["status"])
            await send(message)

        return await self.app(scope, receive, counting_send)


def create_app(settings: ServerSettings, loaded: LoadedModel | Loader | None = None, hooks=None) -> FastAPI:
    """``hooks`` is passed to the engine (profiling timers; tests use it to slow generation down)."""
    metrics = Metrics(settings.model_names[0], settings.precision)
    runtime = Runtime(settings, metrics, loaded, hooks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        yield
        await asyncio.to_thread(runtime.close)

    # redirect_slashes=False: NormalizePath answers "/v1/chat/completions/" directly, where Starlette would
    # redirect to a Location built from the client's Host header.
    app = FastAPI(title="glm4v-edge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False)
    app.state.runtime = runtime
    install_error_handlers(app)

    async def require_api_key(request: Request) -> None:
        """Bearer auth with a constant-time compare; a dependency of every /v1 route."""
        if not settings.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise Unauthorized()

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    slots = PreparationSlots(settings.max_preparing, settings.max_queue)

    @v1.get("/models")
    async def list_models() -> JSONResponse:
        runtime.require_ready()
        return JSONResponse({"object": "list", "data": runtime.model_cards()})

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        runtime.require_ready()
        for card in runtime.model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        raise ModelNotFound(f"model {model_id!r} does not exist", param="model")

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        runtime.require_ready()
        timeout = settings.request_timeout or None  # covers the upload and the preparation, too
        async with slots.hold():
            try:
                async with asyncio.timeout(None if timeout is None else arrived + timeout - loop.time()):
                    body = await request.body()
                    # json + pydantic on a large body and the prompt's preparation are CPU work: off the loop
                    req = await loop.run_in_executor(runtime.pool, parse_chat_request, body,
                                                     runtime.max_prompt_chars)
                    prepared = await chat.prepare(req, runtime)
            except ClientDisconnect:
                log.info("client disconnected while sending its request (499)")
                return Response(status_code=chat.CLIENT_CLOSED)
            except TimeoutError:
                raise RequestTimeout(f"the request was not read and prepared within the server's limit of "
                                     f"{settings.request_timeout:g} s (--request-timeout)") from None
        handler = chat.stream if prepared.stream else chat.complete
        return await handler(prepared, runtime, request, arrived)

    app.include_router(v1)

    @app.api_route("/health", methods=["GET", "HEAD"])  # uptime monitors use HEAD
    async def health() -> JSONResponse:
        runtime.require_ready()
        lm = runtime.loaded
        return JSONResponse({"status": "ok", "model": settings.model_names[0], "precision": lm.spec.label(),
                             "demo": runtime.demo})

    @app.get("/metrics")
    async def prometheus() -> Response:
        engine = runtime.engine
        body = metrics.render(engine.stats() if engine else None, settings.max_queue,
                              runtime.loaded.device if runtime.loaded else None)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # Added inner to outer: a 413/408 from the body limits is still counted by StatusMetrics; paths are
    # normalised before anything looks at them.
    app.add_middleware(BodyLimits, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout)
    app.add_middleware(StatusMetrics, metrics=metrics)
    if not settings.api_key:
        app.add_middleware(JsonOnly)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"],
                           allow_headers=["*"])
    if settings.checks_host:
        app.add_middleware(HostCheck, allowed=settings.allowed_host_list)
    app.add_middleware(NormalizePath)
    return app
