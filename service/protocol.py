"""The HTTP/1.1 connection protocol ``search-service`` runs: uvicorn's httptools one, guarded.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not the time a client
takes to send one: a client that sends half its headers, or a ``content-length`` and then a
trickle of the body (slowloris), held its connection (and, once the headers were in, a request
task) open forever. Nor does it stop a request whose client has hung up: the handler runs on,
its search queued, for nobody. :class:`GuardedHttpToolsProtocol` adds both:

- **read deadline**: a request's headers and body must arrive within ``read_timeout_s`` of its
  first byte (of the connection, for the first request). Past it the connection is closed, with
  a ``408`` first if the headers were not complete (no handler has seen the request).
- **cancel on disconnect**: when the connection is lost before the response is complete, the
  request's task is cancelled; a search awaiting the batcher then cancels its future, and the
  batcher drops the job before searching it.

It also writes a response's head (status line and headers) together with the first part of
its body: uvicorn writes them with two ``transport.write`` calls, two ``send`` system calls and
two TCP segments (``TCP_NODELAY``), and the client wakes for each.

uvicorn takes it as ``uvicorn.Config(http="service.protocol:GuardedHttpToolsProtocol")``; the
deadline is the config's ``read_timeout_s`` attribute (:class:`service.main._Config`). It builds
on uvicorn's private ``_start_asgi_task`` (uvicorn pinned in constraints.txt;
tests/test_server_hardening.py covers both guards through a real server).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT_S = 10.0
_TIMEOUT_BODY = b"request not received within the read timeout\n"
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_TIMEOUT_BODY)
) + _TIMEOUT_BODY


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # what uvicorn's cycle writes for ``Expect: 100-continue``


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a per-request read deadline and cancel on disconnect."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.read_timeout_s: float = getattr(config, "read_timeout_s", DEFAULT_READ_TIMEOUT_S)
        self._read_timer: asyncio.TimerHandle | None = None
        self._handler: asyncio.Task | None = None
        self._headers_done = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A new connection: its first request must arrive within the read timeout."""
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        """The first byte of a request: start its read deadline."""
        super().on_message_begin()
        self._headers_done = False
        self._arm()

    def on_headers_complete(self) -> None:
        """The headers are in; the deadline runs on until the body is."""
        self._headers_done = True
        super().on_headers_complete()
        if self.cycle is not None:  # its response's head goes out with the body's first bytes
            self.cycle.transport = HeadWithBody(self.transport)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        """The whole request is in: no read deadline until the next one begins."""
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel the request's task if its response was not complete: nobody will read it."""
        self._disarm()
        cycle, handler = self.cycle, self._handler
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete and handler is not None:
            handler.cancel()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        async def tracked(scope: Any, receive: Any, send: Any) -> None:
            if cycle.disconnected:  # hung up before its task started: nobody to answer
                return
            self._handler = asyncio.current_task()
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                if not cycle.disconnected:
                    raise  # a shutdown, not our cancel on disconnect
                # the client has gone: nothing to answer and nothing to log
            finally:
                self._handler = None

        super()._start_asgi_task(cycle, tracked)

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        logger.info("closed a connection whose request did not arrive within %.3g s", self.read_timeout_s)
        if not self._headers_done:  # no handler has this request: say why before closing
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


class HeadWithBody:
    """A response cycle's view of the connection that holds the first write (the head) back.

    uvicorn's cycle writes the head on ``http.response.start`` and each body part on
    ``http.response.body``, and before either only an interim ``100 Continue``; this joins the
    head to the first body write, so a small response is one system call. The interim answer
    and everything else go straight to the transport.
    """

    __slots__ = ("_head", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._held = False

    def write(self, data: bytes) -> None:
        """Hold the head back; write it with the next bytes."""
        if not self._held and data != CONTINUE:
            self._held, self._head = True, data
            return
        if self._head is not None:
            data, self._head = self._head + data, None
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
