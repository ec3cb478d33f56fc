"""The socket plumbing of the simulated SIP peers (:mod:`proxy_runtime.tools.carrier`,
:mod:`proxy_runtime.tools.switch`) and of the ClearIP simulator.

:class:`SipEndpoint`: UDP, TCP and TLS listeners, outbound stream connections (reused per address),
RFC 3261 §18.3 stream framing with :class:`~proxy_runtime.sip.framing.StreamFramer`, RFC 5626 CRLF
keep-alive answers, 400 to what cannot be parsed. It hands each parsed message and where it came
from (:class:`Source`) to a callback. Beside it, the small helpers every peer shares: branch and tag
ids, URI targets, RFC 3581 ``rport`` in responses, an SDP offer.

These are test tools, not the proxy: they are simple on purpose, but what they put on the wire is
well-formed SIP, so a real switch or SIPp sees nothing unusual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Self, cast

from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.framing import PING, PONG, FramingError, StreamFramer
from proxy_runtime.sip.grammar import split_list
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message, try_parse_for_reply
from proxy_runtime.sip.uri import UriError, parse_uri

log = logging.getLogger(__name__)

Transport = Literal["udp", "tcp", "tls"]
Addr = tuple[str, int]

T1 = 0.5  # RFC 3261 §17.1.1.1 round-trip estimate
T2 = 4.0  # maximum retransmit interval for non-INVITE requests and INVITE responses
BRANCH_MAGIC = "z9hG4bK"


def new_branch() -> str:
    return BRANCH_MAGIC + secrets.token_hex(8)


def new_tag() -> str:
    return secrets.token_hex(6)


def uri_user(uri: str) -> str:
    """The user part of a SIP URI without user parameters (``+1212...;npdi`` -> ``+1212...``)."""
    try:
        user = parse_uri(uri).user_unescaped or ""
    except UriError:
        return ""
    return user.split(";", 1)[0]


def uri_target(uri: str, default_transport: Transport = "udp") -> tuple[Transport, Addr]:
    """Where to send a request for this URI: its transport and host:port (RFC 3263 without DNS)."""
    u = parse_uri(uri)
    t = u.params.get("transport")
    transport: Transport
    if u.scheme == "sips" or (t or "").lower() == "tls":
        transport = "tls"
    elif (t or "").lower() == "tcp":
        transport = "tcp"
    elif (t or "").lower() == "udp":
        transport = "udp"
    else:
        transport = default_transport
    port = u.port if u.port is not None else (5061 if transport == "tls" else 5060)
    return transport, (u.host, port)


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message came from, and how to answer it (the same connection for streams)."""

    transport: Transport
    addr: Addr
    conn: StreamConnection | None = None


@dataclass(slots=True)
class ReceivedRequest:
    """A request a peer received: what, from where, when (``time.monotonic()``)."""

    request: SipRequest
    source: Source
    at: float

    @property
    def method(self) -> str:
        return self.request.method


MessageHandler = Callable[[SipMessage, Source], None]


