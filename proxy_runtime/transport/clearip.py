"""The one persistent TLS/TCP connection to ClearIP: connect, keep alive, reconnect with backoff.

RFC 5626 §3.5.1 CRLF keep-alive: a CRLF CRLF "ping" every ``keepalive_interval``; if no byte comes
back within ``pong_timeout`` the connection is taken as dead, closed and made again. The link
reports up/down to its owner, which fails every call waiting on ClearIP at once when it drops.

While down it retries with a growing backoff (capped at ``reconnect_max``), and at once when a call
needs it (:meth:`ClearIpLink.connect_now`): one attempt at a time, which every call waiting joins.
A failed attempt is reported (``on_connect_failed``) so the calls waiting on it get 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable

from proxy_runtime.sip.framing import PING
from proxy_runtime.transport.stream import StreamConnection, StreamOwner

log = logging.getLogger("clearip.link")


class ClearIpLink:
    def __init__(
        self,
        owner: StreamOwner,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        server_name: str,
        keepalive_interval: float,
        reconnect_max: float,
        max_size: int,
        on_state: Callable[[bool], None],
        on_connect_failed: Callable[[str], None] | None = None,
        connect_timeout: float = 5.0,
        pong_timeout: float = 10.0,
    ) -> None:
        self._owner = owner
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._server_name = server_name
        self.keepalive_interval = keepalive_interval
        self.reconnect_max = reconnect_max
        self._max_size = max_size
        self._on_state = on_state
        self._on_connect_failed = on_connect_failed
        self._connect_timeout = connect_timeout
        self._pong_timeout = pong_timeout
        self.conn: StreamConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._wake: asyncio.Event = asyncio.Event()  # set by connect_now(): retry before the backoff ends
        self.connecting = False  # an attempt is in progress (calls needing the link join it)
        self._awaiting_pong_since: float | None = None
        self.reconnects = 0
        self.last_error = ""
        self.tls_version: str | None = None
        self.connected_once = asyncio.Event()
        self.first_attempt_done = asyncio.Event()  # set after the first connect succeeds or fails

    @property
    def up(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="clearip-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.conn is not None:
            self.conn.close()

    def send(self, data: bytes) -> bool:
        conn = self.conn
        if conn is None or conn.closed:
            return False
        conn.write(data)
        return True

    def connect_now(self) -> None:
        """A call needs ClearIP and the link is down: connect now instead of when the backoff ends.

        One attempt at a time: while one is in progress the call joins it. The outcome reaches the
        owner as ``on_state(True)`` or ``on_connect_failed``, so a refused connect answers the calls
        waiting at once. Attempts are therefore bounded by one per connect round trip, and only
        while calls arrive (issue 12: once ClearIP accepts connections again, no call may get 503
        for want of the link; the old 0.5 s floor between attempts cost exactly such calls)."""
        if self.up or self.connecting:
            return
        self._wake.set()

    def connection_lost(self) -> None:
        """Called by the owner when our connection closed."""
        self._lost.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        last_log = -1e9
        while True:
            self._lost.clear()
            self._wake.clear()
            self.connecting = True
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: StreamConnection(
                            self._owner,
                            "clearip",
                            outbound=True,
                            max_size=self._max_size,
                            clock=loop.time,
                        ),
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self._server_name if self._ssl else None,
                    ),
                    self._connect_timeout,
                )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self.connecting = False
                self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.first_attempt_done.set()
                attempt += 1
                delay = min(self.reconnect_max, 0.25 * 2 ** min(attempt, 10)) * random.uniform(0.8, 1.2)
                # One line per attempt, but at most one a second: calls arriving during an outage
                # each ask for an attempt, and a busy proxy must not log hundreds a second.
                if loop.time() - last_log >= 1.0:
                    last_log = loop.time()
                    log.warning(
                        "ClearIP %s:%s unreachable (%s); attempt %d, next in %.1f s or when a call needs it",
                        self.host,
                        self.port,
                        self.last_error,
                        attempt,
                        delay,
                    )
                if self._on_connect_failed is not None:
                    self._on_connect_failed(self.last_error)
                # Sleep out the backoff, but retry at once when a call needs ClearIP (connect_now).
                await self._idle(delay)
                continue
            self.connecting = False
            assert isinstance(proto, StreamConnection)
            self.conn = proto
            if proto.transport is not None:
                ssl_obj = proto.transport.get_extra_info("ssl_object")
                self.tls_version = ssl_obj.version() if ssl_obj is not None else None
            self._awaiting_pong_since = None
            if attempt > 0 or self.connected_once.is_set():
                self.reconnects += 1
            attempt = 0
            self.last_error = ""
            log.info("ClearIP connection up: %s:%s (%s)", self.host, self.port, self.tls_version or "tcp")
            self.connected_once.set()
            self._on_state(True)
            self.first_attempt_done.set()
            await self._keepalive(proto)
            self.conn = None
            self._on_state(False)
            log.warning("ClearIP connection down: %s:%s", self.host, self.port)
            # A short pause so a ClearIP that drops every connection is not hammered, cut short
            # when a call needs the link.
            self._wake.clear()
            await self._idle(random.uniform(0.05, 0.25))

    async def _idle(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less when :meth:`connect_now` asks for an attempt."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _keepalive(self, conn: StreamConnection) -> None:
        loop = asyncio.get_running_loop()
        while not conn.closed:
            try:
                await asyncio.wait_for(self._lost.wait(), self.keepalive_interval)
                return
            except TimeoutError:
                pass
            if conn.closed:
                return
            if self._awaiting_pong_since is not None and conn.last_received >= self._awaiting_pong_since:
                self._awaiting_pong_since = None  # something came back: the connection is alive
            if (
                self._awaiting_pong_since is not None
                and loop.time() - self._awaiting_pong_since > self._pong_timeout
            ):
                log.warning("ClearIP keep-alive unanswered for %.0f s: reconnecting", self._pong_timeout)
                conn.close()
                return
            if loop.time() - conn.last_activity >= self.keepalive_interval:
                if self._awaiting_pong_since is None:
                    self._awaiting_pong_since = loop.time()
                conn.write(PING)
