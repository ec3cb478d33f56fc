"""Fault-injection peers for the fault and hostile-input tests (real sockets on 127.0.0.1).

- :class:`ClearIpStub`: a ClearIP stand-in (TCP or TLS) that can answer 302/any status, answer late,
  stay silent, reset its connections (RST) and stop/restart listening; it counts INVITEs per Call-ID.
- :class:`UdpUa`: a small SIP user agent over UDP with real RFC 3261 retransmissions, usable as the
  switch (UAC: INVITE, ACK, BYE) or as a carrier (UAS: answer, 503, silent, ring).
- :class:`LossyUdpRelay`: a seeded UDP relay that drops a share of datagrams in each direction.
- :func:`start_proxy`: the proxy process with extra environment variables.
- :func:`make_bad_certs`: a wrong-name and a self-signed certificate for the ClearIP TLS checks.

Every peer is a thread with bounded waits and a ``close()``; register them with ``lab.add_closer``.
A peer never swallows its own failures: an exception in its thread (a message it cannot parse, a
bug in its state machine) is recorded in ``peer.errors`` with its traceback, and the integration
conftest fails the test that created the peer (see :class:`PeerErrors`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import re
import socket
import ssl
import struct
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tests.integration.harness import HOST, Lab, ProxyProcess, SipMessage, free_port, split_stream

# ---------------------------------------------------------------------------------------------
# Peer errors
# ---------------------------------------------------------------------------------------------


class PeerErrors:
    """What every peer here inherits: its own failures, kept instead of swallowed.

    A peer's thread catches what it raises (so one bad message does not kill the peer and hang the
    test), records it with :meth:`_record`, and carries on. Every peer created is listed in
    ``PeerErrors.created``; the integration conftest's autouse fixture takes that list after each
    test and fails the test with every recorded error, traceback included.
    """

    created: ClassVar[list[PeerErrors]] = []

    def _init_errors(self, name: str) -> None:
        self.errors: list[str] = []
        self.peer_name = name
        PeerErrors.created.append(self)

    def _record(self, where: str) -> None:
        """Record the exception being handled (call from an ``except`` block)."""
        self.errors.append(
            f"{type(self).__name__} {self.peer_name!r} failed in {where}:\n{traceback.format_exc()}"
        )

    @classmethod
    def take_created(cls) -> list[PeerErrors]:
        out, cls.created = cls.created, []
        return out


# ---------------------------------------------------------------------------------------------
# Message helpers
# ---------------------------------------------------------------------------------------------


def _crlf(text: str) -> bytes:
    head, sep, body = text.partition("\n\n")
    lines = [ln.strip() for ln in head.strip("\n").split("\n")]
    head_b = "\r\n".join(ln for ln in lines if ln).encode()
    body_b = body.replace("\n", "\r\n").encode() if sep else b""
    head_b = head_b.replace(b"Content-Length: {len}", b"Content-Length: %d" % len(body_b))
    return head_b + b"\r\n\r\n" + body_b


def response_for(
    req: SipMessage, status: int, reason: str, *, to_tag: str | None = None, extra: str = ""
) -> bytes:
    """A response to ``req`` (all its Vias, From, To (+tag), Call-ID, CSeq)."""
    vias = "".join(f"Via: {v}\r\n" for v in req.all("via"))
    to = req.get("to") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    return (
        f"SIP/2.0 {status} {reason}\r\n{vias}From: {req.get('from')}\r\nTo: {to}\r\n"
        f"Call-ID: {req.call_id}\r\nCSeq: {req.get('cseq')}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def top_branch(msg: SipMessage) -> str:
    via = msg.get("via") or ""
    m = re.search(r";\s*branch=([^;,\s]+)", via)
    return m.group(1) if m else ""


SDP = "v=0\no=sw 1 1 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 4000 RTP/AVP 0\n"


def invite_bytes(
    *,
    call_id: str,
    local_port: int,
    proxy_port: int,
    number: str = "+15555550100",
    transport: str = "UDP",
    branch: str | None = None,
    max_forwards: int = 70,
    extra: str = "",
    from_tag: str = "sw1",
) -> bytes:
    branch = branch or "z9hG4bK" + uuid.uuid4().hex[:16]
    return _crlf(
        f"""INVITE sip:{number}@acme.sip.clearip.com SIP/2.0
        Via: SIP/2.0/{transport} {HOST}:{local_port};branch={branch};rport
        Max-Forwards: {max_forwards}
        From: <sip:+12025550100@{HOST}:{local_port}>;tag={from_tag}
        To: <sip:{number}@acme.sip.clearip.com>
        Call-ID: {call_id}
        CSeq: 1 INVITE
        Contact: <sip:switch@{HOST}:{local_port}>
        {extra}
        Content-Type: application/sdp
        Content-Length: {{len}}

