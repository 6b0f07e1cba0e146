"""Start the server for a :class:`~server.settings.ServerSettings`: uvicorn with the connection guards, a graceful
shutdown that drains the engine, and the startup warnings for risky settings. The ``serve`` command
(:mod:`glm4v_edge.serve`) parses the flags and calls :func:`run_server`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .settings import ServerSettings

log = logging.getLogger(__name__)

NO_KEY_WARNING = (
    "binding %s without --api-key: anyone who can reach this address can use the model. "
    "Set GLM4V_API_KEY (or --api-key), or bind 127.0.0.1."
)


def startup_warnings(settings: ServerSettings) -> list[str]:
    """Settings that are allowed but risky, said out loud at startup."""
    warnings = []
    if not settings.api_key and not settings.is_loopback:
        warnings.append(NO_KEY_WARNING % settings.host)
    if settings.allow_private_urls:
        warnings.append("--allow-private-urls: image URLs may reach private services on this machine and network")
    if settings.allowed_host_list == ["*"] and not settings.api_key:
        warnings.append("--allowed-hosts '*' without --api-key: web pages can reach this server through DNS rebinding")
    if settings.cors_origin_list == ["*"] and not settings.api_key:
        warnings.append("--cors-origins '*' without --api-key: any web page the user opens can use the model")
    return warnings


def make_server(settings: ServerSettings, app):
    """A uvicorn server whose shutdown drains the engine *while* uvicorn waits for open connections.

    uvicorn only sends the lifespan shutdown after every connection has closed, so a stream still generating would
    hold the process for its whole length; here the engine stops taking requests at once, running ones get
    ``--shutdown-timeout`` seconds to finish, and whatever is left is cut cleanly (final chunk + ``[DONE]``).
    """
    import asyncio
    import signal

    import uvicorn

    runtime = app.state.runtime

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            drain = asyncio.create_task(asyncio.to_thread(runtime.drain, settings.shutdown_timeout))
            await super().shutdown(sockets)
            await drain

        def handle_exit(self, sig, frame) -> None:
            # uvicorn records the signal and re-raises it after shutting down, which turns a graceful stop into
            # exit status 130/143; the graceful shutdown *is* our answer to SIGINT/SIGTERM. A second SIGINT still
            # forces the exit.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    from .connections import (
        connection_budget,
        open_descriptors,
        protocol,
        raise_open_file_limit,
        rate_limit_accept_errors,
    )

    open_files = raise_open_file_limit()
    max_connections, backlog = connection_budget(settings.max_connections, open_files, open_descriptors())
    if max_connections < settings.max_connections:
        log.warning(
            "--max-connections %d lowered to %d: the open-file limit is %s (raise it with ulimit -n)",
            settings.max_connections,
            max_connections,
            open_files,
        )
    rate_limit_accept_errors()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        http=protocol(settings.header_timeout, max_connections),
        backlog=backlog,
        timeout_graceful_shutdown=settings.shutdown_timeout + 5,
    )
    server = GracefulServer(config)
    runtime.on_failure = lambda: setattr(server, "should_exit", True)
    return server


def run_server(settings: ServerSettings) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a graceful stop, 1 when the model failed to load, 2 for bad settings."""
    from .app import create_app

    if settings.allowed_local_media_path and not Path(settings.allowed_local_media_path).is_dir():
        log.error("--allowed-local-media-path %s is not a folder", settings.allowed_local_media_path)
        return 2
    for warning in startup_warnings(settings):
        log.warning(warning)
    app = create_app(settings)
    server = make_server(settings, app)
    log.info(
        "listening on http://%s:%d/v1 (model %s; /health answers 503 until it is loaded)",
        settings.host,
        settings.port,
        ", ".join(settings.model_names or ["glm-4v-9b", "glm-4v", "…"]),
    )
    server.run()
    runtime = app.state.runtime
    if runtime.state == "failed":
        log.error("exiting: %s", runtime.error)
        return 1
    return 0
