"""TCP and TLS connections (inbound and outbound): Content-Length framing, keep-alive answers,
idle and partial-message timeouts, write buffering while an outbound connection is being made."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, cast

from proxy_runtime.sip.framing import PING, PONG, FramingError, StreamFramer

log = logging.getLogger("clearip.transport")


class StreamOwner(Protocol):
    """What a connection reports to (the server adapter)."""

    def stream_opened(self, conn: StreamConnection) -> bool: ...
    def stream_message(self, conn: StreamConnection, data: bytes) -> None: ...
    def stream_framing_error(self, conn: StreamConnection, exc: FramingError) -> None: ...
    def stream_closed(self, conn: StreamConnection, exc: Exception | None) -> None: ...


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection. ``conn_id`` is how the proxy core names it."""

    _next_id = 1

    def __init__(
        self,
        owner: StreamOwner,
        transport_name: str,
        *,
        outbound: bool,
        max_size: int,
        clock: Callable[[], float],
    ) -> None:
        self.owner = owner
        self.transport_name = transport_name  # "tcp" | "tls" | "clearip"
        self.outbound = outbound
        self.framer = StreamFramer(max_size)
        self.conn_id = StreamConnection._next_id
        StreamConnection._next_id += 1
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self._clock = clock
        self.last_activity = clock()
        self.last_received = self.last_activity
        self.partial_since: float | None = None  # when buffered bytes of an unfinished message began
        self.closed = False
        self.pending: list[bytes] = []  # writes queued before connection_made
        self.pending_keys: list[object] = []  # client transactions waiting on this connection
        self.errors = 0  # malformed messages received (the owner closes the connection at a budget)

    # --- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        if not self.owner.stream_opened(self):
            tr.abort()
            self.closed = True
            return
        if self.pending:
            tr.write(b"".join(self.pending))
            self.pending.clear()

    def data_received(self, data: bytes) -> None:
        now = self._clock()
        self.last_activity = now
        self.last_received = now
        framer = self.framer
        framer.feed(data)
        while not self.closed:
            try:
                frame = framer.next_frame()
            except FramingError as exc:
                self.owner.stream_framing_error(self, exc)
                self.close()
                return
            if frame is None:
                break
            if frame is PING or frame == PING:
                self.write(PONG)
                continue
            self.owner.stream_message(self, frame)
        if framer.buffered:
            if self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.stream_closed(self, exc)

    # --- use -----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)
            self.last_activity = self._clock()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
