"""ASGI middleware that runs before any route: path normalisation, Host and Content-Type checks, body limits.

* :class:`NormalizePath` — ``/v1//chat/completions`` and ``/v1/chat/completions/`` reach the route itself (Starlette
  would otherwise answer a redirect whose ``Location`` is built from the client's ``Host``).
* :class:`HostCheck` — a key-less server on a loopback address answers only loopback Host names (``localhost``,
  ``*.localhost``, ``127.0.0.0/8``, ``[::1]``) plus ``--allowed-hosts``: a web page the user visits cannot reach it
  through DNS rebinding (a name of the attacker's that resolves to 127.0.0.1 still sends its own name as Host), as
  Ollama does. 403 otherwise.
* :class:`JsonOnly` — without an API key, a POST must say ``Content-Type: application/json``: a web page can send a
  cross-origin ``text/plain`` POST without a CORS preflight ("simple request") and so drive a key-less server; a
  JSON body forces the preflight, which the browser refuses without CORS. 415 with the fix in the message.
* :class:`BodyLimits` — 413 past ``--max-request-bytes`` (at once from ``Content-Length``, or as soon as a chunked
  body passes it) and 408 when the body has not fully arrived ``--body-timeout`` seconds after the route began
  reading it (slow uploads hold a connection and a preparation slot).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re

from .errors import APIError, BodyTimeout, Forbidden, PayloadTooLarge, UnsupportedMediaType

_SLASHES = re.compile(r"/{2,}")


async def _reply(err: APIError, scope, receive, send) -> None:
    await err.response()(scope, receive, send)


class NormalizePath:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            clean = _SLASHES.sub("/", path)
            if len(clean) > 1 and clean.endswith("/"):
                clean = clean.rstrip("/") or "/"
            if clean != path:
                scope = dict(scope, path=clean, raw_path=clean.encode())
        return await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """``Host`` header → the bare name or address, lower-case: ``[::1]:8000`` → ``::1``, ``Example.lan.:80`` →
    ``example.lan``."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    name, sep, port = h.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        h = name
    return h.rstrip(".")


def is_loopback_host(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostCheck:
    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.allowed = {host_name(h) for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = dict(scope["headers"]).get(b"host")
        if raw is not None:  # no Host at all is HTTP/1.0 from a script, never a browser
            name = host_name(raw.decode("latin-1"))
            if not is_loopback_host(name) and name not in self.allowed:
                shown = raw.decode("latin-1")[:100]
                return await _reply(
                    Forbidden(
                        f"Host {shown!r} is not allowed: this server has no API key and listens on a loopback address, "
                        "so it answers only localhost, 127.0.0.1 and [::1] (a defence against DNS rebinding). Add the "
                        "name with --allowed-hosts, or set --api-key",
                        code="host_not_allowed",
                    ),
                    scope,
                    receive,
                    send,
                )
        return await self.app(scope, receive, send)


class JsonOnly:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            ctype = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            if ctype.split(";", 1)[0].strip().lower() != "application/json":
                shown = ctype[:100] or "none"
                return await _reply(
                    UnsupportedMediaType(
                        f"Content-Type must be application/json (got {shown!r}); with curl add "
                        "-H 'Content-Type: application/json'. A server without an API key insists on it, so that web "
                        "pages cannot post to it"
                    ),
                    scope,
                    receive,
                    send,
                )
        return await self.app(scope, receive, send)


class BodyLimits:
    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _reply(self._too_large(), scope, receive, send)
        seen = 0
        deadline: float | None = None
        body_done = False

        async def limited_receive():
            nonlocal seen, deadline, body_done
            if body_done:  # later receives only wait for the disconnect: no deadline there
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                async with asyncio.timeout(deadline - loop.time()):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {self.timeout_s:g} s (--body-timeout)"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
                body_done = not message.get("more_body", False)
            return message

        return await self.app(scope, limited_receive, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than the limit of {self.max_bytes:,} bytes (--max-request-bytes)"
        )
