"""The transaction-stateful proxy core, sans-I/O: the dispatcher.

Bytes come in with their source and ``now`` (:meth:`ProxyCore.receive`); what must go out is handed
to the ``send(target, data, error_key)`` callable the transport adapter injected; the adapter calls
:meth:`ProxyCore.handle_timer` at :meth:`ProxyCore.next_deadline` and reports failures with
:meth:`ProxyCore.transport_error` and :meth:`ProxyCore.set_clearip_up`. Nothing here reads a clock
or touches a socket, so RFC 3261's timers run in tests on a fake clock.

Call flow (DESIGN §2): an initial INVITE gets 100 Trying and goes to ClearIP with its Request-URI
unchanged; ClearIP's 302 is ACKed by the client transaction, the configured headers are copied
into the INVITE, and the INVITE is serial-forked to the Contacts in q order; any other final is
relayed. In-dialog requests follow Record-Route / Route (loose routing) and need no dialog state.

Owns: the adapter-facing API, the checks every request passes (allow-list, retransmission,
Max-Forwards, loops, Proxy-Require, our own Routes, OPTIONS to us), matching each message to its
transaction and owner — a :class:`~.call.Call`, a :class:`~.relay.Relay` or an owner from
:mod:`transactions` — and waking what :class:`~.timers.Timers` says is due; the calls table; the
metrics counters. It implements :class:`~.call.CallHost` for the calls, handing their ClearIP
questions (is the link up, may this call ask, hold it for the link) to :class:`~.gate.ClearIpGate`.

Must not touch: what a call or relay does with a message (their modules decide), the stamps
(:mod:`stamp`), the ClearIP link state, held calls and breaker (:mod:`gate`), sockets, the
clock, or the transport, operations and tools packages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

from proxy_runtime.core import routing
from proxy_runtime.core.breaker import Admission
from proxy_runtime.core.call import Branch, Call, call_record
from proxy_runtime.core.gate import ClearIpGate
from proxy_runtime.core.relay import Relay, forward_ack
from proxy_runtime.core.shed import Shedder
from proxy_runtime.core.stamp import (
    CLEARIP,
    SendFn,
    Stamper,
    Target,
    next_hop,
    response_target,
    server_key,
    stamp_via,
)
from proxy_runtime.core.timers import Timers
from proxy_runtime.core.transactions import Transactions, Upstream
from proxy_runtime.metrics import names
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.settings import Settings
from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import Via
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message, try_parse_for_reply
from proxy_runtime.sip.transaction import (
    DEFAULT_TIMERS,
    ClientTransaction,
    ServerTransaction,
    State,
    TimerSettings,
    Verdict,
)
from proxy_runtime.sip.uri import UriError

# CLEARIP, SendFn and Target live in stamp.py; the adapter imports them from here with ProxyCore.
__all__ = ["ALLOW", "CLEARIP", "ProxyCore", "SendFn", "Target"]

log = logging.getLogger("clearip.proxy")

# The methods the proxy accepts (RFC 3261 §20.5), in the Allow of its 405 and OPTIONS answers:
# INVITE (routed by ClearIP), ACK, CANCEL, OPTIONS (answered itself) and the in-dialog methods it
# relays. Any other out-of-dialog request (MESSAGE, SUBSCRIBE, REGISTER, ...) without a Route beyond
# the proxy gets 405 (with one, it is relayed along it).
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, PRACK, NOTIFY, REFER"
IN_DIALOG_ONLY = frozenset({"BYE", "UPDATE", "INFO", "PRACK", "NOTIFY", "REFER"})


class ProxyCore:
    """The dispatcher: one per proxy process, fed by the adapter (see the module's docstring)."""

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
        need_link: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._send = send
        # The link, the calls held for it (need_link: "connect now") and the brownout breaker.
        self.gate = ClearIpGate(settings, recorder, need_link, advertise=advertise)
        self.breaker = self.gate.breaker  # for the control socket's status
        self.advertise = advertise
        self.recorder = recorder
        self.timers = timers
        self.stamper = Stamper(
            advertise=advertise,
            ports=ports,
            own_hosts=own_hosts,
            instance=instance or os.urandom(3).hex(),
            clearip_transport=settings.clearip_uri.transport,
        )
        self.ports = self.stamper.ports
        self._wakeups = Timers()
        self._txns = Transactions(send, self._wakeups, timers, failed=self._client_failed)
        self._calls: dict[object, Call] = {}  # by server transaction key
        self.draining = False
        self._emergency = routing.EmergencyMatcher(settings.emergency_numbers)
        self._trusted = routing.AllowList(settings.allow_networks)
        uri = settings.clearip_uri
        self.clearip_target = Target(CLEARIP, uri.host, uri.port or 5061)
        self._last_ignored_log = -1e9
        # Overload: new INVITEs refused statelessly before they are parsed (core/shed.py).
        self.shed = Shedder(
            settings,
            instance=self.stamper.instance,
            send=send,
            server_txns=self._txns.server,
            is_emergency=self.is_emergency,
            recorder=recorder,
        )
        self.overload = self.shed.control  # for the control socket's status

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
        self._trusted = routing.AllowList(settings.allow_networks)
        self.gate.update(settings)
        self.shed.update_settings(settings)

    def note_queue_delay(self, delay: float, now: float) -> None:
        """The adapter read a datagram that had waited ``delay`` seconds in the kernel's receive
        queue (the overload signal: see :mod:`.overload`)."""
        self.overload.observe(delay, now)

    def is_trusted(self, host: str) -> bool:
        return self._trusted.allows(host)

    def receive(self, data: bytes, source: Target, now: float, *, trusted: bool = False) -> bool:
        """A datagram or a framed stream message arrived from ``source``. Returns False when it was
        malformed (the adapter closes a stream connection after too many of those)."""
        if not trusted and source.transport != CLEARIP and not self._trusted.allows(source.host):
            self._incr(names.UNTRUSTED_DROPPED)
            return True
        if self.shed.receive(data, source, now):
            return True  # an overload refusal, or the ACK for one
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
        reply = _malformed_reply(data, source, exc)
        if reply is not None:
            self._send(reply[0], reply[1], None)

    def set_clearip_up(self, up: bool, now: float) -> None:
        """The ClearIP connection went up or down. Down: every call waiting on ClearIP gets 503 now."""
        if self.gate.link_changed(up, now):
            for call in list(self._calls.values()):
                call.clearip_lost(now)

    def clearip_unreachable(self, now: float, error: str = "") -> None:
        """The adapter's connect to ClearIP failed (refused, timed out, TLS): every call held for
        the link gets 503 now, so "ClearIP down" still answers at once."""
        self.gate.unreachable(now)

    def client_alive(self, key: object) -> bool:
        """Whether the client transaction ``key`` still waits for something (the adapter forgets
        the keys of finished ones it tracks per connection)."""
        ct = self._txns.client.get(key)
        return ct is not None and ct.state in (State.CALLING, State.TRYING, State.PROCEEDING)

    def transport_error(self, key: object, now: float) -> None:
        """Sending for the client transaction ``key`` failed (connection refused, unreachable)."""
        self._txns.transport_error(key, now)

    def start_drain(self) -> None:
        self.draining = True

    def abort_all(self, now: float) -> int:
        """End every call still in progress with 503 (at the end of a drain): no caller is left
        without a final response. Live carrier branches are cancelled. Returns how many."""
        calls = list(self._calls.values())
        for call in calls:
            call.abort(now)
        return len(calls)

    def table_sizes(self) -> dict[str, int]:
        """Sizes of the core's tables (for leak checks and the control socket's status)."""
        return {
            "calls": len(self._calls),
            "server_transactions": len(self._txns.server),
            "client_transactions": len(self._txns.client),
            "timers": len(self._wakeups),
        }

    def next_deadline(self) -> float | None:
        return self._wakeups.next_deadline()

    def handle_timer(self, now: float) -> None:
        txns = self._txns
        for obj in self._wakeups.due(now):
            if isinstance(obj, Call):
                obj.on_timer(now)
            else:
                txns.on_timer(obj, now)  # a transaction or a Timer C guard

    # =========================================================================================
    # Owners
    # =========================================================================================
    def _client_failed(self, ct: ClientTransaction, status: int, text: str, now: float) -> None:
        """A client transaction timed out, could not be sent, or got no final after a CANCEL:
        tell its owner (called by :class:`~.transactions.Transactions`)."""
        owner = ct.owner
        if isinstance(owner, Branch):
            owner.call.on_branch_failed(owner, status, text, now)
        elif isinstance(owner, Call):
            owner.on_clearip_failed(ct, text, now)
        elif isinstance(owner, Relay):
            owner.client_failed(status, now)

    # =========================================================================================
    # Requests
    # =========================================================================================
    def _on_request(self, req: SipRequest, source: Target, now: float) -> None:
        method = req.method
        if method == "ACK":
            self._on_ack(req, now)
            return
        if method == "CANCEL":
            self._on_cancel(req, source, now)
            return
        via = req.top_via
        key = server_key(req, via, method)
        st = self._txns.server.get(key)
        if st is not None:
            st.receive_request(now)  # a retransmission: absorbed, last response resent
            return
        stamp_via(req, via, source)
        stamper = self.stamper
        if method == "OPTIONS" and stamper.is_for_me(req):
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
        # Our own Routes come off first (RFC 3261 §16.4): the loop hash is taken without them,
        # as it was for the branch we stamped when the request passed before (stamp.loop_hash).
        stamper.pop_own_routes(req)
        if stamper.is_loop(req):
            self._answer(req, via, source, key, 482, now)
            return
        proxy_require = req.values("proxy-require")
        if proxy_require:
            # RFC 3261 §16.3 step 5: we support no proxy extensions.
            self._answer(req, via, source, key, 420, now, extra=[("Unsupported", ", ".join(proxy_require))])
            return
        in_dialog = req.to_tag is not None
        if in_dialog or req.has("route"):
            if not req.has("route") and stamper.uri_is_me(req):
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

    def _on_ack(self, req: SipRequest, now: float) -> None:
        via = req.top_via
        st = self._txns.server.get(server_key(req, via, "INVITE"))
        if st is not None and st.receive_ack(now):
            self._wakeups.schedule(st)
            return  # ACK for our non-2xx final (hop-by-hop); one in Accepted is not absorbed
        if st is None and req.to_tag == self.shed.tag:
            return  # ACK for a stateless overload refusal that the byte check missed
        forward_ack(self.stamper, self._send, req, via)  # ACK for a 2xx: end to end

    def _on_cancel(self, req: SipRequest, source: Target, now: float) -> None:
        via = req.top_via
        cancel_key = server_key(req, via, "CANCEL")
        server = self._txns.server
        st = server.get(cancel_key)
        if st is not None:
            st.receive_request(now)
            return
        stamp_via(req, via, source)
        invite_key = server_key(req, via, "INVITE")
        invite_st = server.get(invite_key)
        if invite_st is None:
            self._answer(req, via, source, cancel_key, 481, now)
            return
        self._answer(req, via, source, cancel_key, 200, now)
        call = self._calls.get(invite_key)
        if call is not None:
            call.cancel(now)
            return
        relay = invite_st.owner
        if isinstance(relay, Relay):
            relay.cancel(now)

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
        st = self._txns.new_server(req, via, source, key)
        resp = make_response(req, status, reason, to_tag=self.stamper.instance, extra=extra)
        self._txns.respond(st, resp, now)

    def _relay(
        self, req: SipRequest, via: Via, source: Target, key: tuple[str, str, str], now: float
    ) -> None:
        try:
            target = next_hop(req)
        except (UriError, ParseError) as exc:
            self._answer(
                req, via, source, key, 400, now, reason=f"Bad Route or Request-URI: {exc.reason}"[:80]
            )
            return
        st = self._txns.new_server(req, via, source, key)
        Relay.start(self._txns, self.stamper, req, st, target, now, ring_timeout=self.settings.ring_timeout)

    def _new_call(
        self, req: SipRequest, via: Via, source: Target, key: tuple[str, str, str], now: float
    ) -> None:
        st = self._txns.new_server(req, via, source, key)
        call = Call(self, st, req, source, now)
        st.owner = call
        self._calls[key] = call
        self._txns.respond(st, make_response(req, 100), now)
        # An emergency call is never refused for a drain or for load: Call.start routes it to the
        # emergency route, or answers it at once so the switch takes its own (DESIGN §2).
        if self.draining and not self.is_emergency(req):
            call.fail(503, "proxy is shutting down", now, retry_after=True)
        elif len(self._calls) > self.settings.max_in_flight and not self.is_emergency(req):
            call.fail(503, "proxy overloaded", now, retry_after=True)
        else:
            call.start(now)

    # =========================================================================================
    # Responses
    # =========================================================================================
    def _on_response(self, resp: SipResponse, source: Target, now: float) -> None:
        via = resp.top_via
        _, method = resp.cseq
        key = (via.branch, method)
        txns = self._txns
        ct = txns.client.get(key)
        if ct is None:
            # No matching client transaction: drop it. RFC 6026 §8.3 removes RFC 3261 §16.7's
            # stateless forwarding of stray 2xx (the Accepted state already passes 2xx
            # retransmissions for 64*T1). Forwarding one would give a caller a second final after
            # the 503 it got when the branch failed, and would let any allow-listed host make the
            # proxy send a forged response (top Via with our branch prefix) to its second Via.
            log.debug("dropped stray %d response (branch %s) from %s", resp.status, via.branch, source.host)
            return
        verdict = ct.receive_response(resp, resp.status, now)
        owner = ct.owner
        if ct.terminated:
            txns.drop_client(ct)
        else:
            self._wakeups.schedule(ct)
        if verdict is Verdict.ABSORB:
            return
        if isinstance(owner, Branch):
            owner.call.on_branch_response(owner, resp, now)
        elif isinstance(owner, Call):
            owner.on_clearip_response(resp, now)
        elif isinstance(owner, Upstream):
            txns.pass_upstream(owner.st, resp, now)  # a 2xx retransmission (Accepted)
        elif isinstance(owner, Relay):
            owner.on_response(ct, resp, method, now)
        if ct.state is State.COMPLETED:
            ct.owner = None  # from now on it only absorbs (and ACKs) retransmissions of its final

    # =========================================================================================
    # CallHost: what the calls may ask of the dispatcher
    # =========================================================================================
    def is_emergency(self, request: SipRequest) -> bool:
        return self._emergency.matches(routing.dialled_number(request))

    # The ClearIP questions are the gate's (core/gate.py).
    @property
    def clearip_up(self) -> bool:
        return self.gate.up

    def admit(self, now: float) -> Admission:
        return self.gate.admit(now)

    @property
    def can_wait_for_link(self) -> bool:
        return self.gate.can_wait

    def hold_for_link(self, call: Call) -> None:
        self.gate.hold(call)

    def clearip_answered(self, now: float) -> None:
        self.gate.answered(now)

    def clearip_timed_out(self, now: float, *, probe: bool) -> None:
        self.gate.timed_out(now, probe=probe)

    def start_client(
        self, out: SipRequest, target: Target, key: tuple[str, str], owner: object, now: float
    ) -> ClientTransaction:
        return self._txns.start_client(out, target, key, owner, now)

    def abandon_client(self, ct: ClientTransaction) -> None:
        ct.terminate()
        self._txns.drop_client(ct)

    def send_cancel(self, invite: SipRequest, target: Target, now: float) -> None:
        self._txns.send_cancel(invite, target, now)

    def respond(self, st: ServerTransaction, resp: SipResponse, now: float) -> None:
        self._txns.respond(st, resp, now)

    def pass_upstream(self, st: ServerTransaction, resp: SipResponse, now: float) -> None:
        self._txns.pass_upstream(st, resp, now)

    def send(self, target: Target, data: bytes) -> None:
        self._send(target, data, None)

    def arm(self, call: Call, duration: float | None, now: float) -> None:
        self._wakeups.arm(call, duration, now)

    def call_finished(self, call: Call, status: int) -> None:
        """A call sent its final response: out of the table, into the metrics."""
        self._calls.pop(call.st.key, None)
        self.gate.forget(call)
        recorder = self.recorder
        if recorder is None:
            return
        recorder.record_call(call_record(call, status))
        self._gauge(names.IN_FLIGHT, float(len(self._calls)))

    def clearip_forbidden(self, now: float) -> None:
        self.gate.forbidden(now)

    def redirect_headers_ignored(self, names_: Sequence[str], now: float) -> None:
        """A redirect's Contact URIs carried headers the proxy never applies: counted each, and
        logged (names only) at most once a minute."""
        if self.recorder is not None:
            self.recorder.incr(names.REDIRECT_HEADERS_IGNORED, len(names_))
        if now - self._last_ignored_log >= 60:
            self._last_ignored_log = now
            shown = ", ".join(sorted({n[:40] for n in names_}))
            log.warning("ignored headers in ClearIP's redirect Contacts (never taken from a URI): %s", shown)

    # =========================================================================================
    # Metrics
    # =========================================================================================
    def _incr(self, spec: names.MetricSpec) -> None:
        if self.recorder is not None:
            self.recorder.incr(spec)

    def _gauge(self, spec: names.MetricSpec, value: float) -> None:
        if self.recorder is not None:
            self.recorder.set_gauge(spec, value)


def _malformed_reply(data: bytes, source: Target, exc: ParseError) -> tuple[Target, bytes] | None:
    """The ``exc.status_hint`` answer to a malformed request, and where it goes, when enough of it
    parses to reply (a Via, Call-ID, CSeq); None for a response or an unanswerable request."""
    req = try_parse_for_reply(data)
    if req is None:
        log.debug("dropped malformed message from %s: %s", source.host, exc.reason)
        return None
    resp = make_response(req, exc.status_hint, extra=[("Warning", f'399 clearip-proxy "{exc.reason[:100]}"')])
    try:
        target = response_target(req.top_via, source)
    except ParseError:  # e.g. a bad rport: the source address is where the client is
        target = source
    return target, resp.serialize()
