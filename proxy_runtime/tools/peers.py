"""Small asyncio SIP user agents for the demo, the tests and the ClearIP simulator.

- :class:`SipEndpoint`: the socket plumbing shared by every peer here: UDP, TCP and TLS listeners,
  outbound stream connections (reused per address), RFC 3261 §18.3 stream framing with
  :class:`~proxy_runtime.sip.framing.StreamFramer`, RFC 5626 CRLF keep-alive answers, 400 to what
  cannot be parsed. It hands each parsed message and where it came from to a callback.
- :class:`SimulatedCarrier`: a UAS that answers INVITEs by behaviour (answer, busy, unavailable,
  silent, ring forever, reject with any status) and records every request it receives.
- :class:`SimulatedSwitch`: a UAC that places a call through a proxy (INVITE with SDP, ACK, BYE over
  the route set, CANCEL), retransmitting over UDP per RFC 3261 timers A/B/E/F, and returns a
  :class:`CallResult`.

These are test tools, not the proxy: they are simple on purpose, but what they put on the wire is
well-formed SIP, so a real switch or SIPp sees nothing unusual.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.framing import PING, PONG, FramingError, StreamFramer
from proxy_runtime.sip.grammar import parse_name_addr, split_list
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message, try_parse_for_reply
from proxy_runtime.sip.uri import UriError, parse_uri

log = logging.getLogger(__name__)

Transport = Literal["udp", "tcp", "tls"]
Addr = tuple[str, int]

T1 = 0.5  # RFC 3261 §17.1.1.1 round-trip estimate
T2 = 4.0  # maximum retransmit interval for non-INVITE requests and INVITE responses
BRANCH_MAGIC = "z9hG4bK"


def _is_loose(route: str) -> bool:
    try:
        return parse_uri(parse_name_addr(route).uri).is_lr
    except (UriError, ParseError):
        return True


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


# ---------------------------------------------------------------------------------------------
# Socket plumbing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message came from, and how to answer it (the same connection for streams)."""

    transport: Transport
    addr: Addr
    conn: StreamConnection | None = None


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


# ---------------------------------------------------------------------------------------------
# SimulatedCarrier: a UAS
# ---------------------------------------------------------------------------------------------

CarrierBehaviour = str  # "answer" | "busy" | "unavailable" | "silent" | "ring" | "reject:<status>"
_BEHAVIOURS = ("answer", "busy", "unavailable", "silent", "ring")


def check_behaviour(b: str) -> str:
    if b in _BEHAVIOURS:
        return b
    if b.startswith("reject:") and b[7:].isdigit() and 300 <= int(b[7:]) <= 699:
        return b
    raise ValueError(f"unknown carrier behaviour {b!r} (one of {', '.join(_BEHAVIOURS)}, reject:NNN)")


@dataclass(slots=True)
class ReceivedRequest:
    request: SipRequest
    source: Source
    at: float

    @property
    def method(self) -> str:
        return self.request.method


