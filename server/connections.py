"""Connection-level limits uvicorn does not have: a header deadline, a hard cap on open connections, file descriptors.

uvicorn closes a keep-alive connection that stays idle after a response, but not one that never sends a request,
nor one that sends its headers a byte at a time (slowloris): each holds a socket — a file descriptor — forever, and
a few hundred of them lock everyone out. Here:

* every connection must deliver a complete request head within ``--header-timeout`` seconds of opening, or of the
  previous response (the keep-alive wait), else it is closed;
* at most ``--max-connections`` are open; one more is answered ``503`` in the OpenAI envelope and closed at once,
  before it can hold anything (uvicorn's own ``limit_concurrency`` only answers 503 to *requests*, so idle sockets
  would still pile up);
* the cap and the listen backlog are kept below the process's open-file limit (raised to its hard limit first), so
  accepting never runs out of descriptors — the alternative is asyncio logging an ``accept()`` traceback per attempt
  (66 MiB in 13 s seen) and piling up retries; that log line is rate-limited anyway.

The body deadline (``--body-timeout``) lives in the ASGI layer (:mod:`server.http_guards`), where a 408 can be sent.
"""

from __future__ import annotations

import json
import logging
import os
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

FD_RESERVE = 48  # descriptors kept for loading the model (one per shard), outgoing image fetches, the log


def raise_open_file_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force (None where unknown)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def open_descriptors() -> int:
    """Descriptors this process has open now (a guess where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def connection_budget(requested: int, open_file_limit: int | None, open_now: int) -> tuple[int, int]:
    """(connection cap, listen backlog) that keep the process below its open-file limit.

    asyncio accepts up to ``backlog`` connections per readiness event before any protocol sees them, and on EMFILE it
    does not stop: it logs and schedules a retry per remaining iteration (CPython's ``_accept_connection``). So the
    budget holds the cap plus a few accept batches in flight, and the backlog is no larger than that allows.
    """
    if open_file_limit is None or open_file_limit < 0:
        return requested, 2048
    available = open_file_limit - open_now - FD_RESERVE
    backlog = max(8, min(2048, available // 8))
    return max(1, min(requested, available - 4 * backlog)), backlog


def _busy_response() -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": "the server has too many open connections; retry shortly",
                "type": "server_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "retry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a hard connection cap (set by :func:`protocol`)."""

    header_timeout: float = 10.0
    max_connections: int = 128

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        if len(self.connections) > self.max_connections:
            transport.write(_busy_response())
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # a request head is still incomplete (or a keep-alive wait began)
        else:
            self._disarm_head_timer()  # the head arrived; the body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer(restart=True)  # the next head, too, must arrive in time

    def _arm_head_timer(self, restart: bool = False) -> None:
        if self._head_timer is not None:
            if not restart:
                return
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing %s: no complete request head within %g s", self.client, self.header_timeout)
            self.transport.close()


def protocol(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A protocol class bound to these limits (uvicorn instantiates the class it is given)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )


class RateLimitFilter(logging.Filter):
    """Lets a record with a given message prefix through at most once per ``interval_s``; counts the rest."""

    def __init__(self, prefix: str, interval_s: float = 30.0):
        super().__init__()
        self.prefix, self.interval_s = prefix, interval_s
        self._last = float("-inf")
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return False
        self._last = now
        if self._suppressed:
            record.msg = f"{record.msg} ({self._suppressed} more like it suppressed)"
            self._suppressed = 0
        record.exc_info = None  # the traceback is the same every time; the message says what happened
        record.exc_text = None
        return True


ACCEPT_ERROR_PREFIX = "socket.accept() out of system resource"


def rate_limit_accept_errors() -> None:
    """Install the rate limit on asyncio's accept-error record (once per process)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, RateLimitFilter) and f.prefix == ACCEPT_ERROR_PREFIX for f in logger.filters):
        logger.addFilter(RateLimitFilter(ACCEPT_ERROR_PREFIX))
