"""The asyncio adapter around :class:`~proxy_runtime.core.proxy.ProxyCore`: listeners, the ClearIP
link, outbound connections, one timer, metrics publishing, drain and reload.

The core is fed from the sockets and re-armed with one ``loop.call_at`` at its next deadline,
like aioquic's protocol adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Protocol

from proxy_runtime.core import build_kind
from proxy_runtime.core.proxy import CLEARIP, ProxyCore, Target
from proxy_runtime.metrics import names
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.settings import RESTART_ONLY_FIELDS, HostPort, Settings
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.framing import FramingError
from proxy_runtime.transport import tls
from proxy_runtime.transport.clearip import ClearIpLink
from proxy_runtime.transport.stream import StreamConnection, contained
from proxy_runtime.transport.udp import UdpSocket, bound_socket

log = logging.getLogger("clearip.server")

PARTIAL_MESSAGE_TIMEOUT = 10.0  # a started message must complete within this (slow-loris guard)
TLS_HANDSHAKE_TIMEOUT = 10.0  # a TLS client must finish its handshake within this (or idle_timeout)
# Outbound TLS (a carrier Contact with transport=tls): the handshake must finish within this many
# TCP connect round trips, and never under the floor. A TLS server answers a ClientHello within one
# round trip; a plain TCP SIP listener typically never answers (it waits for a CRLF CRLF),
# and without this bound the call sat out the whole `timeout` on it.
TLS_HANDSHAKE_RTTS = 8
TLS_HANDSHAKE_FLOOR = 1.0
KEY_PRUNE_MIN = 256  # prune a connection's finished transactions once it holds more keys than this


def partial_message_timeout(settings: Settings) -> float:
    """A started message must complete within 10 s, and never later than the idle timeout."""
    return min(PARTIAL_MESSAGE_TIMEOUT, settings.idle_timeout)


@dataclass
class Listener:
    transport: str
    bound: HostPort
    server: asyncio.AbstractServer | None = None
    udp: UdpSocket | None = None


@dataclass
class _Outbound:
    conn: StreamConnection
    keys: list[object] = field(default_factory=list)


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


UDP_BUFFER_BYTES = 8 * 1024 * 1024


def _grow_buffers(sock: socket.socket | None) -> None:
    """Large UDP socket buffers: at hundreds of calls per second a 200 KB default receive buffer
    overflows during a few milliseconds' pause, and every dropped datagram becomes a SIP
    retransmission (measured: 3,300 drops in 8 s at 850 calls/s). SO_RCVBUFFORCE works when the
    process may (CAP_NET_ADMIN); otherwise the kernel caps SO_RCVBUF at net.core.rmem_max, which
    deploy/install.sh raises."""
    if sock is None:
        return
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
    ):
        try:
            if force is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER_BYTES)


def guess_advertise(settings: Settings) -> str:
    """The address to put in Via/Record-Route when --advertise is not set."""
    if settings.advertise:
        return settings.advertise
    for hp in (*settings.udp, *settings.tcp, *settings.tls):
        if hp.host not in ("0.0.0.0", "::"):
            return hp.host
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    return "127.0.0.1"


class Tracer(Protocol):
    """Receives every SIP message the proxy receives ("in") or sends ("out"), decrypted."""

    def record(self, direction: str, transport: str, peer: tuple[str, int], data: bytes) -> None: ...


class ProxyServer:
    def __init__(self, settings: Settings, *, recorder: MetricsRecorder | None = None) -> None:
        self.settings = settings
        self._started_settings = settings
        self.recorder = recorder
        self.listeners: list[Listener] = []
        self.core: ProxyCore | None = None
        self.link: ClearIpLink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._udp_out: UdpSocket | None = None
        self._conns: dict[int, StreamConnection] = {}
        self._by_peer: dict[tuple[str, str, int], StreamConnection] = {}
        self._per_source: dict[str, int] = defaultdict(int)
        self._sweeper: asyncio.Task[None] | None = None
        self._dns: dict[str, str] = {}
        self._tls_client: ssl.SSLContext | None = None
        self._tls_server: ssl.SSLContext | None = None
        self.stopped = asyncio.Event()
        self.tracer: Tracer | None = None  # set at run time (trace on/off); None costs one check

    # ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        s = self.settings
        if s.tls:
            self._tls_server = tls.server_context(s.tls_cert, s.tls_key)
        for hp in s.udp:
            udp = self._udp_socket(hp.host, hp.port)
            self.listeners.append(Listener("udp", HostPort(hp.host, udp.sockname[1]), udp=udp))
        for name, hps, ctx in (("tcp", s.tcp, None), ("tls", s.tls, self._tls_server)):
            for hp in hps:
                srv = await loop.create_server(
                    lambda n=name: self._new_stream(n, outbound=False),  # type: ignore[misc,unused-ignore]
                    hp.host,
                    hp.port,
                    ssl=ctx,
                    reuse_address=True,
                    backlog=1024,
                    ssl_handshake_timeout=self._handshake_timeout(ctx),
                )
                port = srv.sockets[0].getsockname()[1]
                self.listeners.append(Listener(name, HostPort(hp.host, port), server=srv))
        bound = [lst.udp for lst in self.listeners if lst.udp is not None]
        self._udp_out = bound[0] if bound else self._udp_socket("0.0.0.0", 0)
        ports: dict[str, int] = {}
        for lst in self.listeners:
            ports.setdefault(lst.transport, lst.bound.port)
        advertise = guess_advertise(s)
        own = {advertise, "127.0.0.1", "localhost"}
        own.update(lst.bound.host for lst in self.listeners if lst.bound.host not in ("0.0.0.0", "::"))
        with contextlib.suppress(OSError):
            own.update(socket.gethostbyname_ex(socket.gethostname())[2])
        self.core = ProxyCore(
            s,
            self._send,
            advertise=advertise,
            ports=ports,
            own_hosts=own,
            recorder=self.recorder,
            need_link=self._need_link,
        )
        uri = s.clearip_uri
        use_tls = uri.transport == "tls"
        self._tls_client = tls.client_context(s.clearip_ca or None)
        self.link = ClearIpLink(
            self,
            host=uri.host,
            port=uri.port or uri.default_port,
            ssl_context=self._tls_client if use_tls else None,
            server_name=s.clearip_server_name or uri.host,
            keepalive_interval=s.keepalive_interval,
            reconnect_max=s.reconnect_max,
            max_size=s.max_message_size,
            on_state=self._clearip_state,
            on_connect_failed=self._clearip_connect_failed,
        )
        self.link.start()
        # Say "ready" once the first connection attempt to ClearIP has ended (bounded), so a call
        # placed right after start-up is not refused for a connection still being made.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.first_attempt_done.wait(), 6.0)
        self._sweeper = loop.create_task(self._sweep(), name="stream-sweeper")
        desc = ", ".join(f"{lst.transport}:{lst.bound}" for lst in self.listeners)
        log.info(
            "ready: listening on %s; advertising %s; ClearIP %s; core %s",
            desc,
            advertise,
            s.clearip,
            build_kind(),
        )

    def _udp_socket(self, host: str, port: int) -> UdpSocket:
        assert self._loop is not None
        sock = bound_socket(host, port)
        _grow_buffers(sock)
        return UdpSocket(
            sock,
            self._loop,
            self._on_datagram,
            max_size=self.settings.max_message_size,
            on_queue_delay=self._on_queue_delay,
            on_batch_done=self._after_batch,
        )

    def _handshake_timeout(self, ctx: ssl.SSLContext | None) -> float | None:
        """A TLS client that connects and never completes its handshake is not a connection the
        sweeper sees (asyncio calls connection_made after the handshake): bound it here."""
        if ctx is None:
            return None
        return min(TLS_HANDSHAKE_TIMEOUT, self.settings.idle_timeout)

    @property
    def ports(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lst in self.listeners:
            out.setdefault(lst.transport, lst.bound.port)
        return out

    async def drain(self, limit: float | None = None) -> None:
        """Stop taking new calls (OPTIONS and INVITEs get 503) and wait for calls in flight."""
        assert self.core is not None and self._loop is not None
        self.core.start_drain()
        deadline = self._loop.time() + (self.settings.drain_timeout if limit is None else limit)
        # The sans-I/O core has no event to await; polling every 50 ms only runs while draining.
        while self.core.in_flight and self._loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        left = self.core.abort_all(self._loop.time())
        self._kick()
        if left:
            log.warning("drain limit reached: %d call(s) still in progress answered 503", left)
        else:
            log.info("drained: no call in progress")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.link is not None:
            await self.link.stop()
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
            if lst.udp is not None:
                lst.udp.close()
        for conn in list(self._conns.values()):
            conn.close()
        if self._udp_out is not None:
            self._udp_out.close()
        for lst in self.listeners:
            if lst.server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(lst.server.wait_closed(), 1.0)
        if self._timer is not None:
            self._timer.cancel()
        self.stopped.set()

    # Settings read once when listeners, the ClearIP link and the metrics sink are made.
    RESTART_ONLY = RESTART_ONLY_FIELDS

    def reload(self, settings: Settings) -> list[str]:
        """Apply what can change without dropping calls; return what needs a restart.

        Restart-only fields keep their running values (so status shows what is in effect), and
        are compared with the values the proxy started with, so a pending restart stays reported."""
        started = self._started_settings
        needs_restart = [n for n in self.RESTART_ONLY if getattr(settings, n) != getattr(started, n)]
        effective = replace(settings, **{n: getattr(started, n) for n in self.RESTART_ONLY})
        self.settings = effective
        if self.core is not None:
            self.core.update_settings(effective)
        if self.link is not None:
            self.link.keepalive_interval = effective.keepalive_interval
            self.link.reconnect_max = effective.reconnect_max
        if self.recorder is not None:
            self.recorder.log_numbers = effective.log_numbers
        return needs_restart

    # ------------------------------------------------------------------------------------------
    # The core's timer
    # ------------------------------------------------------------------------------------------
    def _kick(self) -> None:
        core = self.core
        assert core is not None and self._loop is not None
        d = core.next_deadline()
        if d is None:
            return
        if self._timer is None or d < self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = d
            self._timer = self._loop.call_at(d, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        assert self.core is not None and self._loop is not None
        try:
            self.core.handle_timer(self._loop.time())
        except Exception as exc:  # the timer must be re-armed whatever happened
            contained.report("running the core's timers", exc)
        finally:
            self._kick()

    # ------------------------------------------------------------------------------------------
    # Inbound
    # ------------------------------------------------------------------------------------------
    def _after_batch(self) -> None:
        if self.core is not None and self._loop is not None:
            self._kick()

    def _on_queue_delay(self, delay: float) -> None:
        if self.core is not None and self._loop is not None:
            self.core.note_queue_delay(delay, self._loop.time())

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        """One datagram of a batch; the UDP socket calls :meth:`_kick` once the batch is read."""
        core = self.core
        if core is None or self._loop is None:
            return
        if len(data) <= 4 and not data.strip():
            return  # keep-alive CRLF over UDP
        if self.tracer is not None:
            self.tracer.record("in", "udp", addr, data)
        source = Target("udp", addr[0], addr[1])
        if len(data) > self.settings.max_message_size:
            # The stream framer enforces the cap on TCP/TLS; a datagram must not bypass it.
            if core.is_trusted(addr[0]):
                core.malformed(data, source, ParseError("message too large", 513), self._loop.time())
            elif self.recorder is not None:
                self.recorder.incr(names.UNTRUSTED_DROPPED)
            return
        try:
            core.receive(data, source, self._loop.time())
        except Exception as exc:  # a bug costs this datagram, never the listener or the timer
            contained.report("reading a udp message", exc, f" from {addr[0]}:{addr[1]}")

    def _new_stream(self, name: str, *, outbound: bool) -> StreamConnection:
        assert self._loop is not None
        return StreamConnection(
            self, name, outbound=outbound, max_size=self.settings.max_message_size, clock=self._loop.time
        )

    # StreamOwner protocol
    def stream_opened(self, conn: StreamConnection) -> bool:
        host = conn.peer[0]
        if conn.transport_name == CLEARIP or conn.outbound:
            return True  # ours: outbound connections were registered when we started them
        if not conn.outbound:
            core = self.core
            if core is None or not core.is_trusted(host):
                if self.recorder is not None:
                    self.recorder.incr(names.UNTRUSTED_DROPPED)
                return False
            if self._per_source[host] >= self.settings.max_connections_per_source:
                log.warning(
                    "refused connection from %s: over %d connections",
                    host,
                    self.settings.max_connections_per_source,
                )
                return False
        self._per_source[host] += 1
        self._conns[conn.conn_id] = conn
        self._by_peer[(conn.transport_name, host, conn.peer[1])] = conn
        return True

    def stream_message(self, conn: StreamConnection, data: bytes) -> None:
        core = self.core
        if core is None or self._loop is None:
            return
        if self.tracer is not None:
            self.tracer.record("in", conn.transport_name, conn.peer, data)
        source = Target(conn.transport_name, conn.peer[0], conn.peer[1], conn.conn_id)
        now = self._loop.time()
        try:  # an exception goes on to the connection, which contains it (logged once)
            ok = core.receive(data, source, now, trusted=conn.outbound)
        finally:
            self._kick()
        if not ok and conn.errors.spend(now) and conn.transport_name != CLEARIP:
            # A peer that keeps sending garbage on a stream is broken or hostile: stop reading.
            # Counted per window, so a long-lived trunk's occasional bad message never adds up.
            log.info(
                "closing %s connection from %s:%d: %d malformed messages within %.0f s",
                conn.transport_name,
                *conn.peer,
                conn.errors.limit,
                conn.errors.window,
            )
            conn.close()

    def stream_framing_error(self, conn: StreamConnection, exc: FramingError) -> None:
        core = self.core
        if core is None or self._loop is None:
            return
        log.info("closing %s connection from %s:%d: %s", conn.transport_name, *conn.peer, exc.reason)
        if exc.head and conn.transport_name != CLEARIP:
            source = Target(conn.transport_name, conn.peer[0], conn.peer[1], conn.conn_id)
            core.malformed(exc.head + b"\r\n\r\n", source, exc, self._loop.time())
        elif self.recorder is not None:
            self.recorder.incr(names.MALFORMED_MESSAGES)

    def stream_closed(self, conn: StreamConnection, exc: Exception | None) -> None:
        if self._conns.pop(conn.conn_id, None) is not None:
            host = conn.peer[0]
            self._per_source[host] -= 1
            if self._per_source[host] <= 0:
                del self._per_source[host]
            key = (conn.transport_name, host, conn.peer[1])
            if self._by_peer.get(key) is conn:
                del self._by_peer[key]
        if conn.transport_name == CLEARIP and self.link is not None:
            self.link.connection_lost()
        keys, conn.keys = conn.keys, set()
        if keys and self.core is not None and self._loop is not None:
            # Every transaction still waiting on this connection learns at once (a carrier's TCP
            # reset after its 180 ends that branch now, not at the ring limit); finished ones
            # are ignored by the core.
            now = self._loop.time()
            try:
                for k in keys:
                    self.core.transport_error(k, now)
            finally:
                self._kick()

    def _clearip_state(self, up: bool) -> None:
        if self.core is not None and self._loop is not None:
            try:
                self.core.set_clearip_up(up, self._loop.time())
            except Exception as exc:  # runs in the link's task: an escape would end the link
                contained.report("handling the ClearIP link going " + ("up" if up else "down"), exc)
            finally:
                self._kick()
            if up and self.recorder is not None and self.link is not None and self.link.reconnects:
                self.recorder.incr(names.CLEARIP_RECONNECTS)

    def _need_link(self) -> None:
        """The core holds a call for the ClearIP link: connect now (one attempt at a time)."""
        if self.link is not None:
            self.link.connect_now()

    def _clearip_connect_failed(self, error: str) -> None:
        """A connect to ClearIP failed: the calls held for it get 503 at once."""
        if self.core is not None and self._loop is not None:
            try:
                self.core.clearip_unreachable(self._loop.time(), error)
            except Exception as exc:  # runs in the link's task: an escape would end the link
                contained.report("failing the calls held for the ClearIP link", exc)
            finally:
                self._kick()

    async def _sweep(self) -> None:
        """Close idle connections and ones stuck mid-message (slow-loris)."""
        assert self._loop is not None
        while True:
            await asyncio.sleep(1.0)
            now = self._loop.time()
            core = self.core
            for conn in list(self._conns.values()):
                if conn.transport_name == CLEARIP:
                    continue
                if core is not None and len(conn.keys) > KEY_PRUNE_MIN:
                    # A long-lived trunk carries calls for days: forget finished transactions.
                    conn.keys = {k for k in conn.keys if core.client_alive(k)}
                partial_limit = partial_message_timeout(self.settings)
                if conn.partial_since is not None and now - conn.partial_since > partial_limit:
                    log.info("closing %s:%d: message not completed in %.1f s", *conn.peer, partial_limit)
                    conn.close()
                elif now - conn.last_activity > self.settings.idle_timeout:
                    conn.close()

    # ------------------------------------------------------------------------------------------
    # Outbound
    # ------------------------------------------------------------------------------------------
    def _send(self, target: Target, data: bytes, key: object) -> None:
        if self.tracer is not None:
            conn = self._conns.get(target.conn_id) if target.conn_id else None
            peer = conn.peer if conn is not None and not conn.closed else (target.host, target.port)
            self.tracer.record("out", target.transport, peer, data)
        self._transmit(target, data, key)

    def _transmit(self, target: Target, data: bytes, key: object) -> None:
        t = target.transport
        if not 0 < target.port < 65536:
            # Port 0 (or out of range) from a Contact: UDP's sendto "succeeds" and the kernel's
            # EINVAL only reaches error_received, so the call sat out `timeout`. Fail it now.
            log.info("cannot send to %s %s:%d: no such port", t, target.host, target.port)
            self._error_soon(key)
            return
        if t == "udp":
            if _is_ip(target.host):
                assert self._udp_out is not None
                try:
                    self._udp_out.sendto(data, (target.host, target.port))
                except (OSError, ValueError) as exc:  # e.g. an IPv6 address and an IPv4 socket
                    log.info("cannot send to udp %s:%d: %s", target.host, target.port, exc)
                    self._error_soon(key)
            else:
                self._resolve_then(target, data, key)
            return
        if t == CLEARIP:
            if self.link is None or not self.link.send(data):
                self._error_soon(key)
            return
        conn = self._conns.get(target.conn_id) if target.conn_id else None
        if conn is None or conn.closed:
            conn = self._by_peer.get((t, target.host, target.port))
        if conn is not None and not conn.closed:
            conn.write(data)
            if key is not None:
                conn.keys.add(key)
            return
        self._connect(target, data, key)

    def _error_soon(self, key: object) -> None:
        if key is None or self._loop is None:
            return

        def fire() -> None:
            if self.core is not None and self._loop is not None:
                self.core.transport_error(key, self._loop.time())
                self._kick()

        self._loop.call_soon(fire)

    def _resolve_then(self, target: Target, data: bytes, key: object) -> None:
        assert self._loop is not None
        cached = self._dns.get(target.host)
        if cached:
            self._transmit(Target(target.transport, cached, target.port, target.conn_id), data, key)
            return

        async def resolve() -> None:
            assert self._loop is not None
            try:
                infos = await self._loop.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM)
            except (OSError, ValueError):  # ValueError: UnicodeError for a label IDNA refuses
                self._error_soon(key)
                return
            addr = str(infos[0][4][0])
            if len(self._dns) > 1000:
                self._dns.clear()
            self._dns[target.host] = addr
            self._transmit(Target(target.transport, addr, target.port, target.conn_id), data, key)

        self._loop.create_task(resolve())

    def _connect(self, target: Target, data: bytes, key: object) -> None:
        assert self._loop is not None
        loop = self._loop
        conn = self._new_stream(target.transport, outbound=True)
        conn.pending.append(data)
        conn.peer = (target.host, target.port)
        # Register now so further sends to this peer queue on the same connection.
        self._conns[conn.conn_id] = conn
        self._by_peer[(target.transport, target.host, target.port)] = conn
        self._per_source[target.host] += 1
        if key is not None:
            conn.keys.add(key)
        ctx = self._tls_client if target.transport == "tls" else None

        async def connect() -> None:
            try:
                if ctx is None:
                    await asyncio.wait_for(
                        loop.create_connection(lambda: conn, target.host, target.port),
                        self.settings.timeout,
                    )
                else:
                    await self._connect_tls(conn, target, ctx)
            except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:  # ValueError: see resolve()
                log.info(
                    "cannot connect to %s %s:%d: %s",
                    target.transport,
                    target.host,
                    target.port,
                    f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                )
                conn.closed = True
                self.stream_closed(conn, exc)

        loop.create_task(connect())

    async def _connect_tls(self, conn: StreamConnection, target: Target, ctx: ssl.SSLContext) -> None:
        """TCP connect, then the TLS handshake bounded by a few connect round trips (see
        TLS_HANDSHAKE_RTTS): a tls Contact that is really a plain TCP listener fails in about a
        second instead of after `timeout`."""
        loop = self._loop
        assert loop is not None
        started = loop.time()
        deadline = started + self.settings.timeout
        infos = await asyncio.wait_for(
            loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), self.settings.timeout
        )
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            t0 = loop.time()
            await asyncio.wait_for(loop.sock_connect(sock, addr), max(0.001, deadline - t0))
            rtt = loop.time() - t0
            handshake = min(
                max(TLS_HANDSHAKE_FLOOR, TLS_HANDSHAKE_RTTS * rtt), max(0.001, deadline - loop.time())
            )
            await loop.create_connection(
                lambda: conn,
                sock=sock,
                ssl=ctx,
                server_hostname=target.host,
                ssl_handshake_timeout=handshake,
            )
        except BaseException:
            sock.close()
            raise

    # stream_opened for outbound connections is called from connection_made; peers were
    # registered in _connect, so only inbound ones are counted there.


__all__ = ["ParseError", "ProxyServer"]
