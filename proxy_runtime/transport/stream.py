"""TCP and TLS connections (inbound and outbound): Content-Length framing, keep-alive answers,
idle and partial-message timeouts, write buffering while an outbound connection is being made,
a malformed-message budget per window, and containment of the owner's exceptions."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from proxy_runtime.sip.framing import PING, PONG, FramingError, StreamFramer

log = logging.getLogger("clearip.transport")


ERROR_BUDGET = 10  # malformed messages on one connection ...
ERROR_WINDOW = 60.0  # ... within this many seconds close it
TLS_RECORD = b"\x16\x03"  # a TLS handshake record (ClientHello): never the start of a SIP message


class ErrorBudget:
    """At most ``limit`` errors within any ``window`` seconds (a sliding window over the last
    ``limit`` error times). A trunk that sends a malformed message now and then, for days, keeps
    its connection; one that keeps sending garbage loses it."""

    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int = ERROR_BUDGET, window: float = ERROR_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque(maxlen=limit)

    def spend(self, now: float) -> bool:
        """Count one error at ``now``; True when ``limit`` of them fell within ``window``."""
        self._times.append(now)
        return len(self._times) >= self.limit and now - self._times[0] <= self.window

    def __len__(self) -> int:
        return len(self._times)


class ContainedErrors:
    """Log an unexpected exception once with its traceback, then once a minute with a count, so a
    bug hit by every message neither floods the log nor goes unseen. (asyncio would log it and
    close the connection: for the ClearIP link that failed every call waiting on it.)"""

    INTERVAL = 60.0

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}
        self.total = 0

    def report(self, where: str, exc: BaseException, detail: str = "") -> None:
        """``where`` (with the exception's type) is what is rate-limited; ``detail`` (a peer) is
        only shown."""
        self.total += 1
        key = f"{where}:{type(exc).__name__}"
        now = time.monotonic()
        last = self._last.get(key)
        if last is None or now - last >= self.INTERVAL:
            more = self._since.pop(key, 0)
            extra = f" ({more} more since the last report)" if more else ""
            self._log.error("contained an error while %s%s%s", where, detail, extra, exc_info=exc)
            self._last[key] = now
        else:
            self._since[key] = self._since.get(key, 0) + 1


contained = ContainedErrors(log)
"""Exceptions contained on the transport's receive paths (stream, datagram, timer)."""


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
        # Client transactions that sent on this connection: when it closes (RST, FIN, refused),
        # each gets a transport error at once instead of waiting out a timer (RFC 3261 §18.4).
        self.keys: set[object] = set()
        self.errors = ErrorBudget()  # malformed messages (the owner closes the connection over it)

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
        if not framer.buffered and data.startswith(TLS_RECORD) and self.transport_name == "tcp":
            # Someone speaks TLS to a plain TCP port (a tls Contact/URI pointing at it): close at
            # once so their handshake fails now, not when their timeout runs out.
            log.info("closing tcp connection from %s:%d: a TLS handshake on a plain TCP port", *self.peer)
            self.close()
            return
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
            try:
                self.owner.stream_message(self, frame)
            except Exception as exc:  # a bug must cost this message, not the connection
                contained.report(
                    f"reading a {self.transport_name} message", exc, f" from {self.peer[0]}:{self.peer[1]}"
                )
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
