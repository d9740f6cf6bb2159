"""Connection limits: idle sockets must never take /healthz and ingest down.

uvicorn closes a keep-alive connection idle after a response (``timeout_keep_alive``), but
a connection that never sends a request, or sends its headers a byte at a time, is held
forever; and its ``limit_concurrency`` answers 503 to new requests while idle
connections hold every slot, which is the outage itself. So the HTTP protocol here is
uvicorn's httptools protocol with four additions:

* a header timeout: a request's headers must be complete within ``header_timeout``
  seconds of the connection opening or of the request's first byte;
* a body timeout: its body must be complete within ``body_timeout`` seconds of its headers
  (a body sent a byte every few seconds is answered 408 and closed);
* a cap on open connections, kept below the descriptor limit: at the cap a new
  connection closes the longest-idle one (no request in progress; nginx drains its
  reusable connections the same way), else the one that has been sending its body the
  longest, and is refused only when every connection is busy with a request it has sent whole;
* the soft descriptor limit raised to the hard limit at start (``raise_fd_limit``), with
  ``RESERVED_FDS`` left for the store, the flight recorder and webhook clients.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

RESERVED_FDS = 128  # descriptors kept for SQLite, the flight recorder's files, webhook connections, logs
MIN_CONNECTIONS = 16


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force (0: unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return int(soft)


def connection_cap(configured: int, fd_limit: int) -> int:
    """The configured cap, lowered to fit the descriptor limit."""
    if fd_limit <= 0:
        return configured
    return max(MIN_CONNECTIONS, min(configured, fd_limit - RESERVED_FDS))


TOO_SLOW = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s")


def guarded_protocol(cap: int, header_timeout: float, body_timeout: float = 30.0) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with header and body timeouts and a connection cap (see the module doc)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedProtocol(HttpToolsProtocol):
        _busy = False  # a request's headers are in and its response is not complete yet
        _receiving = False  # ... and its body is not complete yet
        _idle_since = 0.0
        _body_since = 0.0
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._arm()
            if len(self.connections) > cap:
                self._make_room()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._body_done()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._busy = self._receiving = True
            self._body_since = self.loop.time()
            self._body_timer = self.loop.call_later(body_timeout, self._body_too_slow)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._body_done()
            super().on_message_complete()

        def _body_done(self) -> None:
            self._receiving = False
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_too_slow(self) -> None:
            self._body_timer = None
            if not self._receiving or self.transport.is_closing():
                return
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_started:
                body = (b'{"error": "the request body was not complete %g s after its headers '
                        b'(server.body_timeout_seconds)"}' % body_timeout)
                self.transport.write(TOO_SLOW % (len(body), body))
            self.transport.close()

        def on_response_complete(self) -> None:
            self._busy = False
            self._idle_since = self.loop.time()
            super().on_response_complete()  # arms uvicorn's keep-alive timeout

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self._busy and not self.transport.is_closing():
                self.transport.close()

        def _make_room(self) -> None:
            idle = [c for c in self.connections
                    if c is not self and not getattr(c, "_busy", True) and not c.transport.is_closing()]
            slow = [c for c in self.connections if c is not self and isinstance(c, GuardedProtocol)
                    and c._receiving and not c.transport.is_closing()]
            if idle:
                min(idle, key=lambda c: getattr(c, "_idle_since", 0.0)).transport.close()
            elif slow:  # still sending its body: the one at it longest goes first
                min(slow, key=lambda c: c._body_since)._body_too_slow()
            else:  # every other connection is in the middle of a request: this one waits its turn
                self.transport.close()

    return GuardedProtocol
