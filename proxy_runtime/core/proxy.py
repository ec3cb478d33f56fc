"""The transaction-stateful proxy core, sans-I/O.

Bytes come in with their source and ``now`` (:meth:`ProxyCore.receive`); what must go out is handed
to the ``send(target, data, error_key)`` callable the transport adapter injected; the adapter calls
:meth:`ProxyCore.handle_timer` at :meth:`ProxyCore.next_deadline` and reports failures with
:meth:`ProxyCore.transport_error` and :meth:`ProxyCore.set_clearip_up`. Nothing here reads a clock
or touches a socket, so RFC 3261's timers run in tests on a fake clock.

Call flow (DESIGN §2): an initial INVITE gets 100 Trying and goes to ClearIP with its Request-URI
unchanged; ClearIP's 302 is ACKed by the client transaction, the configured headers are copied
into the INVITE, and the INVITE is serial-forked to the Contacts in q order; any other final is
relayed. In-dialog requests follow Record-Route / Route (loose routing) and need no dialog state.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import os
import weakref
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from proxy_runtime.core import routing
from proxy_runtime.metrics import names
from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.metrics.records import CallRecord
from proxy_runtime.settings import Settings
from proxy_runtime.sip.message import (
    ParseError,
    SipMessage,
    SipRequest,
    SipResponse,
    Via,
    make_response,
    parse_message,
    parse_name_addr,
    parse_via,
    split_list,
    try_parse_for_reply,
)
from proxy_runtime.sip.transaction import (
    DEFAULT_TIMERS,
    ClientTransaction,
    Event,
    ServerTransaction,
    State,
    TimerSettings,
    Verdict,
)
from proxy_runtime.sip.uri import SipUri, UriError, parse_uri

log = logging.getLogger("clearip.proxy")

CLEARIP = "clearip"  # the transport name of the persistent ClearIP connection
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, PRACK, NOTIFY, REFER, MESSAGE, SUBSCRIBE"
IN_DIALOG_ONLY = frozenset({"BYE", "UPDATE", "INFO", "PRACK", "NOTIFY", "REFER"})


class Target(NamedTuple):
    """Where a message goes or came from. ``conn_id`` names a stream connection (0: any/new).

    A named tuple rather than a frozen dataclass: one is built for every message in and out, and a
    frozen dataclass's ``__init__`` costs several times more."""

    transport: str  # "udp" | "tcp" | "tls" | "clearip"
    host: str
    port: int
    conn_id: int = 0

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"


SendFn = Callable[[Target, bytes, object], None]


@dataclass(slots=True)
class Branch:
    """One carrier attempt of a serial fork."""

    call: Call
    request: SipRequest
    target: Target
    started: float
    ct: ClientTransaction | None = None
    provisional: bool = False
    cancel_sent: bool = False
    abandoned: bool = False  # no provisional in time, or the call moved on: absorb what comes


@dataclass(slots=True, weakref_slot=True)
class Call:
    """An initial INVITE: its server transaction, the ClearIP leg and the carrier branches."""

    st: ServerTransaction
    request: SipRequest
    source: Target
    received: float
    phase: str = "clearip"  # clearip -> fork -> done
    deadline: float | None = None
    queue: float | None = None  # the duration whose deadline queue holds it (see _arm_call)
    clearip_ct: ClientTransaction | None = None
    clearip_request: SipRequest | None = None
    clearip_sent: float = 0.0
    clearip_outcome: ClearIpOutcome | None = None
    clearip_latency_ms: float | None = None
    base: SipRequest | None = None  # the INVITE with ClearIP's headers copied in
    targets: list[str] = field(default_factory=list)  # Request-URIs to try (text: held per call)
    next_target: int = 0
    branch: Branch | None = None
    responses: list[SipResponse] = field(default_factory=list)
    attempts: int = 0
    cancelled: bool = False
    answered: bool = False
    pdd_ms: float | None = None
    emergency: bool = False
    proxy_failed: bool = False
    reason: str = ""
    identity: tuple[str, ...] = ()  # ClearIP's 302 Identity / P-Asserted-Identity, for the record
    pai: tuple[str, ...] = ()


@dataclass(slots=True)
class Relay:
    """A request forwarded along the route set (in-dialog requests, pre-routed requests)."""

    st: ServerTransaction
    request: SipRequest
    target: Target
    ct: ClientTransaction | None = None


class _CancelOwner:
    """Owner of the CANCELs we send: their responses need no action."""


_CANCEL = _CancelOwner()


@dataclass(slots=True)
class _Upstream:
    """Owner of an INVITE client transaction whose 2xx has been relayed: for the rest of its
    Accepted state (RFC 6026, 64*T1) 2xx retransmissions pass to the server transaction ``st``.

    It replaces the call (or relay) as owner the moment the 2xx is relayed, so the finished call —
    its requests with their Identity headers, its branches — is freed at once instead of being held
    for 32 s by the two transactions that must stay (measured: 13 KB per answered call before)."""

    st: ServerTransaction


@dataclass(slots=True)
class _InviteGuard:
    """Timer C (RFC 3261 §16.8, §9.1) for an INVITE client transaction that may never get a final
    response: after a CANCEL, 64*T1 without a final destroys it; a relayed INVITE still without a
    final at the ring limit is CANCELled (and answered 408). Without it a peer that sends 1xx and
    then nothing leaks the transaction forever (no RFC 3261 timer runs in Proceeding)."""

    key: tuple[str, str]
    deadline: float | None
    cancelled: bool


