"""The FastAPI app: routes, the API-key dependency, body-size and status-metric middleware, startup and shutdown.

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

from glm4v_edge import __version__
from quant import LoadedModel

from . import chat
from .errors import ModelNotFound, PayloadTooLarge, Unauthorized, install_error_handlers
from .metrics import Metrics
from .protocol import parse_chat_request
from .runtime import Loader, Runtime
from .settings import ServerSettings

log = logging.getLogger(__name__)


class BodySizeLimit:
    """413 for bodies over the limit: at once from Content-Length, or as soon as a chunked body passes it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        return await self.app(scope, limited_receive, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is larger than the limit of {self.max_bytes:,} bytes "
                               "(--max-request-bytes)")


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

    app = FastAPI(title="glm4v-edge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
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
        arrived = asyncio.get_running_loop().time()
        runtime.require_ready()
        body = await request.body()
        # json + pydantic on a body of up to --max-request-bytes (base64 images) would stall every stream: off-loop
        req = await asyncio.get_running_loop().run_in_executor(runtime.pool, parse_chat_request, body)
        prepared = await chat.prepare(req, runtime)
        handler = chat.stream if prepared.stream else chat.complete
        return await handler(prepared, runtime, request, arrived)

    app.include_router(v1)

    @app.get("/health")
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

    # Added inner to outer: a 413 from the size limit is still counted, and CORS wraps everything.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(StatusMetrics, metrics=metrics)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"],
                           allow_headers=["*"])
    return app
