"""Slow clients: how long a client may take to send its request.

uvicorn closes a kept-alive connection that stays idle between requests (`timeout_keep_alive`),
but nothing limits the request itself: a client may connect and send nothing, or half a header
line, and hold its socket for ever; fifty such clients hold fifty. So the request line and
headers must arrive within `header_timeout_seconds` of the connection opening (or, on a
kept-alive connection, of the request's first byte), else the connection is closed; and each
chunk of the body within `body_timeout_seconds` of the one before, else the request gets 408
(`OpenAIServer._body`). Both count in `leanserve_stalled_connections_closed_total`.
"""
from __future__ import annotations

import asyncio
import weakref

from prometheus_client import CollectorRegistry, Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import APIError

_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def stalled_connections(registry: CollectorRegistry) -> Counter:
    """The registry's counter of connections closed for stalling, made at the first call."""
    if registry not in _COUNTERS:
        counter = Counter("leanserve_stalled_connections_closed", "Connections closed because the client "
                          "stalled while sending its request, by the part it was sending", ["part"],
                          registry=registry)
        for part in ("headers", "body"):
            counter.labels(part=part)  # both series exist from the start, at 0
        _COUNTERS[registry] = counter
    return _COUNTERS[registry]


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, which closes a connection whose request headers are late."""

    header_timeout: float
    closed: Counter
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # the next request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        self.closed.labels(part="headers").inc()
        self.shutdown()  # closes now, or (a pipelined request) after the response in flight


def header_timeout_protocol(seconds: float, registry: CollectorRegistry) -> type[HeaderTimeoutProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`: uvicorn makes one per connection."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout": seconds, "closed": stalled_connections(registry)})


async def chunks(stream, seconds: float):
    """The chunks of `stream`; TimeoutError when the next one takes longer than `seconds`."""
    it = aiter(stream)
    while (chunk := await asyncio.wait_for(anext(it, None), seconds)) is not None:
        yield chunk


def body_stalled(registry: CollectorRegistry, seconds: float) -> APIError:
    """Counts a stalled body; its 408 closes the connection (the rest of the body would be unread)."""
    stalled_connections(registry).labels(part="body").inc()
    return APIError(408, f"The request body stalled: no data for {seconds:g} s", code="request_timeout",
                    headers={"Connection": "close"})