@dataclass(slots=True)
class _UasInvite:
    request: SipRequest
    source: Source
    to_tag: str
    last: bytes = b""
    final: int = 0
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class SimulatedCarrier:
    """A carrier's SIP endpoint: answers INVITEs by behaviour, per called number or by default.

    ``numbers`` maps a called number (R-URI user, with or without ``+``) to a behaviour; other numbers
    get ``behaviour``. Every request received is kept in :attr:`received`; every status sent in
    :attr:`sent` (per Call-ID)."""

    def __init__(
        self,
        name: str = "carrier",
        *,
        behaviour: CarrierBehaviour = "answer",
        numbers: Mapping[str, CarrierBehaviour] | None = None,
        host: str = "127.0.0.1",
        ring_delay: float = 0.05,
        t1: float = T1,
    ) -> None:
        self.name = name
        self.behaviour = check_behaviour(behaviour)
        self.numbers = {k.lstrip("+"): check_behaviour(v) for k, v in (numbers or {}).items()}
        self.host = host
        self.ring_delay = ring_delay
        self.t1 = t1
        self.endpoint = SipEndpoint(self._on_message, name=name)
        self.received: list[ReceivedRequest] = []
        self.sent: dict[str, list[tuple[str, int]]] = {}  # Call-ID -> (CSeq method, status) sent
        self._invites: dict[str, _UasInvite] = {}  # by INVITE branch
        self._by_call: dict[str, _UasInvite] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, *, udp: bool = True, tcp: bool = True, port: int = 0) -> None:
        if udp:
            await self.endpoint.listen_udp(self.host, port)
        if tcp:
            await self.endpoint.listen_stream(self.host, port if not udp else 0)

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        await self.endpoint.close()

    async def __aenter__(self) -> SimulatedCarrier:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def address(self, transport: Transport = "udp") -> Addr:
        return self.endpoint.local_addr(transport)

    def uri(self, number: str = "{user}", transport: Transport = "udp") -> str:
        """A Contact URI for this carrier, e.g. for a simulator rule (``{user}`` kept as a template)."""
        host, port = self.address(transport)
        tp = "" if transport == "udp" else f";transport={transport}"
        return f"sip:{number}@{host}:{port}{tp}"

    def invites(self, call_id: str | None = None) -> list[SipRequest]:
        return [
            r.request
            for r in self.received
            if r.method == "INVITE" and (call_id is None or r.request.call_id == call_id)
        ]

    def requests(self, call_id: str | None = None) -> list[ReceivedRequest]:
        return [r for r in self.received if call_id is None or r.request.call_id == call_id]

    def invite_finals(self, call_id: str) -> list[int]:
        """Final statuses this carrier sent to INVITEs of that call."""
        return [st for m, st in self.sent.get(call_id, []) if m == "INVITE" and st >= 200]

    def behaviour_for(self, number: str) -> str:
        return self.numbers.get(number.lstrip("+"), self.behaviour)

    # --- protocol ----------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, inv: _UasInvite | None, src: Source, resp: SipResponse) -> bytes:
        via_with_rport(resp, src)
        data = resp.serialize()
        self.endpoint.reply(src, data)
        self.sent.setdefault(resp.call_id, []).append((resp.cseq[1], resp.status))
        if inv is not None:
            inv.last = data
            if resp.status >= 200:
                inv.final = resp.status
        return data

    def _on_message(self, msg: SipMessage, src: Source) -> None:
        if not isinstance(msg, SipRequest):
            return  # a UAS that sends no requests expects no responses
        self.received.append(ReceivedRequest(msg, src, time.monotonic()))
        method = msg.method
        if method == "INVITE":
            self._on_invite(msg, src)
        elif method == "ACK":
            inv = self._invites.get(msg.top_via.branch) or self._by_call.get(msg.call_id)
            if inv is not None:
                inv.acked.set()
        elif method == "CANCEL":
            inv = self._invites.get(msg.top_via.branch)
            if inv is None:
                self._send(None, src, make_response(msg, 481))
                return
            self._send(None, src, make_response(msg, 200))
            if not inv.final:
                if inv.task is not None:
                    inv.task.cancel()
                self._final(inv, 487)
        elif method == "BYE":
            known = msg.call_id in self._by_call
            self._send(None, src, make_response(msg, 200 if known else 481))
        elif method in ("OPTIONS", "INFO", "UPDATE", "NOTIFY", "PRACK"):
            self._send(None, src, make_response(msg, 200))
        else:
            self._send(
                None, src, make_response(msg, 405, extra=[("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS")])
            )

    def _on_invite(self, req: SipRequest, src: Source) -> None:
        branch = req.top_via.branch
        inv = self._invites.get(branch)
        if inv is not None:  # retransmission: the last response again
            if inv.last:
                self.endpoint.reply(src, inv.last)
            return
        if req.to_tag:  # re-INVITE in a dialog: accept with the same SDP
            dlg = self._by_call.get(req.call_id)
            inv = _UasInvite(req, src, dlg.to_tag if dlg else new_tag())
            self._invites[branch] = inv
            self._final(inv, 200)
            return
        inv = _UasInvite(req, src, new_tag())
        self._invites[branch] = inv
        self._by_call[req.call_id] = inv
        behaviour = self.behaviour_for(uri_user(req.uri))
        self._send(inv, src, make_response(req, 100))
        if behaviour == "silent":
            return
        inv.task = asyncio.get_running_loop().create_task(self._answer(inv, behaviour))
        self._tasks.add(inv.task)
        inv.task.add_done_callback(self._tasks.discard)

    async def _answer(self, inv: _UasInvite, behaviour: str) -> None:
        if behaviour in ("answer", "ring"):
            self._send(inv, inv.source, make_response(inv.request, 180, to_tag=inv.to_tag))
            if behaviour == "ring":
                return  # rings until CANCEL
            await asyncio.sleep(self.ring_delay)
            self._final(inv, 200)
        elif behaviour == "busy":
            self._final(inv, 486, "Busy Here")
        elif behaviour == "unavailable":
            self._final(inv, 503)
        else:
            status = int(behaviour.split(":", 1)[1])
            self._final(inv, status, "Temporarily Unavailable" if status == 480 else None)

    def _final(self, inv: _UasInvite, status: int, reason: str | None = None) -> None:
        extra: list[tuple[str, str]] = []
        body = b""
        if status == 200:
            t = inv.source.transport
            host, port = self.endpoint.local_addr(t)
            tp = "" if t == "udp" else f";transport={t}"
            extra = [("Contact", f"<sip:{self.name}@{host}:{port}{tp}>"), ("Content-Type", "application/sdp")]
            rr = inv.request.get_all("record-route")
            extra = [("Record-Route", v) for v in rr] + extra
            body = sdp_body(host, 40000, self.name)
        resp = make_response(inv.request, status, reason, to_tag=inv.to_tag, extra=extra, body=body)
        data = self._send(inv, inv.source, resp)
        if inv.source.transport == "udp":
            self._spawn(self._retransmit_final(inv, data))

    async def _retransmit_final(self, inv: _UasInvite, data: bytes) -> None:
        """Timer G (non-2xx) / RFC 3261 §13.3.1.4 (2xx): resend until ACK, for 64*T1 at most."""
        interval = self.t1
        deadline = time.monotonic() + 64 * self.t1
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(inv.acked.wait(), interval)
                return
            except TimeoutError:
                self.endpoint.reply(inv.source, data)
                interval = min(interval * 2, T2)