class StreamConnection:
    """One TCP or TLS connection: a reader task that frames messages, and a writer."""

    def __init__(
        self,
        endpoint: SipEndpoint,
        transport: Transport,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.endpoint = endpoint
        self.transport = transport
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer: Addr = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self.closed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def _read_loop(self) -> None:
        framer = StreamFramer(self.endpoint.max_size)
        src = Source(self.transport, self.peer, self)
        try:
            while True:
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                framer.feed(chunk)
                while True:
                    try:
                        frame = framer.next_frame()
                    except FramingError as exc:
                        log.warning("%s: framing lost from %s: %s", self.endpoint.name, self.peer, exc)
                        if exc.head:
                            self.endpoint.reject_unparsable(exc.head + b"\r\n\r\n", src, exc.status_hint)
                        return
                    if frame is None:
                        break
                    if frame == PING:
                        self.write(PONG)
                        continue
                    self.endpoint.deliver(frame, src, datagram=False)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            self.endpoint.forget(self)
            with contextlib.suppress(Exception):
                self.writer.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: SipEndpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport (CPython 3.11).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not data.strip(b"\r\n\x00 "):
            return  # keep-alive
        self.endpoint.deliver(data, Source("udp", (str(addr[0]), int(addr[1]))), datagram=True)

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: UDP error %s", self.endpoint.name, exc)


class SipEndpoint:
    """Listeners and connections of one SIP peer; parsed messages go to ``handler``."""

    def __init__(self, handler: MessageHandler, *, name: str = "peer", max_size: int = 65535) -> None:
        self.handler = handler
        self.name = name
        self.max_size = max_size
        self.udp: _UdpProtocol | None = None
        self.udp_addr: Addr | None = None
        self.tcp_addr: Addr | None = None
        self.tls_addr: Addr | None = None
        self.listen_addrs: dict[Transport, list[Addr]] = {"udp": [], "tcp": [], "tls": []}
        self._udp_transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.Server] = []
        self._conns: set[StreamConnection] = set()
        self._outbound: dict[tuple[Transport, Addr], StreamConnection] = {}
        self._client_ssl: ssl.SSLContext | None = None
        self.accepted = asyncio.Event()  # set when a stream listener accepted a connection

    @property
    def connections(self) -> int:
        """Stream connections open now (accepted and outbound)."""
        return len(self._conns)

    # --- listening ---------------------------------------------------------------------------
    async def listen_udp(self, host: str, port: int) -> Addr:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, port)
        )
        self._udp_transports.append(transport)
        sock = transport.get_extra_info("sockname")
        addr: Addr = (str(sock[0]), int(sock[1]))
        if self.udp is None:
            self.udp = proto
            self.udp_addr = addr
        self.listen_addrs["udp"].append(addr)
        return addr

    async def listen_stream(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> Addr:
        transport: Transport = "tls" if ssl_context is not None else "tcp"

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = StreamConnection(self, transport, reader, writer)
            self._conns.add(conn)
            self.accepted.set()
            conn.start()

        server = await asyncio.start_server(on_client, host, port, ssl=ssl_context)
        self._servers.append(server)
        sock = server.sockets[0].getsockname()
        addr: Addr = (str(sock[0]), int(sock[1]))
        if transport == "tls":
            self.tls_addr = self.tls_addr or addr
        else:
            self.tcp_addr = self.tcp_addr or addr
        self.listen_addrs[transport].append(addr)
        return addr

    def set_client_ssl(self, context: ssl.SSLContext) -> None:
        self._client_ssl = context

    # --- receiving ---------------------------------------------------------------------------
    def deliver(self, data: bytes, src: Source, *, datagram: bool) -> None:
        try:
            msg = parse_message(data, datagram=datagram)
        except ParseError as exc:
            log.info("%s: unparsable message from %s: %s", self.name, src.addr, exc.reason)
            self.reject_unparsable(data, src, exc.status_hint)
            return
        try:
            self.handler(msg, src)
        except Exception:  # a peer's bug must not kill the socket
            log.exception("%s: error handling %r", self.name, msg)

    def reject_unparsable(self, data: bytes, src: Source, status: int) -> None:
        req = try_parse_for_reply(data)
        if req is not None:
            self.reply(src, make_response(req, status if status >= 400 else 400))

    def forget(self, conn: StreamConnection) -> None:
        self._conns.discard(conn)
        for key, c in list(self._outbound.items()):
            if c is conn:
                del self._outbound[key]

    # --- sending -----------------------------------------------------------------------------
    def reply(self, src: Source, msg: SipMessage | bytes) -> None:
        """Send to where ``src`` came from: the same connection, or the UDP address (rport)."""
        data = msg if isinstance(msg, bytes) else msg.serialize()
        if src.conn is not None:
            src.conn.write(data)
        elif self.udp is not None and self.udp.transport is not None:
            self.udp.transport.sendto(data, src.addr)

    async def resend_until_acked(self, src: Source, data: bytes, acked: asyncio.Event, t1: float) -> None:
        """A final response over UDP (RFC 3261 Timer G, and §13.3.1.4 for a 2xx): resend ``data`` at
        T1, 2*T1, ... (at most T2 apart) until ``acked`` is set, giving up after 64*T1 (Timer H)."""
        interval = t1
        deadline = time.monotonic() + 64 * t1
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(acked.wait(), interval)
                return
            except TimeoutError:
                self.reply(src, data)
                interval = min(interval * 2, T2)

    async def send(self, msg: SipMessage | bytes, transport: Transport, addr: Addr) -> Source:
        """Send to an address; streams reuse an open connection to it or open one."""
        data = msg if isinstance(msg, bytes) else msg.serialize()
        if transport == "udp":
            if self.udp is None or self.udp.transport is None:
                raise ConnectionError(f"{self.name}: no UDP socket")
            self.udp.transport.sendto(data, addr)
            return Source("udp", addr)
        conn = await self.connect(transport, addr)
        conn.write(data)
        return Source(transport, addr, conn)

    async def connect(self, transport: Transport, addr: Addr) -> StreamConnection:
        key = (transport, addr)
        conn = self._outbound.get(key)
        if conn is not None and not conn.closed.is_set():
            return conn
        ctx: ssl.SSLContext | None = None
        if transport == "tls":
            ctx = self._client_ssl or ssl.create_default_context()
        reader, writer = await asyncio.open_connection(addr[0], addr[1], ssl=ctx)
        conn = StreamConnection(self, transport, reader, writer)
        self._conns.add(conn)
        self._outbound[key] = conn
        conn.start()
        return conn

    def local_addr(self, transport: Transport) -> Addr:
        addr = {"udp": self.udp_addr, "tcp": self.tcp_addr, "tls": self.tls_addr}[transport]
        if addr is None:
            # No listener of that kind: the address of an outbound connection will do for Via.
            for (t, _), conn in self._outbound.items():
                if t == transport:
                    sock = conn.writer.get_extra_info("sockname")
                    return str(sock[0]), int(sock[1])
            raise ConnectionError(f"{self.name}: no {transport.upper()} listener")
        return addr

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            await conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for t in self._udp_transports:
            t.close()
        self._servers.clear()
        self._udp_transports.clear()
        self._conns.clear()
        self._outbound.clear()
        self.udp = None


class Peer(ABC):
    """What the simulated peers share: ``async with peer:`` starts it with its defaults, then stops it."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def via_with_rport(resp: SipResponse, src: Source) -> None:
    """RFC 3581: fill ``received``/``rport`` in the top Via of a response when the request asked."""
    for i, h in enumerate(resp.headers):
        if h[0] != "via":
            continue
        values = split_list(h[2])
        if not values:
            return
        first = values[0]
        parts = first.split(";")
        changed = False
        out = [parts[0]]
        has_received = False
        for p in parts[1:]:
            k = p.split("=", 1)[0].strip().lower()
            if k == "rport" and "=" not in p:
                out.append(f"rport={src.addr[1]}")
                changed = True
            else:
                out.append(p)
            has_received = has_received or k == "received"
        if changed and not has_received:
            out.append(f"received={src.addr[0]}")
        if changed:
            values[0] = ";".join(out)
            resp.headers[i] = [h[0], h[1], ", ".join(values)]  # entries are replaced, never edited
        return


async def cancel_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel background tasks and wait until each has ended (whatever it raised)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def sdp_body(host: str, port: int, session: str) -> bytes:
    sid = int(time.time())
    return (
        f"v=0\r\no={session} {sid} {sid} IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
    ).encode()
