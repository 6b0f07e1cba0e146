"""The FastAPI app: the runtime, the routers (:mod:`server.routes`), the error handlers, the request guards
(:mod:`server.http_guards`), startup and shutdown.

``create_app(settings, loaded=None)`` is all a caller needs. ``loaded`` may be a ``LoadedModel`` (tests, embedding),
a zero-argument callable returning one (run in the loading thread), or None to load what ``settings`` names.
The model loads in the background, so ``/health`` answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from quant import LoadedModel

from . import routes
from .errors import install_error_handlers
from .http_guards import BodyLimits, HostCheck, JsonOnly, NormalizePath
from .metrics import Metrics
from .routes import PreparationSlots
from .runtime import Loader, Runtime
from .settings import ServerSettings
from .version import __version__

log = logging.getLogger(__name__)


class StatusMetrics:
    """Counts the HTTP status of every (chat) completion response (401s and 400s included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith(("completions", "responses")):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_status(message["status"])
            await send(message)

        return await self.app(scope, receive, counting_send)


def create_app(
    settings: ServerSettings, loaded: LoadedModel | Loader | None = None, hooks=None, replica: str | None = None
) -> FastAPI:
    """``hooks`` is passed to the engine (profiling timers; tests use it to slow generation down); ``replica`` is
    serve-cluster's replica id (a label on every metric)."""
    metrics = Metrics((settings.model_names or ["glm-4v-9b"])[0], settings.precision, replica=replica)
    runtime = Runtime(settings, metrics, loaded, hooks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        yield
        await asyncio.to_thread(runtime.close)

    # redirect_slashes=False: NormalizePath answers "/v1/chat/completions/" directly, where Starlette would
    # redirect to a Location built from the client's Host header.
    app = FastAPI(
        title="glm4v-edge",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    app.state.preparation_slots = PreparationSlots(settings.max_preparing, settings.max_queue)
    install_error_handlers(app)
    app.include_router(routes.v1, prefix="/v1")
    app.include_router(routes.v1)  # a base URL without /v1 (llama.cpp's server does the same)
    app.include_router(routes.public)

    # Added inner to outer: a 413/408 from the body limits is still counted by StatusMetrics; paths are
    # normalised before anything looks at them.
    app.add_middleware(BodyLimits, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout)
    app.add_middleware(StatusMetrics, metrics=metrics)
    if not settings.api_key:
        app.add_middleware(JsonOnly)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"], allow_headers=["*"]
        )
    if settings.checks_host:
        app.add_middleware(HostCheck, allowed=settings.allowed_host_list)
    app.add_middleware(NormalizePath)
    return app