class ProxyCore:
    def __init__(
        self,
        settings: Settings,
        send: SendFn,
        *,
        advertise: str,
        ports: dict[str, int],
        own_hosts: Iterable[str] = (),
        recorder: MetricsRecorder | None = None,
        timers: TimerSettings = DEFAULT_TIMERS,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self._send = send
        self.advertise = advertise
        self.ports = dict(ports)
        self.own_hosts = {advertise.lower(), *(h.lower() for h in own_hosts)}
        self.recorder = recorder
        self.timers = timers
        self._instance = instance or os.urandom(3).hex()
        self._branch_prefix = "z9hG4bK" + self._instance
        self._seq = itertools.count(1)
        self._heap: list[tuple[float, int, object]] = []
        self._heap_compact_at = 1024  # compact the timer heap when it grows past this
        # Calls' own timers (ClearIP/carrier `timeout`, ring limit) run for a fixed duration, so
        # each duration's deadlines come in order: an insertion-ordered dict per duration is a
        # queue that is cancelled in O(1) and leaves nothing behind (see _arm_call).
        self._call_queues: dict[float, dict[int, Call]] = {}
        self._server: dict[object, ServerTransaction] = {}
        self._client: dict[object, ClientTransaction] = {}
        self._calls: dict[object, Call] = {}  # by server transaction key
        self.clearip_up = False
        self.draining = False
        self._emergency = routing.EmergencyMatcher(settings.emergency_numbers)
        self._trusted_cache: dict[str, bool] = {}
        self._networks = settings.allow_networks
        self._clearip_uri = settings.clearip_uri
        self._clearip_target = Target(CLEARIP, self._clearip_uri.host, self._clearip_uri.port or 5061)
        self._last_403_log = -1e9

    # =========================================================================================
    # Adapter-facing API
    # =========================================================================================
    @property
    def in_flight(self) -> int:
        """Initial INVITEs not yet answered with a final response."""
        return len(self._calls)

    def update_settings(self, settings: Settings) -> None:
        """Hot reload: what can change without dropping calls (timeouts, allow-list, headers...)."""
        self.settings = settings
        self._emergency = routing.EmergencyMatcher(settings.emergency_numbers)
        self._networks = settings.allow_networks
        self._trusted_cache.clear()

    def is_trusted(self, host: str) -> bool:
        ok = self._trusted_cache.get(host)
        if ok is None:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                ok = False
            else:
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                ok = any(ip in net for net in self._networks)
            if len(self._trusted_cache) > 10000:
                self._trusted_cache.clear()
            self._trusted_cache[host] = ok
        return ok

    def receive(self, data: bytes, source: Target, now: float, *, trusted: bool = False) -> bool:
        """A datagram or a framed stream message arrived from ``source``. Returns False when it was
        malformed (the adapter closes a stream connection after too many of those)."""
        if not trusted and source.transport != CLEARIP and not self.is_trusted(source.host):
            self._incr(names.UNTRUSTED_DROPPED)
            return True
        try:
            msg = parse_message(data, datagram=source.transport == "udp")
        except ParseError as exc:
            self.malformed(data, source, exc, now)
            return False
        try:
            if isinstance(msg, SipRequest):
                self._on_request(msg, source, now)
            elif isinstance(msg, SipResponse):
                self._on_response(msg, source, now)
        except ParseError as exc:  # a header that only failed when the proxy needed it
            self.malformed(data, source, exc, now)
            return False
        return True

    def malformed(self, data: bytes, source: Target, exc: ParseError, now: float) -> None:
        """Count it; answer a request with ``exc.status_hint`` when it has a usable Via."""
        self._incr(names.MALFORMED_MESSAGES)
        req = try_parse_for_reply(data)
        if req is None:
            log.debug("dropped malformed message from %s: %s", source.host, exc.reason)
            return
        resp = make_response(
            req, exc.status_hint, extra=[("Warning", f'399 clearip-proxy "{exc.reason[:100]}"')]
        )
        try:
            target = self._response_target(req.top_via, source)
        except ParseError:  # e.g. a bad rport: the source address is where the client is
            target = source
        self._send(target, resp.serialize(), None)

    def set_clearip_up(self, up: bool, now: float) -> None:
        """The ClearIP connection went up or down. Down: every call waiting on ClearIP gets 503 now."""
        was = self.clearip_up
        self.clearip_up = up
        self._gauge(names.CLEARIP_CONNECTED, 1.0 if up else 0.0)
        if was and not up:
            for call in list(self._calls.values()):
                if call.phase == "clearip" and call.clearip_ct is not None:
                    call.clearip_ct.terminate()
                    self._drop_client(call.clearip_ct)
                    call.clearip_outcome = ClearIpOutcome.UNAVAILABLE
                    self._fail_call(call, 503, "ClearIP connection lost", now)

    def transport_error(self, key: object, now: float) -> None:
        """Sending for the client transaction ``key`` failed (connection refused, unreachable)."""
        ct = self._client.get(key)
        if ct is None:
            return
        if ct.transport_error() is Event.TRANSPORT_ERROR:
            self._client_failed(ct, 503, "transport error", now)
            self._drop_client(ct)

    def start_drain(self) -> None:
        self.draining = True

    def abort_all(self, now: float) -> int:
        """End every call still in progress with 503 (at the end of a drain): no caller is left
        without a final response. Live carrier branches are cancelled. Returns how many."""
        calls = list(self._calls.values())
        for call in calls:
            if call.phase == "clearip" and call.clearip_request is not None:
                self._send_cancel(call.clearip_request, self._clearip_target, now)
            if call.branch is not None and not call.branch.abandoned:
                self._cancel_branch(call.branch, now)
            self._fail_call(call, 503, "proxy restarting", now, retry_after=True)
        return len(calls)

    def table_sizes(self) -> dict[str, int]:
        """Sizes of the core's tables (for leak checks and the control socket's status)."""
        return {
            "calls": len(self._calls),
            "server_transactions": len(self._server),
            "client_transactions": len(self._client),
            "timers": len(self._heap) + sum(len(q) for q in self._call_queues.values()),
        }

    def next_deadline(self) -> float | None:
        first: float | None = None
        for q in self._call_queues.values():
            if q:
                d = next(iter(q.values())).deadline
                if d is not None and (first is None or d < first):
                    first = d
        heap = self._heap
        while heap:
            when, _, obj = heap[0]
            if getattr(_live(obj), "deadline", None) == when:
                return when if first is None or when < first else first
            heapq.heappop(heap)  # stale entry
        return first

    def handle_timer(self, now: float) -> None:
        for duration, q in list(self._call_queues.items()):
            while q:
                call = next(iter(q.values()))
                if call.deadline is not None and call.deadline > now:
                    break
                del q[id(call)]
                call.queue = None
                if call.deadline is not None:
                    self._call_timer(call, now)
            if not q and self._call_queues.get(duration) is q:
                del self._call_queues[duration]  # e.g. the old `timeout` after a reload
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, entry = heapq.heappop(heap)
            obj = _live(entry)
            if getattr(obj, "deadline", None) != when:
                continue
            if isinstance(obj, ClientTransaction):
                self._client_timer(obj, now)
            elif isinstance(obj, ServerTransaction):
                ev = obj.on_timer(now)
                if ev is Event.TIMEOUT:
                    log.debug("no ACK for final response on %s", obj.key)
                if obj.terminated:
                    self._drop_server(obj)
                else:
                    self._schedule(obj)
            elif isinstance(obj, Call):
                if obj.queue is None:
                    self._call_timer(obj, now)
            elif isinstance(obj, _InviteGuard):
                self._guard_timer(obj, now)

    # =========================================================================================
    # Timers
    # =========================================================================================
    # Ownership forms reference cycles (call <-> server transaction, branch <-> client transaction,
    # call <-> branch). They are cut when a transaction ends, so a finished call is freed by
    # reference counting the moment its last timer ends, never left to the cyclic GC.
    def _drop_client(self, ct: ClientTransaction) -> None:
        self._client.pop(ct.key, None)
        ct.owner = None

    def _drop_server(self, st: ServerTransaction) -> None:
        self._server.pop(st.key, None)
        owner, st.owner = st.owner, None
        if isinstance(owner, Call):
            owner.branch = None
            owner.clearip_ct = None
        elif isinstance(owner, Relay):
            owner.ct = None

    def _guard(self, key: tuple[str, str], when: float, *, cancelled: bool) -> None:
        self._schedule(_InviteGuard(key, when, cancelled))

    def _guard_timer(self, guard: _InviteGuard, now: float) -> None:
        guard.deadline = None
        ct = self._client.get(guard.key)
        if ct is None or ct.state not in (State.CALLING, State.PROCEEDING):
            return  # it got its final response (or ended) meanwhile
        owner = ct.owner
        if not guard.cancelled and isinstance(owner, Relay):
            self._send_cancel(owner.request, owner.target, now)  # schedules the post-CANCEL guard
            if not owner.st.has_final:
                r = make_response(owner.request, 408, to_tag=self._instance)
                r.pop_first_value("via")
                self._respond(owner.st, r, now)
            return
        ct.terminate()
        self._client_failed(ct, 408, "no final response after CANCEL", now)
        self._drop_client(ct)

    def _schedule(self, obj: ClientTransaction | ServerTransaction | Call | _InviteGuard) -> None:
        d = obj.deadline
        if d is not None:
            heap = self._heap
            # Held weakly (the tables own transactions and calls): a stale entry, left when a
            # deadline moves, must not keep a finished transaction and what it holds alive. Guards
            # live only here, so they are held strongly (they are small and end within 64*T1).
            entry: object = obj if type(obj) is _InviteGuard else weakref.ref(obj)
            heapq.heappush(heap, (d, next(self._seq), entry))
            if len(heap) > self._heap_compact_at:
                self._compact_heap()

    def _compact_heap(self) -> None:
        """Drop stale timer entries (their object was rescheduled or finished) before they reach
        the top of the heap, so the heap stays within twice its live entries."""
        heap = self._heap
        heap[:] = [e for e in heap if getattr(_live(e[2]), "deadline", None) == e[0]]  # in place
        heapq.heapify(heap)
        self._heap_compact_at = max(1024, 2 * len(heap))

    def _client_timer(self, ct: ClientTransaction, now: float) -> None:
        ev = ct.on_timer(now)
        if ev is Event.TIMEOUT:
            self._client_failed(ct, 408, "request timeout", now)
        if ct.terminated:
            self._drop_client(ct)
        else:
            self._schedule(ct)

    def _arm_call(self, call: Call, duration: float | None, now: float) -> None:
        """(Re)start the call's one timer to fire ``duration`` from ``now``, or stop it (None).

        Its deadline goes to the queue of that duration, which stays in deadline order because
        ``now`` never goes back; were it to (a fake clock), the call goes to the heap instead. The
        old deadline is removed, not left stale: a call answered after ringing would otherwise
        leave an entry 180 s ahead (measured: up to 54,000 stale entries at 300 calls/s, and the
        memory they pinned made RSS settle only after 30,000 calls)."""
        if call.queue is not None:
            q = self._call_queues.get(call.queue)
            if q is not None:
                q.pop(id(call), None)
            call.queue = None
        if duration is None:
            call.deadline = None
            return
        when = now + duration
        call.deadline = when
        q = self._call_queues.setdefault(duration, {})
        if q:
            last = q[next(reversed(q))].deadline
            if last is not None and last > when:
                self._schedule(call)
                return
        q[id(call)] = call
        call.queue = duration

    def _call_timer(self, call: Call, now: float) -> None:
        call.deadline = None
        if call.phase == "clearip":
            # No answer from ClearIP within `timeout`: 503 so the switch route-advances.
            call.clearip_outcome = ClearIpOutcome.TIMEOUT
            if call.clearip_ct is not None and call.clearip_request is not None:
                self._send_cancel(call.clearip_request, self._clearip_target, now)
            self._fail_call(call, 503, f"ClearIP did not answer within {self.settings.timeout:g} s", now)
        elif call.phase == "fork" and call.branch is not None:
            br = call.branch
            if not br.provisional:
                # No provisional response from this Contact within `timeout`: advance.
                br.abandoned = True
                call.responses.append(self._synth(call.request, 408, "No response from carrier"))
                self._advance(call, now)
            else:
                # Rang past the ring limit: cancel and give up (ringing again elsewhere would
                # ring the same callee twice).
                self._cancel_branch(br, now)
                br.abandoned = True
                call.responses.append(self._synth(call.request, 408, "Ring timeout"))
                self._finish_best(call, now)

    # =========================================================================================
    # Requests
    # =========================================================================================
    def _on_request(self, req: SipRequest, source: Target, now: float) -> None:
        method = req.method
        if method == "ACK":
            self._on_ack(req, source, now)
            return
        if method == "CANCEL":
            self._on_cancel(req, source, now)
            return
        via = req.top_via
        key = _server_key(req, via, method)
        st = self._server.get(key)
        if st is not None:
            st.receive_request(now)  # a retransmission: absorbed, last response resent
            return
        self._stamp_via(req, via, source)
        if method == "OPTIONS" and self._is_for_me(req):
            status = 503 if self.draining else 200
            self._answer(
                req, via, source, key, status, now, extra=[("Allow", ALLOW), ("Accept", "application/sdp")]
            )
            return
        mf_text = req.get("max-forwards")
        max_forwards = int(mf_text) if mf_text is not None else 70
        if max_forwards <= 0:
            self._answer(req, via, source, key, 483, now)
            return
        if self._is_loop(req):
            self._answer(req, via, source, key, 482, now)
            return
        proxy_require = req.values("proxy-require")
        if proxy_require:
            # RFC 3261 §16.3 step 5: we support no proxy extensions.
            self._answer(req, via, source, key, 420, now, extra=[("Unsupported", ", ".join(proxy_require))])
            return
        self._pop_own_routes(req)
        in_dialog = req.to_tag is not None
        if in_dialog or req.has("route"):
            if not req.has("route") and self._uri_is_me(req):
                self._answer(req, via, source, key, 481, now)  # nowhere to go
                return
            self._relay(req, via, source, key, now)
            return
        if method == "INVITE":
            self._new_call(req, via, source, key, now)
        elif method in IN_DIALOG_ONLY:
            self._answer(req, via, source, key, 481, now)  # e.g. BYE without a dialog
        else:
            self._answer(req, via, source, key, 405, now, extra=[("Allow", ALLOW)])

    def _on_ack(self, req: SipRequest, source: Target, now: float) -> None:
        via = req.top_via
        st = self._server.get(_server_key(req, via, "INVITE"))
        if st is not None and st.receive_ack(now):
            self._schedule(st)
            return  # ACK for our non-2xx final (hop-by-hop)
        # ACK for a 2xx: end to end, along the route set, statelessly.
        mf = req.get("max-forwards")
        if mf is not None and int(mf) <= 0:
            return
        if self._is_loop(req):
            return
        self._pop_own_routes(req)
        if not req.has("route") and self._uri_is_me(req):
            return
        try:
            target = self._next_hop(req)
        except (UriError, ParseError):
            return
        branch = f"{self._branch_prefix}a{zlib.crc32(via.branch.encode() + req.call_id.encode()):08x}"
        out = self._prepare_forward(req, target, branch)
        self._send(target, out.serialize(), None)

    def _on_cancel(self, req: SipRequest, source: Target, now: float) -> None:
        via = req.top_via
        cancel_key = _server_key(req, via, "CANCEL")
        st = self._server.get(cancel_key)
        if st is not None:
            st.receive_request(now)
            return
        self._stamp_via(req, via, source)
        invite_key = _server_key(req, via, "INVITE")
        invite_st = self._server.get(invite_key)
        if invite_st is None:
            self._answer(req, via, source, cancel_key, 481, now)
            return
        self._answer(req, via, source, cancel_key, 200, now)
        call = self._calls.get(invite_key)
        if call is not None:
            self._cancel_call(call, now)
            return
        relay = invite_st.owner
        if isinstance(relay, Relay) and not invite_st.has_final:
            self._send_cancel(relay.request, relay.target, now)
            self._respond(invite_st, make_response(relay.request, 487, to_tag=self._instance), now)

    # --- replying ----------------------------------------------------------------------------
    def _answer(
        self,
        req: SipRequest,
        via: Via,
        source: Target,
        key: tuple[str, str, str],
        status: int,
        now: float,
        *,
        extra: list[tuple[str, str]] | None = None,
        reason: str | None = None,
    ) -> None:
        """Answer a request ourselves, through a server transaction (absorbs retransmissions)."""
        st = self._new_server_txn(req, via, source, key)
        resp = make_response(req, status, reason, to_tag=self._instance, extra=extra)
        self._respond(st, resp, now)

    def _respond(self, st: ServerTransaction, resp: SipResponse, now: float) -> None:
        st.send_response(resp.serialize(), resp.status, now)
        if st.terminated:
            self._drop_server(st)
        else:
            self._schedule(st)

    def _new_server_txn(
        self, req: SipRequest, via: Via, source: Target, key: tuple[str, str, str]
    ) -> ServerTransaction:
        target = self._response_target(via, source)
        send = self._send

        def transmit(data: bytes) -> None:
            send(target, data, None)

        st = ServerTransaction(
            key, transmit, invite=req.method == "INVITE", reliable=source.reliable, timers=self.timers
        )
        self._server[key] = st
        return st

    def _response_target(self, via: Via, source: Target) -> Target:
        """RFC 3261 §18.2.2 with RFC 3581: streams answer on the connection (``conn_id``), and once
        it has closed on a new connection to the source IP at the Via's sent-by port (the source
        port was the client's ephemeral one); UDP to the source IP, at the rport when the client
        asked for it, else at the Via's port."""
        if source.transport == CLEARIP:
            return source
        if source.transport != "udp":
            return Target(source.transport, source.host, via.sent_by[1], source.conn_id)
        rport = via.params.get("rport")
        if rport:
            if not (len(rport) <= 5 and rport.isdigit() and rport.isascii() and 0 < int(rport) < 65536):
                raise ParseError(f"bad Via rport {rport[:20]!r}")  # RFC 3581: rport [= 1*DIGIT]
            return Target("udp", source.host, int(rport))
        if "rport" in via.params:
            return Target("udp", source.host, source.port)
        return Target("udp", source.host, via.port or 5060)

    def _stamp_via(self, req: SipRequest, via: Via, source: Target) -> None:
        """Add received= (when the source IP differs from sent-by) and fill an empty rport."""
        if source.transport == CLEARIP:
            return
        changed = False
        if "rport" in via.params and via.params["rport"] is None:
            via.params["rport"] = str(source.port)
            changed = True
        if via.host != source.host:
            via.params["received"] = source.host
            changed = True
        if changed:
            # Rewrite the top Via value in place, keeping the header's position.
            for i, h in enumerate(req.headers):
                if h[0] == "via":
                    rest = split_list(h[2])[1:]
                    req.headers[i] = ["via", h[1], ", ".join([str(via), *rest])]
                    break

    # --- routing helpers ---------------------------------------------------------------------
    def _uri_is_me(self, req: SipRequest) -> bool:
        try:
            uri = req.parsed_uri
        except UriError:
            return False
        return self._is_me(uri)

    def _is_me(self, uri: SipUri) -> bool:
        if uri.host not in self.own_hosts:
            return False
        port = uri.port or uri.default_port
        return port in self.ports.values()

    def _is_for_me(self, req: SipRequest) -> bool:
        """An out-of-dialog request with no Route beyond us: the proxy answers it itself (OPTIONS
        health checks from switches; ClearIP only takes INVITEs)."""
        if req.to_tag is not None:
            return False
        return all(self._route_is_me(r) for r in req.values("route"))

    def _route_is_me(self, value: str) -> bool:
        try:
            return self._is_me(parse_uri(parse_name_addr(value).uri))
        except (ParseError, UriError):
            return False

    def _pop_own_routes(self, req: SipRequest) -> None:
        """RFC 3261 §16.4: remove the top Route values that point at us (two with double RR)."""
        while True:
            top = req.first_value("route")
            if top is None or not self._route_is_me(top):
                return
            req.pop_first_value("route")

    def _is_loop(self, req: SipRequest) -> bool:
        """RFC 3261 §16.3 step 4: our own Via with the same loop hash means the request came back
        unchanged (a spiral changes the Request-URI and so the hash)."""
        prefix = self._branch_prefix
        if not any(prefix in v for v in req.get_all("via")):
            return False
        marker = f"{prefix}{self._loop_hash(req)}"
        for value in req.values("via"):
            if marker in value:
                try:
                    if parse_via(value).branch.startswith(marker):
                        return True
                except ParseError:
                    continue
        return False

    @staticmethod
    def _loop_hash(req: SipRequest) -> str:
        cseq = req.get("cseq") or ""
        text = f"{req.uri}|{req.from_tag}|{req.call_id}|{cseq.split()[0] if cseq else ''}"
        return f"{zlib.crc32(text.encode('utf-8', 'surrogateescape')):08x}"

    def _new_branch(self, req: SipRequest) -> str:
        return f"{self._branch_prefix}{self._loop_hash(req)}x{next(self._seq):x}"

    def _next_hop(self, req: SipRequest) -> Target:
        route = req.first_value("route")
        uri = parse_uri(parse_name_addr(route).uri) if route else req.parsed_uri
        return self.target_for(uri)

    @staticmethod
    def target_for(uri: SipUri) -> Target:
        host = (uri.params.get("maddr") or uri.host).lower()
        return Target(uri.transport, host, uri.port or uri.default_port)

    def _via_for(self, transport: str, branch: str) -> str:
        if transport == CLEARIP:
            t = "TLS" if self._clearip_uri.transport == "tls" else "TCP"
        else:
            t = transport.upper()
        port = self.ports.get(t.lower()) or self.ports.get("tcp") or self.ports.get("udp") or 5060
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"SIP/2.0/{t} {host}:{port};branch={branch}"

    def _record_route(self, transport: str) -> str:
        port = self.ports.get(transport) or self.ports.get("udp") or 5060
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        tparam = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{host}:{port}{tparam};lr>"

    def _prepare_forward(self, req: SipRequest, target: Target, branch: str) -> SipRequest:
        """Copy with Max-Forwards decremented and our Via on top (RFC 3261 §16.6)."""
        out = req.copy()
        mf = out.get("max-forwards")
        out.set("Max-Forwards", str(int(mf) - 1) if mf is not None else "70")
        out.add("Via", self._via_for(target.transport, branch), first=True)
        return out

    def _add_record_route(self, out: SipRequest, inbound: str, outbound: str) -> None:
        """Record-Route; double (RFC 5658) when the two legs use different transports."""
        if inbound == outbound:
            out.add("Record-Route", self._record_route(outbound), first=True)
            return
        out.add("Record-Route", self._record_route(inbound).replace(";lr>", ";lr;r2=on>"), first=True)
        out.add("Record-Route", self._record_route(outbound).replace(";lr>", ";lr;r2=on>"), first=True)

    def _send_cancel(self, invite: SipRequest, target: Target, now: float) -> None:
        """CANCEL a request we forwarded (RFC 3261 §9.1): same R-URI, top Via, Call-ID, From, To,
        CSeq number and Route."""
        cancel = SipRequest("CANCEL", invite.uri)
        top_via = invite.first_value("via") or ""
        cancel.headers.append(["via", "Via", top_via])
        for h in invite.headers:
            if h[0] in ("from", "to", "call-id", "route", "max-forwards"):
                cancel.headers.append(list(h))
        seq, _ = invite.cseq
        cancel.headers.append(["cseq", "CSeq", f"{seq} CANCEL"])
        branch = parse_via(top_via).branch
        key = (branch, "CANCEL")
        if key in self._client:
            return
        data = cancel.serialize()
        send = self._send

        def transmit(d: bytes) -> None:
            send(target, d, key)

        ct = ClientTransaction(
            key, data, transmit, invite=False, reliable=target.reliable, now=now, timers=self.timers
        )
        ct.owner = _CANCEL
        self._client[key] = ct
        self._schedule(ct)
        self._guard((branch, "INVITE"), now + self.timers.timeout_64t1, cancelled=True)

    def _build_ack(self, request: SipRequest, response: object) -> bytes:
        """ACK for a non-2xx final (RFC 3261 §17.1.1.3)."""
        assert isinstance(response, SipResponse)
        ack = SipRequest("ACK", request.uri)
        ack.headers.append(["via", "Via", request.first_value("via") or ""])
        for h in request.headers:
            if h[0] in ("from", "call-id", "route"):
                ack.headers.append(list(h))
        ack.headers.append(["to", "To", response.get("to") or request.get("to") or ""])
        ack.headers.append(["cseq", "CSeq", f"{request.cseq[0]} ACK"])
        ack.headers.append(["max-forwards", "Max-Forwards", "70"])
        return ack.serialize()

    def _start_client(
        self, out: SipRequest, target: Target, key: tuple[str, str], owner: object, now: float
    ) -> ClientTransaction:
        data = out.serialize()
        send = self._send

        def transmit(d: bytes) -> None:
            send(target, d, key)

        invite = out.method == "INVITE"
        ct = ClientTransaction(
            key,
            data,
            transmit,
            invite=invite,
            reliable=target.reliable,
            now=now,
            timers=self.timers,
            build_ack=(lambda resp: self._build_ack(out, resp)) if invite else None,
        )
        ct.owner = owner
        if not ct.terminated:
            self._client[key] = ct
            self._schedule(ct)
        return ct

    # =========================================================================================
    # Relaying along the route set (in-dialog and pre-routed requests)
    # =========================================================================================
    def _relay(
        self, req: SipRequest, via: Via, source: Target, key: tuple[str, str, str], now: float
    ) -> None:
        try:
            target = self._next_hop(req)
        except (UriError, ParseError) as exc:
            self._answer(
                req, via, source, key, 400, now, reason=f"Bad Route or Request-URI: {exc.reason}"[:80]
            )
            return
        st = self._new_server_txn(req, via, source, key)
        if req.method == "INVITE":
            self._respond(st, make_response(req, 100), now)
        branch = self._new_branch(req)
        out = self._prepare_forward(req, target, branch)
        ckey = (branch, req.method)
        relay = Relay(st, out, target)
        st.owner = relay
        relay.ct = self._start_client(out, target, ckey, relay, now)
        if req.method == "INVITE" and not relay.ct.terminated:
            self._guard(ckey, now + self.settings.ring_timeout, cancelled=False)

    # =========================================================================================
    # Calls: initial INVITEs
    # =========================================================================================
    def _new_call(
        self, req: SipRequest, via: Via, source: Target, key: tuple[str, str, str], now: float
    ) -> None:
        st = self._new_server_txn(req, via, source, key)
        call = Call(st, req, source, now)
        st.owner = call
        self._calls[key] = call
        self._respond(st, make_response(req, 100), now)
        s = self.settings
        if self.draining:
            self._fail_call(call, 503, "proxy is shutting down", now, retry_after=True)
            return
        if len(self._calls) > s.max_in_flight:
            self._fail_call(call, 503, "proxy overloaded", now, retry_after=True)
            return
        if self._emergency.matches(routing.dialled_number(req)):
            call.emergency = True
            if s.emergency_action == "route" and s.emergency_route:
                call.phase = "fork"
                call.base = req
                call.targets = [str(parse_uri(s.emergency_route))]
                self._advance(call, now)
            else:
                # Never wait on ClearIP for an emergency call: the switch takes its direct route.
                self._fail_call(
                    call, 503, "emergency call: use the direct emergency route", now, failed=False
                )
            return
        if not self.clearip_up:
            call.clearip_outcome = ClearIpOutcome.UNAVAILABLE
            self._fail_call(call, 503, "ClearIP unreachable", now)
            return
        branch = self._new_branch(req)
        out = self._prepare_forward(req, self._clearip_target, branch)
        call.clearip_request = out
        call.clearip_sent = now
        call.clearip_ct = self._start_client(out, self._clearip_target, (branch, "INVITE"), call, now)
        self._arm_call(call, s.timeout, now)

    def _cancel_call(self, call: Call, now: float) -> None:
        if call.st.has_final or call.phase == "done":
            return
        call.cancelled = True
        if call.phase == "clearip" and call.clearip_request is not None:
            self._send_cancel(call.clearip_request, self._clearip_target, now)
        br = call.branch
        if br is not None and not br.abandoned:
            self._cancel_branch(br, now)
        self._finish(
            call, make_response(call.request, 487, to_tag=self._instance), now, reason="cancelled by caller"
        )

    def _cancel_branch(self, br: Branch, now: float) -> None:
        if br.cancel_sent:
            return
        if br.provisional:
            br.cancel_sent = True
            self._send_cancel(br.request, br.target, now)
        else:
            br.abandoned = True  # CANCEL once a provisional arrives (RFC 3261 §9.1)

    def _advance(self, call: Call, now: float) -> None:
        """Start the next carrier attempt, or finish with the best response."""
        while call.next_target < len(call.targets) and not call.cancelled:
            uri = parse_uri(call.targets[call.next_target])
            call.next_target += 1
            base = call.base or call.request
            out = base.copy()
            out.uri = str(uri)
            out.remove("route")
            target = self.target_for(uri)
            if (
                self.settings.large_over_tcp
                and target.transport == "udp"
                and len(out.body) + sum(len(h[2]) + len(h[1]) + 4 for h in out.headers) > 1300
            ):
                target = Target("tcp", target.host, target.port)
            inbound = call.source.transport
            self._add_record_route(out, inbound if inbound != CLEARIP else "tcp", target.transport)
            branch = self._new_branch(out)
            mf = out.get("max-forwards")
            out.set("Max-Forwards", str(int(mf) - 1) if mf is not None else "70")
            out.add("Via", self._via_for(target.transport, branch), first=True)
            call.attempts += 1
            br = Branch(call, out, target, now)
            call.branch = br
            br.ct = self._start_client(out, target, (branch, "INVITE"), br, now)
            if br.ct.terminated:
                continue
            # Held while the call rings (maybe minutes): keep the text, not the parsed values.
            out.forget_parsed()
            base.forget_parsed()
            self._arm_call(call, self.settings.timeout, now)
            return
        self._finish_best(call, now)

    def _finish_best(self, call: Call, now: float) -> None:
        best = routing.best_response(call.responses)
        if best is None:
            self._fail_call(call, 503, "no usable carrier route", now)
            return
        self._finish(call, best, now, reason=f"all {call.attempts} carrier attempt(s) failed")

    def _fail_call(
        self,
        call: Call,
        status: int,
        text: str,
        now: float,
        *,
        retry_after: bool = False,
        failed: bool = True,
    ) -> None:
        """The proxy itself ends the call: 503 with a Reason header naming the cause."""
        extra = [("Reason", f'SIP;cause={status};text="{text}"')]
        if retry_after:
            extra.append(("Retry-After", "5"))
        call.proxy_failed = failed
        resp = make_response(call.request, status, to_tag=self._instance, extra=extra)
        self._finish(call, resp, now, reason=text)

    def _finish(self, call: Call, resp: SipResponse, now: float, *, reason: str) -> None:
        """Send the call's final response (once) and write its record."""
        if call.phase == "done":
            return
        call.phase = "done"
        self._arm_call(call, None, now)
        self._respond(call.st, resp, now)
        self._calls.pop(call.st.key, None)
        if call.pdd_ms is None:
            call.pdd_ms = (now - call.received) * 1000.0
        call.reason = reason
        self._record(call, resp.status, resp.reason)
        self._release(call)

    def _release(self, call: Call) -> None:
        """A call has its final response: keep only what its transactions still need.

        The server transaction absorbs retransmissions and ACKs by itself. The winning branch's
        client transaction passes 2xx retransmissions straight to it (:class:`_Upstream`). Branches
        still live (cancelled, abandoned) keep their own request and the call, for late answers."""
        call.st.owner = None
        br, call.branch = call.branch, None
        if call.answered and br is not None and br.ct is not None and br.ct.owner is br:
            br.ct.owner = _Upstream(call.st)
            br.ct = None
        call.base = None
        call.clearip_request = None
        call.responses = []
        call.targets = []

    # --- responses to the ClearIP leg and the carrier branches --------------------------------
    def _on_clearip_response(self, call: Call, resp: SipResponse, now: float) -> None:
        status = resp.status
        if status < 200 or call.phase != "clearip":
            return
        call.clearip_latency_ms = (now - call.clearip_sent) * 1000.0
        call.clearip_outcome = routing.clearip_outcome(status)
        call.clearip_request = None  # answered: nothing left to CANCEL there; free it
        call.clearip_ct = None
        if status == 403:
            self._warn_403(now)
        targets = routing.carrier_targets(resp) if status == 302 else []
        if targets:  # DESIGN §2: a 302 with usable Contacts forks; any other final is relayed
            call.phase = "fork"
            base = call.request.copy()
            routing.copy_headers(resp, base, self.settings.copy_headers)
            call.identity = tuple(resp.get_all("identity"))
            call.pai = tuple(resp.get_all("p-asserted-identity"))
            call.base = base
            call.request = base  # same Via/From/To/Call-ID/CSeq for our responses: drop the original
            call.targets = [str(u) for u in targets]
            self._arm_call(call, None, now)
            self._advance(call, now)
            return
        out = resp.copy()
        out.pop_first_value("via")
        self._finish(call, out, now, reason=f"ClearIP {status}")

    def _on_branch_response(self, call: Call, br: Branch, resp: SipResponse, now: float) -> None:
        status = resp.status
        if br.abandoned or call.branch is not br:
            # A branch we gave up on: cancel it if it rings; hang up if it answers, so the call
            # is never connected twice.
            if status < 200:
                if not br.cancel_sent:
                    br.cancel_sent = True
                    self._send_cancel(br.request, br.target, now)
            elif status < 300 and not (call.answered and call.branch is br):
                self._hang_up(br, resp, now)
            return
        if status < 200:
            if not br.provisional:
                br.provisional = True
                if call.cancelled:
                    self._cancel_branch(br, now)
                    return
                self._arm_call(call, self.settings.ring_timeout, now)
            if status > 100:
                if call.pdd_ms is None:
                    call.pdd_ms = (now - call.received) * 1000.0
                self._pass_upstream(call.st, resp, now)
            return
        if status < 300:
            if call.cancelled or call.phase == "done":
                if not call.answered:
                    self._hang_up(br, resp, now)  # answered after the caller cancelled
                else:
                    self._pass_upstream(call.st, resp, now)  # 2xx retransmission
                return
            call.answered = True
            out = resp.copy()
            out.pop_first_value("via")
            self._finish(call, out, now, reason=f"answered by carrier {call.attempts}")
            return
        # A failure from this Contact.
        if call.phase == "done":
            return
        call.responses.append(self._strip_via(resp))
        if not call.cancelled and routing.should_advance(status, advance_on_4xx=self.settings.advance_on_4xx):
            self._advance(call, now)
        else:
            self._finish_best(call, now)

    def _pass_upstream(self, st: ServerTransaction, resp: SipResponse, now: float) -> None:
        """A provisional or a 2xx (retransmission) through the server transaction, our Via off."""
        out = resp.copy()
        out.pop_first_value("via")
        if st.send_response(out.serialize(), out.status, now):
            self._schedule(st)

    @staticmethod
    def _strip_via(resp: SipResponse) -> SipResponse:
        out = resp.copy()
        out.pop_first_value("via")
        return out

    def _hang_up(self, br: Branch, resp: SipResponse, now: float) -> None:
        """A 2xx we cannot pass up (the caller already has a final): ACK it and send BYE."""
        contact = resp.first_value("contact")
        if not contact:
            return
        try:
            remote = parse_uri(parse_name_addr(contact).uri)
        except (ParseError, UriError):
            return
        route_set = list(reversed(resp.values("record-route")))
        # Our own Record-Route entries are at the end of the callee's view; drop them.
        route_set = [r for r in route_set if not self._route_is_me(r)]
        target = self._next_hop_from(route_set, remote)
        cseq = br.request.cseq[0]
        for method, seq in (("ACK", cseq), ("BYE", cseq + 1)):
            req = SipRequest(method, str(remote))
            branch = self._new_branch(br.request) + method[0].lower()
            req.headers.append(["via", "Via", self._via_for(target.transport, branch)])
            for r in route_set:
                req.headers.append(["route", "Route", r])
            for h in br.request.headers:
                if h[0] in ("from", "call-id"):
                    req.headers.append(list(h))
            req.headers.append(["to", "To", resp.get("to") or ""])
            req.headers.append(["cseq", "CSeq", f"{seq} {method}"])
            req.headers.append(["max-forwards", "Max-Forwards", "70"])
            if method == "ACK":
                self._send(target, req.serialize(), None)
            else:
                self._start_client(req, target, (branch, "BYE"), _CANCEL, now)

    def _next_hop_from(self, route_set: list[str], remote: SipUri) -> Target:
        if route_set:
            try:
                return self.target_for(parse_uri(parse_name_addr(route_set[0]).uri))
            except (ParseError, UriError):
                pass
        return self.target_for(remote)

    def _client_failed(self, ct: ClientTransaction, status: int, text: str, now: float) -> None:
        """A client transaction timed out or could not be sent."""
        owner = ct.owner
        if isinstance(owner, Call):
            call = owner
            if call.phase == "clearip" and ct is call.clearip_ct:
                call.clearip_outcome = ClearIpOutcome.UNAVAILABLE
                self._fail_call(call, 503, f"ClearIP {text}", now)
        elif isinstance(owner, Branch):
            call = owner.call
            if call.branch is not owner or owner.abandoned or call.phase != "fork":
                return
            owner.abandoned = True
            call.responses.append(self._synth(call.request, 503 if status != 408 else 408, f"carrier {text}"))
            if call.cancelled:
                self._finish_best(call, now)
            else:
                self._advance(call, now)
        elif isinstance(owner, Relay) and not owner.st.has_final:
            r = make_response(owner.request, status, to_tag=self._instance)
            r.pop_first_value("via")  # our own Via, from the forwarded copy
            self._respond(owner.st, r, now)

    def _synth(self, req: SipRequest, status: int, text: str) -> SipResponse:
        return make_response(
            req, status, to_tag=self._instance, extra=[("Reason", f'SIP;cause={status};text="{text}"')]
        )

    # =========================================================================================
    # Responses
    # =========================================================================================
    def _on_response(self, resp: SipResponse, source: Target, now: float) -> None:
        via = resp.top_via
        _, method = resp.cseq
        key = (via.branch, method)
        ct = self._client.get(key)
        if ct is None:
            self._stray_response(resp, via, source, now)
            return
        verdict = ct.receive_response(resp, resp.status, now)
        owner = ct.owner
        if ct.terminated:
            self._drop_client(ct)
        else:
            self._schedule(ct)
        if verdict is Verdict.ABSORB:
            return
        if isinstance(owner, Branch):
            self._on_branch_response(owner.call, owner, resp, now)
        elif isinstance(owner, Call):
            self._on_clearip_response(owner, resp, now)
        elif isinstance(owner, _Upstream):
            self._pass_upstream(owner.st, resp, now)  # a 2xx retransmission (Accepted)
        elif isinstance(owner, Relay):
            if resp.status >= 200 and method == "INVITE" and resp.status < 300:
                self._pass_upstream(owner.st, resp, now)
                owner.st.owner = None
                ct.owner = _Upstream(owner.st)  # the relay (its forwarded request) is freed
            elif resp.status > 100 or method != "INVITE":
                self._respond(owner.st, self._strip_via(resp), now)
                if resp.status >= 200:
                    owner.st.owner = None  # answered: the relay is no longer needed
        if ct.state is State.COMPLETED:
            ct.owner = None  # from now on it only absorbs (and ACKs) retransmissions of its final

    def _stray_response(self, resp: SipResponse, via: Via, source: Target, now: float) -> None:
        """No matching client transaction: drop it (RFC 6026 §8.3 removes RFC 3261 §16.7's stateless
        forwarding of stray 2xx: the Accepted state already passes 2xx retransmissions for 64*T1).

        Forwarding a stray 2xx would give a caller a second final after the 503 it got when the
        branch failed (transport error, timeout), and would let any allow-listed host make the proxy
        send a forged response (top Via with our branch prefix) to the address in its second Via."""
        log.debug("dropped stray %d response (branch %s) from %s", resp.status, via.branch, source.host)

    # =========================================================================================
    # Metrics
    # =========================================================================================
    def _incr(self, spec: names.MetricSpec) -> None:
        if self.recorder is not None:
            self.recorder.incr(spec)

    def _gauge(self, spec: names.MetricSpec, value: float) -> None:
        if self.recorder is not None:
            self.recorder.set_gauge(spec, value)

    def _record(self, call: Call, status: int, status_text: str = "") -> None:
        if self.recorder is None:
            return
        number = routing.dialled_number(call.request) or ""  # masked in the log unless log_numbers
        try:
            caller = parse_uri(parse_name_addr(call.request.get("from") or "").uri).user or ""
        except (ParseError, UriError):
            caller = ""
        br = call.branch
        self.recorder.record_call(
            CallRecord(
                call_id=call.request.call_id,
                clearip_outcome=call.clearip_outcome,
                clearip_latency_ms=call.clearip_latency_ms,
                carrier_attempts=call.attempts,
                route_advances=max(0, call.attempts - 1),
                final_status=status,
                post_dial_delay_ms=call.pdd_ms,
                emergency=call.emergency,
                proxy_failed=call.proxy_failed,
                overload_rejected="overloaded" in call.reason,
                caller=caller,
                callee=number,
                reason=call.reason,
                identity=call.identity,
                pai=call.pai,
                final_reason=status_text,
                carrier=f"{br.target.host}:{br.target.port}" if br is not None else "",
            )
        )
        self._gauge(names.IN_FLIGHT, float(len(self._calls)))

    def _warn_403(self, now: float) -> None:
        if now - self._last_403_log >= 60:
            self._last_403_log = now
            log.error(
                "ClearIP answered 403 Forbidden: this proxy's public address (%s) is not whitelisted "
                "in the ClearIP account; calls are being refused",
                self.advertise,
            )


def _live(entry: object) -> object:
    """A timer heap entry's object (calls are held by weak reference; None once freed)."""
    return entry() if type(entry) is weakref.ref else entry


def _server_key(req: SipMessage, via: Via, method: str) -> tuple[str, str, str]:
    """RFC 3261 §17.2.3: branch + sent-by + method (ACK and CANCEL look up the INVITE's).
    Without the magic cookie (RFC 2543 clients), Call-ID, From tag and CSeq number stand in."""
    branch = via.branch
    host, port = via.sent_by
    sent_by = f"{host}:{port}"
    if branch.startswith("z9hG4bK"):
        return (branch, sent_by, method)
    cseq = req.get("cseq") or ""
    return (f"2543|{req.call_id}|{req.from_tag}|{cseq.split()[0] if cseq else ''}|{branch}", sent_by, method)