{SDP}"""
    )


def simple_request(
    method: str,
    *,
    local_port: int,
    ruri: str,
    call_id: str | None = None,
    transport: str = "UDP",
    branch: str | None = None,
    to_tag: str | None = None,
    cseq: int = 1,
    max_forwards: int = 70,
    extra: str = "",
) -> bytes:
    branch = branch or "z9hG4bK" + uuid.uuid4().hex[:16]
    call_id = call_id or uuid.uuid4().hex
    to = f"<{ruri}>" + (f";tag={to_tag}" if to_tag else "")
    return _crlf(
        f"""{method} {ruri} SIP/2.0
        Via: SIP/2.0/{transport} {HOST}:{local_port};branch={branch};rport
        Max-Forwards: {max_forwards}
        From: <sip:+12025550100@{HOST}:{local_port}>;tag=h0st1le
        To: {to}
        Call-ID: {call_id}
        CSeq: {cseq} {method}
        {extra}
        Content-Length: 0
"""
    )


# ---------------------------------------------------------------------------------------------
# The proxy with extra environment variables
# ---------------------------------------------------------------------------------------------


class EnvProxy(ProxyProcess):
    """:class:`ProxyProcess` started with extra ``CLEARIP_PROXY_*`` environment variables."""

    extra_env: dict[str, str]

    def start(self, ready_timeout: float = 10.0) -> ProxyProcess:
        saved = {k: os.environ.get(k) for k in self.extra_env}
        os.environ.update(self.extra_env)
        try:
            return super().start(ready_timeout)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kb(self) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
        return int(m.group(1)) if m else 0


def start_proxy(
    lab: Lab,
    clearip: str,
    *,
    env: dict[str, str] | None = None,
    wait_port: int | None = None,
    **kw: Any,
) -> EnvProxy:
    """Start the proxy (registered with ``lab``); wait (bounded) for its ClearIP connection when
    ``wait_port`` (the stub's port) is given."""
    p = EnvProxy(lab.workdir, clearip, **kw)
    p.extra_env = dict(env or {})
    lab.proxies.append(p)
    p.start()
    if wait_port is not None:
        from tests.integration.harness import wait_established

        assert wait_established(wait_port, 5.0), f"proxy did not connect to ClearIP\n{p.output()}"
    return p


# ---------------------------------------------------------------------------------------------
# ClearIP stub
# ---------------------------------------------------------------------------------------------


class ClearIpStub(PeerErrors):
    """ClearIP over TCP (or TLS with ``tls_ctx``). ``mode``: "answer" (``status`` after ``delay``,
    302 with ``contacts``), "silent" (never answers). Counts INVITEs per Call-ID."""

    def __init__(
        self,
        *,
        contacts: str = "",
        status: int = 302,
        delay: float = 0.0,
        mode: str = "answer",
        tls_ctx: ssl.SSLContext | None = None,
        port: int | None = None,
        listen: bool = True,
    ) -> None:
        self._init_errors(f"clearip:{port or 'auto'}")
        self.port = port or free_port()
        self.contacts = contacts
        self.status = status
        self.delay = delay
        self.mode = mode
        self.tls_ctx = tls_ctx
        self.invites: dict[str, int] = {}
        self.accepted = 0
        self.handshake_errors: list[str] = []
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        if listen:
            self.start_listening()

    # --- life cycle -----------------------------------------------------------------------
    def start_listening(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, self.port))
        s.listen(16)
        s.settimeout(0.1)
        self._listener = s
        t = threading.Thread(target=self._accept_loop, args=(s,), daemon=True)
        t.start()
        self._threads.append(t)

    def stop_listening(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None

    def reset_connections(self) -> int:
        """Abort every open connection with a TCP RST (SO_LINGER 0). Returns how many."""
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                c.close()
        return len(conns)

    def close(self) -> None:
        self._closing.set()
        self.stop_listening()
        for tm in self._timers:
            tm.cancel()
        self.reset_connections()
        for t in self._threads:
            t.join(2)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def total_invites(self) -> int:
        with self._lock:
            return sum(self.invites.values())

    def wait_invites(self, n: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.total_invites() >= n:
                return True
            time.sleep(0.01)
        return False

    def wait_connected(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connections:
                return True
            time.sleep(0.01)
        return False

    # --- serving --------------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn: socket.socket = raw
            if self.tls_ctx is not None:
                raw.settimeout(5)
                try:
                    conn = self.tls_ctx.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    self.handshake_errors.append(repr(e))
                    with contextlib.suppress(OSError):
                        raw.close()
                    continue
            with self._lock:
                self._conns.append(conn)
                self.accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        send_lock = threading.Lock()

        def send(data: bytes) -> None:
            with send_lock, contextlib.suppress(OSError):
                conn.sendall(data)

        while not self._closing.is_set():
            try:
                chunk = conn.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            if buf.startswith(b"\r\n\r\n"):
                send(b"\r\n")  # RFC 5626 pong
            try:
                msgs, buf = split_stream(buf)
                for raw in msgs:
                    self._on_message(SipMessage(raw), send)
            except Exception:
                self._record("handling what the proxy sent")
                buf = b""
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def _on_message(self, msg: SipMessage, send: Callable[[bytes], None]) -> None:
        if not msg.is_request:
            return
        if msg.method == "INVITE":
            with self._lock:
                self.invites[msg.call_id] = self.invites.get(msg.call_id, 0) + 1
            if self.mode == "silent":
                return
            status = self.status
            extra = f"Contact: {self.contacts}\r\n" if status == 302 else ""
            reason = {302: "Moved Temporarily", 404: "Not Found", 503: "Service Unavailable"}.get(status, "X")
            data = response_for(msg, status, reason, to_tag="cip", extra=extra)
            if self.delay > 0:
                tm = threading.Timer(self.delay, send, args=(data,))
                tm.daemon = True
                self._timers.append(tm)
                tm.start()
            else:
                send(data)
        elif msg.method == "CANCEL":
            send(response_for(msg, 200, "OK", to_tag="cip"))


# ---------------------------------------------------------------------------------------------
# A SIP user agent over UDP with retransmissions
# ---------------------------------------------------------------------------------------------


@dataclass
class UacCall:
    call_id: str
    invite: bytes
    branch: str
    sent_at: float
    finals: list[tuple[float, SipMessage]] = field(default_factory=list)
    provisional: list[SipMessage] = field(default_factory=list)
    bye: bytes | None = None
    bye_done: bool = False
    complete_dialog: bool = True  # send BYE after a 2xx

    @property
    def final(self) -> SipMessage | None:
        return self.finals[0][1] if self.finals else None

    @property
    def final_after(self) -> float:
        return self.finals[0][0] - self.sent_at if self.finals else float("inf")

    @property
    def done(self) -> bool:
        f = self.final
        if f is None:
            return False
        if 200 <= f.status < 300 and self.complete_dialog:
            return self.bye_done
        return True


class UdpUa(PeerErrors):
    """A UDP SIP UA in a thread. As UAC: :meth:`call` sends an INVITE (Timer A retransmissions
    until a response), ACKs every final (2xx end to end along Record-Route), then BYE (Timer E)
    when ``complete_dialog``. As UAS (``uas_mode`` = "answer" | "503" | "silent" | "ring"): answers
    INVITEs (2xx retransmitted until ACK), absorbs retransmissions, answers BYE 200."""

    T1 = 0.5

    def __init__(self, name: str, *, uas_mode: str | None = None, port: int | None = None) -> None:
        self._init_errors(name)
        self.name = name
        self.uas_mode = uas_mode
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, port or 0))
        self.port = self.sock.getsockname()[1]
        self.contact_port = self.port  # what a UAS puts in its 2xx Contact (a relay's, behind one)
        self.sock.settimeout(0.02)
        self.calls: dict[str, UacCall] = {}
        self.received: list[tuple[float, SipMessage]] = []
        self.invites_seen: dict[str, set[str]] = {}  # Call-ID -> INVITE branches (UAS side)
        self.invite_times: list[float] = []
        self._uas_last: dict[tuple[str, str], bytes] = {}  # (branch, method) -> last response sent
        self._retrans: list[list[Any]] = []  # [next_time, interval, data, addr, stop_key, deadline]
        self._stopped_keys: set[str] = set()
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # --- public ---------------------------------------------------------------------------
    def send(self, data: bytes, port: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(data, (HOST, port))

    def call(
        self,
        proxy_port: int,
        *,
        number: str = "+15555550100",
        complete_dialog: bool = True,
        retransmit: bool = True,
    ) -> UacCall:
        call_id = f"{self.name}-{uuid.uuid4().hex[:12]}"
        branch = "z9hG4bK" + uuid.uuid4().hex[:16]
        data = invite_bytes(
            call_id=call_id, local_port=self.port, proxy_port=proxy_port, number=number, branch=branch
        )
        c = UacCall(call_id, data, branch, time.monotonic(), complete_dialog=complete_dialog)
        with self._lock:
            self.calls[call_id] = c
            if retransmit:
                self._retrans.append(
                    [
                        time.monotonic() + self.T1,
                        self.T1,
                        data,
                        (HOST, proxy_port),
                        "inv:" + call_id,
                        time.monotonic() + 32,
                    ]
                )
        self.send(data, proxy_port)
        return c

    def wait_done(self, calls: Sequence[UacCall], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.done for c in calls):
                return True
            time.sleep(0.01)
        return all(c.done for c in calls)

    def wait_final(self, calls: Sequence[UacCall], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.final is not None for c in calls):
                return True
            time.sleep(0.01)
        return all(c.final is not None for c in calls)

    def wait_invites(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.invite_times) >= n:
                return True
            time.sleep(0.01)
        return len(self.invite_times) >= n

    def close(self) -> None:
        self._closing.set()
        self._thread.join(2)
        with contextlib.suppress(OSError):
            self.sock.close()

    # --- loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                data = b""
            except OSError:
                if self._closing.is_set():
                    return
                data = b""
            try:
                if data:
                    self._on_datagram(data, (str(addr[0]), int(addr[1])))
                self._run_timers()
            except Exception:
                self._record(f"handling {data[:60]!r}" if data else "its timers")

    def _run_timers(self) -> None:
        now = time.monotonic()
        with self._lock:
            keep = []
            for entry in self._retrans:
                nxt, interval, data, addr, key, deadline = entry
                if key in self._stopped_keys or now > deadline:
                    continue
                if now >= nxt:
                    self.send(data, addr[1])
                    interval = min(interval * 2, 4.0)
                    entry[0], entry[1] = now + interval, interval
                keep.append(entry)
            self._retrans = keep

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = SipMessage(data)
        now = time.monotonic()
        with self._lock:
            self.received.append((now, msg))
            if msg.is_request:
                self._on_request(msg, addr, now)
            else:
                self._on_response(msg, addr, now)

    # --- UAC ------------------------------------------------------------------------------
    def _on_response(self, msg: SipMessage, addr: tuple[str, int], now: float) -> None:
        c = self.calls.get(msg.call_id)
        if c is None:
            return
        _num, method = msg.cseq
        if method == "INVITE":
            self._stopped_keys.add("inv:" + c.call_id)
            if msg.status < 200:
                c.provisional.append(msg)
                return
            first = not c.finals
            c.finals.append((now, msg))
            if msg.status >= 300:
                self.send(self._ack_non2xx(c, msg), addr[1])
                return
            ack, target, bye = self._ack_2xx(c, msg, addr)
            self.send(ack, target)
            if first and c.complete_dialog:
                c.bye = bye
                # Sent from the timer loop (first at once, then Timer E doubling).
                self._retrans.append([now, self.T1 / 2, bye, (HOST, target), "bye:" + c.call_id, now + 32])
        elif method == "BYE" and msg.status >= 200:
            self._stopped_keys.add("bye:" + c.call_id)
            c.bye_done = True

    def _ack_non2xx(self, c: UacCall, resp: SipMessage) -> bytes:
        inv = SipMessage(c.invite)
        return _crlf(
            f"""ACK {inv.request_uri} SIP/2.0
            Via: {inv.get("via")}
            Max-Forwards: 70
            From: {inv.get("from")}
            To: {resp.get("to")}
            Call-ID: {c.call_id}
            CSeq: 1 ACK
            Content-Length: 0
"""
        )

    def _ack_2xx(self, c: UacCall, resp: SipMessage, addr: tuple[str, int]) -> tuple[bytes, int, bytes]:
        inv = SipMessage(c.invite)
        contact = resp.get("contact") or ""
        m = re.search(r"<([^>]+)>", contact)
        ruri = m.group(1) if m else contact.strip()
        routes = resp.all("record-route")
        route_hdrs = "\n".join(f"Route: {r}" for r in routes)
        target = addr[1]
        out = []
        for method, seq in (("ACK", 1), ("BYE", 2)):
            branch = "z9hG4bK" + uuid.uuid4().hex[:16]
            out.append(
                _crlf(
                    f"""{method} {ruri} SIP/2.0
                    Via: SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport
                    Max-Forwards: 70
                    From: {inv.get("from")}
                    To: {resp.get("to")}
                    Call-ID: {c.call_id}
                    CSeq: {seq} {method}
                    {route_hdrs}
                    Content-Length: 0
"""
                )
            )
        return out[0], target, out[1]

    # --- UAS ------------------------------------------------------------------------------
    def _on_request(self, msg: SipMessage, addr: tuple[str, int], now: float) -> None:
        method = msg.method
        branch = top_branch(msg)
        port = addr[1]
        if method == "ACK":
            # Stop the 2xx retransmissions of that dialog.
            self._stopped_keys.add("2xx:" + msg.call_id)
            return
        last = self._uas_last.get((branch, method))
        if last is not None:
            self.send(last, port)  # a retransmission: resend the last response
            return
        if method == "INVITE":
            self.invites_seen.setdefault(msg.call_id, set()).add(branch)
            self.invite_times.append(now)
            mode = self.uas_mode or "answer"
            if mode == "silent":
                self._uas_last[(branch, method)] = b""
                return
            trying = response_for(msg, 100, "Trying")
            self.send(trying, port)
            self._uas_last[(branch, method)] = trying
            rr = "".join(f"Record-Route: {r}\r\n" for r in msg.all("record-route"))
            if mode == "503":
                final = response_for(msg, 503, "Service Unavailable", to_tag="c503")
            elif mode == "ring":
                final = response_for(msg, 180, "Ringing", to_tag="cring", extra=rr)
            else:
                final = response_for(
                    msg,
                    200,
                    "OK",
                    to_tag="c200",
                    extra=rr + f"Contact: <sip:carrier@{HOST}:{self.contact_port}>\r\n",
                )
            self.send(final, port)
            self._uas_last[(branch, method)] = final
            if mode == "answer":
                self._retrans.append(
                    [now + self.T1, self.T1, final, (HOST, port), "2xx:" + msg.call_id, now + 32]
                )
            return
        if method == "CANCEL":
            ok = response_for(msg, 200, "OK")
            self.send(ok, port)
            self._uas_last[(branch, method)] = ok
            if self.uas_mode == "ring":
                self.send(
                    response_for(SipMessage(_as_invite(msg)), 487, "Request Terminated", to_tag="cring"), port
                )
            return
        ok = response_for(msg, 200, "OK")
        self.send(ok, port)
        self._uas_last[(branch, method)] = ok


def _as_invite(cancel: SipMessage) -> bytes:
    return cancel.raw.replace(b"CANCEL", b"INVITE")


# ---------------------------------------------------------------------------------------------
# Lossy UDP relay
# ---------------------------------------------------------------------------------------------


class LossyUdpRelay(PeerErrors):
    """Listens on ``port``; forwards each client's datagrams to ``backend_port`` from a socket of
    its own (one per client address) and the answers back, dropping ``loss`` of them in each
    direction (``random.Random(seed)``). Counts what it dropped and forwarded."""

    def __init__(self, backend_port: int, *, loss: float = 0.05, seed: int = 1) -> None:
        self._init_errors(f"lossy-relay->{backend_port}")
        self.backend = (HOST, backend_port)
        self.loss = loss
        self.rng = random.Random(seed)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind((HOST, 0))
        self.port = self.front.getsockname()[1]
        self.dropped = 0
        self.forwarded = 0
        self._by_client: dict[tuple[str, int], socket.socket] = {}
        self._client_of: dict[socket.socket, tuple[str, int]] = {}
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _drop(self) -> bool:
        if self.rng.random() < self.loss:
            self.dropped += 1
            return True
        self.forwarded += 1
        return False

    def _loop(self) -> None:
        try:
            self._relay()
        except Exception:
            self._record("relaying")

    def _relay(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.front, selectors.EVENT_READ)
        while not self._closing.is_set():
            for key, _ in sel.select(0.1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data, addr = s.recvfrom(65536)
                except OSError:
                    continue
                if s is self.front:
                    back = self._by_client.get(addr)
                    if back is None:
                        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        back.bind((HOST, 0))
                        self._by_client[addr] = back
                        self._client_of[back] = addr
                        sel.register(back, selectors.EVENT_READ)
                    if not self._drop():
                        with contextlib.suppress(OSError):
                            back.sendto(data, self.backend)
                else:
                    client = self._client_of[s]
                    if not self._drop():
                        with contextlib.suppress(OSError):
                            self.front.sendto(data, client)
        sel.close()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(2)
        for s in [self.front, *self._by_client.values()]:
            with contextlib.suppress(OSError):
                s.close()


# ---------------------------------------------------------------------------------------------
# Certificates for the ClearIP TLS checks
# ---------------------------------------------------------------------------------------------


@dataclass
class BadCerts:
    wrong_name_ctx: ssl.SSLContext  # signed by the test CA, but for "not-clearip.example"
    self_signed_ctx: ssl.SSLContext  # right name (127.0.0.1, localhost), signed by nobody trusted


def make_bad_certs(directory: Path, ca_cert: Path, ca_key_pem: bytes | None = None) -> BadCerts:
    """Server contexts for a ClearIP TLS stub that the proxy must refuse. The wrong-name one is
    signed by a CA written to ``ca_cert``-adjacent files (the proxy is given that CA)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def build(
        subject_cn: str,
        names: list[x509.GeneralName],
        issuer: x509.Name | None,
        signer: Any,
        ca: bool = False,
    ) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = b.sign(signer or key, hashes.SHA256())
        return key, cert

    def ctx_for(key: Any, cert: x509.Certificate, stem: str) -> ssl.SSLContext:
        cp, kp = directory / f"{stem}.pem", directory / f"{stem}.key"
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cp), str(kp))
        return ctx

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = build("fault test CA", [], None, None, ca=True)
    ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    wk, wc = build("not-clearip.example", [x509.DNSName("not-clearip.example")], ca.subject, ca_key)
    sk, sc = build(
        "localhost",
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        None,
        None,
    )
    return BadCerts(ctx_for(wk, wc, "wrong-name"), ctx_for(sk, sc, "self-signed"))


def good_ctx(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def closed_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (connection refused)."""
    return free_port()


def wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closes ``sock`` (EOF or reset), or None if still open at ``timeout``."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(min(left, 0.2))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ssl.SSLError, OSError):
            return time.monotonic() - t0
        if not chunk:
            return time.monotonic() - t0
    return None


# Lab-scoped peers: each is closed by the Lab when the test ends (its errors fail the test).
def peer(lab: Lab, name: str, mode: str | None = None) -> UdpUa:
    ua = UdpUa(name, uas_mode=mode)
    lab.add_closer(ua)
    return ua


def stub(lab: Lab, **kw: object) -> ClearIpStub:
    s = ClearIpStub(**kw)  # type: ignore[arg-type]
    lab.add_closer(s)
    return s


def reason_of(msg: SipMessage | None) -> str:
    assert msg is not None
    return msg.get("Reason") or ""
