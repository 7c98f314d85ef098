"""Serving an aiohttp application with the bounds aiohttp itself does not have.

aiohttp's server has an idle keep-alive timeout but no deadline for a request's headers, no cap
on open connections and no cap on body bytes being read at once, so slowloris clients, stalled
bodies and thousands of idle sockets cost memory and descriptors without limit. This module adds
them around aiohttp's own protocol, without changing how requests are parsed or answered:

* a cap on open connections (``max_connections``): past it a connection is answered
  ``503 Service Unavailable`` and closed before anything is read;
* a deadline for each request's headers (``header_timeout_secs``), counted from the connection's
  start or, on a kept-alive connection, from the first byte of the next request;
* aiohttp's idle keep-alive timeout set to ``idle_timeout_secs``;
* :class:`BodyBudget`, used by handlers that read bodies: a deadline for the whole body
  (``body_timeout_secs``), a cap on bytes being read at once across every request, and a lower
  one for requests not yet authenticated.

A connection closed by a deadline is logged once at info (``http_connection_timed_out``) and
counted; it is never an error of the daemon's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger()

_BUSY_BODY = b'{"__type":"ServiceUnavailableException","message":"Slow down."}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/x-amz-json-1.1\r\n"
         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 1024
    header_timeout_secs: float = 10.0
    body_timeout_secs: float = 30.0
    idle_timeout_secs: float = 60.0
    max_inflight_body_bytes: int = 256 << 20
    max_unauthenticated_body_bytes: int = 32 << 20


class BodyBudget:
    """Bytes of request bodies being read at once, across every connection of one server.
    A request reserves what it is about to read; over the cap it is refused before reading."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.inflight = 0
        self.unauthenticated = 0
        self.refused = 0

    def reserve(self, nbytes: int, *, authenticated: bool) -> bool:
        if self.inflight + nbytes > self.limits.max_inflight_body_bytes:
            return False
        if not authenticated and self.unauthenticated + nbytes > self.limits.max_unauthenticated_body_bytes:
            return False
        self.inflight += nbytes
        if not authenticated:
            self.unauthenticated += nbytes
        return True

    def release(self, nbytes: int, *, authenticated: bool) -> None:
        self.inflight -= nbytes
        if not authenticated:
            self.unauthenticated -= nbytes


class _Guard(asyncio.Protocol):
    """One connection: forwards everything to aiohttp's protocol and enforces the deadlines."""

    def __init__(self, server: GuardedServer, make_inner: Callable[[], Any]) -> None:
        self.server = server
        self._make_inner = make_inner
        self.inner: Any = None
        self.transport: Any = None  # asyncio's or uvloop's transport
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if len(self.server.connections) >= self.server.limits.max_connections:
            self.server.refused += 1
            try:
                self.transport.write(_BUSY)
            finally:
                self.transport.close()
            return
        self.server.connections.add(self)
        self.inner = self._make_inner()
        self.server.by_protocol[id(self.inner)] = self  # aiohttp's protocol has __slots__
        self.inner.connection_made(transport)
        self._arm(self.server.limits.header_timeout_secs, "headers")

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if not self._in_request and self._timer is None:
            self._arm(self.server.limits.header_timeout_secs, "headers")
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.server.connections.discard(self)
        if self.inner is not None:
            self.server.by_protocol.pop(id(self.inner), None)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- called by the middleware
    def request_started(self) -> None:
        self._in_request = True
        self._disarm()

    def request_finished(self) -> None:
        self._in_request = False  # the next request's first byte arms the header deadline

    # -- deadlines
    def _arm(self, secs: float, what: str) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(secs, self._expired, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str) -> None:
        self._timer = None
        self.server.timed_out += 1
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        log.info("http_connection_timed_out", waiting_for=what, peer=str(peer[0]) if peer else None,
                 listen=self.server.name)
        if self.transport is not None:
            self.transport.abort()


class GuardedServer:
    """An aiohttp application served on one address with :class:`HttpLimits`."""

    def __init__(self, app: web.Application, host: str, port: int, limits: HttpLimits, name: str, *,
                 auto_decompress: bool = False, ssl_context: ssl.SSLContext | None = None) -> None:
        app.middlewares.insert(0, self._track)
        self.app = app
        self.host, self.port = host, port
        self.limits = limits
        self.name = name
        self.auto_decompress = auto_decompress
        self.ssl_context = ssl_context
        self.connections: set[_Guard] = set()
        self.by_protocol: dict[int, _Guard] = {}
        self.refused = 0
        self.timed_out = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    @web.middleware
    async def _track(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        """Tells the connection's guard that a request's headers are in (its deadline stops)
        and when the request is answered (the next byte starts the next deadline)."""
        guard = self.by_protocol.get(id(request.protocol))
        if guard is not None:
            guard.request_started()
        try:
            return await handler(request)  # type: ignore[no-any-return]
        finally:
            if guard is not None:
                guard.request_finished()

    async def start(self) -> None:
        # The API keeps auto_decompress off: a body is hashed (SigV4) and size-checked as it was
        # sent, then inflated by the handler within its own limits.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.limits.idle_timeout_secs,
                                     auto_decompress=self.auto_decompress)
        await self._runner.setup()
        factory = self._runner.server
        assert factory is not None
        loop = asyncio.get_running_loop()
        # With TLS, a handshake must finish within the header deadline: a client that opens a
        # connection and stalls before its first request byte is cut off the same either way.
        tls: dict[str, Any] = ({"ssl": self.ssl_context, "ssl_handshake_timeout": self.limits.header_timeout_secs}
                               if self.ssl_context is not None else {})
        self._server = await loop.create_server(
            lambda: _Guard(self, factory), self.host, self.port, reuse_address=True, backlog=1024,
            family=socket.AF_UNSPEC, **tls,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