# ---------------------------------------------------------------------------------------------
# SimulatedSwitch: a UAC
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CallResult:
    """What happened to one call placed by :meth:`SimulatedSwitch.call`."""

    number: str
    call_id: str
    status: int | None = None  # final status; None when none came
    reason: str = ""
    final: SipResponse | None = None
    provisionals: list[int] = field(default_factory=list)
    elapsed: float = 0.0  # seconds from the INVITE to the final response (or to giving up)
    answered: bool = False
    torn_down: bool = False  # BYE sent through the route set and answered 200
    bye_status: int | None = None
    cancelled: bool = False
    cancel_status: int | None = None
    error: str = ""

    @property
    def headers(self) -> list[tuple[str, str]]:
        return list(self.final.iter_headers()) if self.final is not None else []

    def header(self, name: str) -> str | None:
        return self.final.get(name) if self.final is not None else None

    @property
    def clean(self) -> bool:
        """Answered and torn down cleanly, or ended by a final failure response."""
        return (self.answered and self.torn_down) or (self.status is not None and self.status >= 300)


class _ClientTx:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[SipResponse] = asyncio.Queue()


class SimulatedSwitch:
    """A carrier switch placing calls: ``await switch.call("+12125551234", proxy_addr, "udp")``."""

    _counter = itertools.count(1)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        from_number: str = "+13035550100",
        t1: float = T1,
        name: str = "switch",
    ) -> None:
        self.host = host
        self.from_number = from_number
        self.t1 = t1
        self.name = name
        self.endpoint = SipEndpoint(self._on_message, name=name)
        self.received: list[ReceivedRequest] = []
        self._txs: dict[tuple[str, str], _ClientTx] = {}
        self._acks: dict[str, tuple[bytes, Transport, Addr]] = {}  # INVITE branch -> ACK to resend

    async def start(self, *, udp: bool = True, tcp: bool = True) -> None:
        if udp:
            await self.endpoint.listen_udp(self.host, 0)
        if tcp:
            await self.endpoint.listen_stream(self.host, 0)

    async def stop(self) -> None:
        await self.endpoint.close()

    async def __aenter__(self) -> SimulatedSwitch:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- receiving ---------------------------------------------------------------------------
    def _on_message(self, msg: SipMessage, src: Source) -> None:
        if isinstance(msg, SipResponse):
            try:
                key = (msg.top_via.branch, msg.cseq[1])
            except ParseError:
                return
            tx = self._txs.get(key)
            if tx is not None:
                tx.queue.put_nowait(msg)
            elif msg.cseq[1] == "INVITE" and msg.status >= 200 and key[0] in self._acks:
                data, transport, addr = self._acks[key[0]]  # a retransmitted final: ACK again
                asyncio.get_running_loop().create_task(self._send_quiet(data, transport, addr))
            return
        assert isinstance(msg, SipRequest)
        self.received.append(ReceivedRequest(msg, src, time.monotonic()))
        if msg.method == "ACK":
            return
        if msg.method in ("BYE", "OPTIONS", "INFO", "UPDATE", "NOTIFY"):
            resp = make_response(msg, 200)
        else:
            resp = make_response(msg, 405, extra=[("Allow", "ACK, BYE, OPTIONS")])
        via_with_rport(resp, src)
        self.endpoint.reply(src, resp)

    async def _send_quiet(self, data: bytes, transport: Transport, addr: Addr) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            await self.endpoint.send(data, transport, addr)

    # --- building requests -------------------------------------------------------------------
    def _via(self, transport: Transport, branch: str) -> str:
        host, port = self.endpoint.local_addr(transport)
        return f"SIP/2.0/{transport.upper()} {host}:{port};branch={branch};rport"

    def _contact(self, transport: Transport) -> str:
        host, port = self.endpoint.local_addr(transport)
        tp = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{self.name}@{host}:{port}{tp}>"

    def _request(
        self,
        method: str,
        uri: str,
        transport: Transport,
        branch: str,
        *,
        from_: str,
        to: str,
        call_id: str,
        cseq: int,
        routes: Sequence[str] = (),
        extra: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> SipRequest:
        req = SipRequest(method, uri)
        req.add("Via", self._via(transport, branch))
        req.add("Max-Forwards", "70")
        for r in routes:
            req.add("Route", r)
        req.add("From", from_)
        req.add("To", to)
        req.add("Call-ID", call_id)
        req.add("CSeq", f"{cseq} {method}")
        if method in ("INVITE",):
            req.add("Contact", self._contact(transport))
            req.add("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS")
        req.add("User-Agent", "clearip-proxy-simulated-switch")
        for name, value in extra:
            req.add(name, value)
        if body:
            req.add("Content-Type", "application/sdp")
        req.add("Content-Length", str(len(body)))
        req.body = body
        return req

    # --- transactions ------------------------------------------------------------------------
    async def _non_invite(
        self, req: SipRequest, transport: Transport, addr: Addr, time_limit: float
    ) -> SipResponse | None:
        """A non-INVITE client transaction (timers E and F); the final response or None."""
        key = (req.top_via.branch, req.method)
        tx = self._txs[key] = _ClientTx()
        data = req.serialize()
        try:
            await self.endpoint.send(data, transport, addr)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(time_limit, 64 * self.t1)
            interval = self.t1
            next_retx = loop.time() + interval
            while True:
                now = loop.time()
                if now >= deadline:
                    return None
                wait = min(deadline, next_retx) - now if transport == "udp" else deadline - now
                try:
                    resp = await asyncio.wait_for(tx.queue.get(), max(wait, 0.0))
                except TimeoutError:
                    if transport == "udp" and loop.time() >= next_retx:
                        await self.endpoint.send(data, transport, addr)
                        interval = min(interval * 2, T2)
                        next_retx = loop.time() + interval
                    continue
                if resp.status >= 200:
                    return resp
                interval = T2  # a provisional: keep retransmitting at T2
        except (OSError, ConnectionError) as exc:
            log.info("%s: %s failed: %s", self.name, req.method, exc)
            return None
        finally:
            self._txs.pop(key, None)

    async def options(
        self, target: Addr, transport: Transport = "udp", time_limit: float = 5.0
    ) -> SipResponse | None:
        host, port = target
        uri = f"sip:{host}:{port}" + ("" if transport == "udp" else f";transport={transport}")
        req = self._request(
            "OPTIONS",
            uri,
            transport,
            new_branch(),
            from_=f"<sip:{self.name}@{self.host}>;tag={new_tag()}",
            to=f"<{uri}>",
            call_id=f"{secrets.token_hex(8)}@{self.host}",
            cseq=1,
        )
        return await self._non_invite(req, transport, target, time_limit)

    async def call(
        self,
        to_number: str,
        proxy: Addr,
        transport: Transport = "udp",
        *,
        domain: str | None = None,
        from_number: str | None = None,
        extra_headers: Iterable[tuple[str, str]] = (),
        cancel_after: float | None = None,
        hold: float = 0.05,
        time_limit: float = 40.0,
        bye: bool = True,
    ) -> CallResult:
        """Place a call to ``to_number`` through ``proxy`` and, when answered, hang it up.

        ``domain`` is the Request-URI host (default: the proxy's address). ``cancel_after`` sends a
        CANCEL when no final came within that many seconds. ``time_limit`` bounds the wait for the
        final response (Timer B is 64*T1 over UDP; over TCP only ``time_limit`` applies).
        """
        loop = asyncio.get_running_loop()
        host, port = proxy
        dom = domain or f"{host}:{port}"
        ruri = f"sip:{to_number}@{dom}"
        from_num = from_number or self.from_number
        seq = next(self._counter)
        call_id = f"{secrets.token_hex(10)}-{seq}@{self.host}"
        from_hdr = f'"Switch" <sip:{from_num}@{self.host}>;tag={new_tag()}'
        to_hdr = f"<sip:{to_number}@{dom}>"
        result = CallResult(to_number, call_id)
        if transport != "udp":
            try:  # connect first: without a listener of that kind, Via names the connection's address
                await self.endpoint.connect(transport, proxy)
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                result.error = f"connect failed: {exc}"
                return result
        branch = new_branch()
        try:
            sdp_host = self.endpoint.local_addr(transport)[0]
        except ConnectionError:
            sdp_host = self.host
        invite = self._request(
            "INVITE",
            ruri,
            transport,
            branch,
            from_=from_hdr,
            to=to_hdr,
            call_id=call_id,
            cseq=1,
            extra=extra_headers,
            body=sdp_body(sdp_host, 30000, "switch"),
        )
        key = (branch, "INVITE")
        tx = self._txs[key] = _ClientTx()
        data = invite.serialize()
        start = loop.time()
        final: SipResponse | None = None
        try:
            try:
                await self.endpoint.send(data, transport, proxy)
            except (OSError, ConnectionError) as exc:
                result.error = f"send failed: {exc}"
                result.elapsed = loop.time() - start
                return result
            interval = self.t1
            next_retx: float | None = start + interval if transport == "udp" else None
            deadline = start + (min(time_limit, 64 * self.t1) if transport == "udp" else time_limit)
            cancel_at = start + cancel_after if cancel_after is not None else None
            cancel_task: asyncio.Task[SipResponse | None] | None = None
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                wake = min(t for t in (deadline, next_retx, cancel_at) if t is not None)
                try:
                    resp = await asyncio.wait_for(tx.queue.get(), max(wake - now, 0.0))
                except TimeoutError:
                    now = loop.time()
                    if next_retx is not None and now >= next_retx:
                        await self._send_quiet(data, transport, proxy)
                        interval *= 2
                        next_retx = now + interval
                    if cancel_at is not None and now >= cancel_at:
                        cancel_at = None
                        result.cancelled = True
                        cancel = self._request(
                            "CANCEL",
                            ruri,
                            transport,
                            branch,
                            from_=from_hdr,
                            to=to_hdr,
                            call_id=call_id,
                            cseq=1,
                        )
                        cancel.headers = [h for h in cancel.headers if h[0] != "user-agent"]
                        cancel_task = loop.create_task(
                            self._non_invite(cancel, transport, proxy, 32 * self.t1)
                        )
                        deadline = max(deadline, now + 64 * self.t1)
                    continue
                if resp.status < 200:
                    result.provisionals.append(resp.status)
                    next_retx = None  # Timer A stops on a provisional
                    continue
                final = resp
                break
            result.elapsed = loop.time() - start
            if cancel_task is not None:
                cresp = await cancel_task
                result.cancel_status = cresp.status if cresp else None
            if final is None:
                result.error = "no final response"
                return result
            result.status, result.reason, result.final = final.status, final.reason, final
            if final.status >= 300:
                # ACK for a non-2xx final: same branch, To with the response's tag (RFC 3261 §17.1.1.3).
                ack = self._request(
                    "ACK",
                    ruri,
                    transport,
                    branch,
                    from_=from_hdr,
                    to=final.get("to") or to_hdr,
                    call_id=call_id,
                    cseq=1,
                )
                ack_data = ack.serialize()
                self._remember_ack(branch, ack_data, transport, proxy)
                await self._send_quiet(ack_data, transport, proxy)
                return result
            if 200 <= final.status < 300:
                result.answered = True
                await self._dialog(result, final, invite, transport, proxy, from_hdr, hold, bye)
            return result
        finally:
            self._txs.pop(key, None)

    def _remember_ack(self, branch: str, data: bytes, transport: Transport, addr: Addr) -> None:
        if transport != "udp":
            return
        self._acks[branch] = (data, transport, addr)
        asyncio.get_running_loop().call_later(64 * self.t1, self._acks.pop, branch, None)

    async def _dialog(
        self,
        result: CallResult,
        ok: SipResponse,
        invite: SipRequest,
        transport: Transport,
        proxy: Addr,
        from_hdr: str,
        hold: float,
        bye: bool,
    ) -> None:
        """ACK the 2xx (new branch, through the route set), then BYE after ``hold`` seconds."""
        routes = list(reversed(ok.values("record-route")))
        contact = ok.first_value("contact")
        remote_target = parse_name_addr(contact).uri if contact else invite.uri
        to_hdr = ok.get("to") or ""
        if routes and _is_loose(routes[0]):
            ruri, route_hdrs = remote_target, routes
            next_hop = parse_name_addr(routes[0]).uri
        elif routes:  # strict router (RFC 3261 §12.2.1.1)
            ruri = parse_name_addr(routes[0]).uri
            route_hdrs = [*routes[1:], f"<{remote_target}>"]
            next_hop = ruri
        else:
            ruri, route_hdrs, next_hop = remote_target, [], remote_target
        try:
            hop_transport, hop_addr = uri_target(next_hop, transport)
        except UriError:
            hop_transport, hop_addr = transport, proxy
        ack = self._request(
            "ACK",
            ruri,
            hop_transport,
            new_branch(),
            from_=from_hdr,
            to=to_hdr,
            call_id=invite.call_id,
            cseq=1,
            routes=route_hdrs,
        )
        ack_data = ack.serialize()
        self._remember_ack(invite.top_via.branch, ack_data, hop_transport, hop_addr)
        try:
            await self.endpoint.send(ack_data, hop_transport, hop_addr)
        except (OSError, ConnectionError) as exc:
            result.error = f"ACK failed: {exc}"
            return
        if not bye:
            return
        await asyncio.sleep(hold)
        bye_req = self._request(
            "BYE",
            ruri,
            hop_transport,
            new_branch(),
            from_=from_hdr,
            to=to_hdr,
            call_id=invite.call_id,
            cseq=2,
            routes=route_hdrs,
        )
        resp = await self._non_invite(bye_req, hop_transport, hop_addr, 64 * self.t1)
        result.bye_status = resp.status if resp else None
        result.torn_down = resp is not None and resp.status == 200
        if resp is None:
            result.error = "BYE not answered"
