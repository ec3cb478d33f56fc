"""One initial INVITE's life: the ClearIP question, the redirect targets, the serial fork, the answer.

Owns: :class:`Call` — a state machine per initial INVITE (phases [``link`` ->] ``clearip`` ->
``fork`` -> ``done``; ``link``: held, bounded, while the adapter connects to ClearIP) with its
ClearIP leg, the carrier targets ClearIP returned (:class:`CarrierTarget`), one :class:`Branch` per
carrier attempt, the advance rules (DESIGN §2), the best response (RFC 3261 §16.7), its one timer
(the link wait, ClearIP / carrier ``timeout``, ring limit), late answers after the call moved on
(hung up: ACK + BYE), and the facts its :class:`CallRecord` reports.

Events come in as method calls (``start``, ``ask_clearip``, ``on_clearip_response``,
``on_branch_response``, ``on_clearip_failed``, ``on_branch_failed``, ``on_timer``, ``cancel``,
``link_failed``, ``clearip_lost``, ``abort``)
and act only through the narrow :class:`CallHost` the dispatcher gives it: start, abandon or
CANCEL a client transaction, respond, send statelessly, arm the call's timer, report the end.

Must not touch: the transaction tables, the timer structures, other calls, the network or the
clock (``now`` is an argument). Policy that needs no state lives in :mod:`routing`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy_runtime.core import routing
from proxy_runtime.core.breaker import Admission
from proxy_runtime.core.stamp import CLEARIP, Stamper, Target, stamp_forward, strip_own_via, target_for
from proxy_runtime.core.transactions import CANCEL_OWNER, Upstream
from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.metrics.records import CallRecord
from proxy_runtime.settings import Settings
from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import header_key, parse_name_addr
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.transaction import ClientTransaction, ServerTransaction, State
from proxy_runtime.sip.uri import UriError, parse_uri

Phase = Literal["link", "clearip", "fork", "done"]


class CallHost(Protocol):
    """What a call may ask of the dispatcher (implemented by :class:`~.proxy.ProxyCore`)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def stamper(self) -> Stamper: ...

    @property
    def clearip_up(self) -> bool: ...

    @property
    def clearip_target(self) -> Target: ...

    def is_emergency(self, request: SipRequest) -> bool: ...

    def admit(self, now: float) -> Admission: ...

    @property
    def can_wait_for_link(self) -> bool: ...

    def hold_for_link(self, call: Call) -> None: ...

    def clearip_answered(self, now: float) -> None: ...

    def clearip_timed_out(self, now: float, *, probe: bool) -> None: ...

    def start_client(
        self, out: SipRequest, target: Target, key: tuple[str, str], owner: object, now: float
    ) -> ClientTransaction: ...

    def abandon_client(self, ct: ClientTransaction) -> None: ...

    def send_cancel(self, invite: SipRequest, target: Target, now: float) -> None: ...

    def respond(self, st: ServerTransaction, resp: SipResponse, now: float) -> None: ...

    def pass_upstream(self, st: ServerTransaction, resp: SipResponse, now: float) -> None: ...

    def send(self, target: Target, data: bytes) -> None: ...

    def arm(self, call: Call, duration: float | None, now: float) -> None: ...

    def call_finished(self, call: Call, status: int) -> None: ...

    def clearip_forbidden(self, now: float) -> None: ...

    def redirect_headers_ignored(self, names: Sequence[str], now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class CarrierTarget:
    """Where one carrier attempt goes, as ClearIP's redirect named it (a Contact, or the
    configured emergency route): the Request-URI, held as text while the call waits (a parsed URI
    costs several times the memory), and the header fields that Contact's URI carried for this
    branch alone (RFC 3261 §19.1.1; unescaped, in order). :meth:`Branch.build` turns it into that
    branch's INVITE."""

    uri: str
    headers: tuple[tuple[str, str], ...] = ()


class Branch:
    """One carrier attempt of a serial fork: its INVITE (ClearIP's headers in, our Via and
    Record-Route on top), where it went, its client transaction and how far it got."""

    __slots__ = (
        "abandoned",
        "call",
        "cancel_sent",
        "ct",
        "key",
        "provisional",
        "request",
        "started",
        "target",
    )

    def __init__(
        self, call: Call, request: SipRequest, target: Target, key: tuple[str, str], started: float
    ) -> None:
        self.call = call
        self.request = request
        self.target = target
        self.key = key  # its client transaction's: (our branch, "INVITE")
        self.started = started
        self.ct: ClientTransaction | None = None
        self.provisional = False
        self.cancel_sent = False
        self.abandoned = False  # no provisional in time, or the call moved on: absorb what comes

    @classmethod
    def build(cls, call: Call, dest: CarrierTarget, now: float) -> Branch:
        """The INVITE for ``dest``: the call's (ClearIP's headers copied in), then the headers of
        this Contact's URI (replacing those of the same name), the Contact without its headers part
        as the Request-URI, no Route, our Record-Route and Via on top."""
        stamper = call.host.stamper
        uri = parse_uri(dest.uri)
        out = (call.base or call.request).copy()
        out.uri = str(uri)
        routing.apply_uri_headers(out, dest.headers)  # this Contact's own, over the 302's
        out.remove("route")
        target = target_for(uri)
        if (
            call.host.settings.large_over_tcp
            and target.transport == "udp"
            and len(out.body) + sum(len(h[2]) + len(h[1]) + 4 for h in out.headers) > 1300
        ):
            target = Target("tcp", target.host, target.port)
        inbound = call.source.transport
        stamper.add_record_route(
            out,
            inbound if inbound != CLEARIP else "tcp",
            target.transport,
            inbound_sips=inbound == "tls" and call.request.uri[:5].lower() == "sips:",
            outbound_sips=uri.scheme == "sips",
        )
        branch = stamper.new_branch(out)
        stamp_forward(out, stamper.via_for(target.transport, branch))
        return cls(call, out, target, (branch, "INVITE"), now)

    def send(self, now: float) -> bool:
        """Start its client transaction; False when it could not even start."""
        out = self.request
        self.ct = ct = self.call.host.start_client(out, self.target, self.key, self, now)
        if ct.terminated:
            return False
        out.forget_parsed()  # held while the call rings (maybe minutes): keep the text only
        return True

    def cancel(self, now: float) -> None:
        """CANCEL it now if it rang, else as soon as it does (RFC 3261 §9.1)."""
        if self.cancel_sent:
            return
        if self.provisional:
            self.cancel_sent = True
            self.call.host.send_cancel(self.request, self.target, now)
        else:
            self.abandoned = True  # CANCEL once a provisional arrives

    def hang_up(self, resp: SipResponse, now: float) -> None:
        """A 2xx we cannot pass up (the caller already has a final): ACK it and send BYE."""
        contact = resp.first_value("contact")
        if not contact:
            return
        try:
            remote = parse_uri(parse_name_addr(contact).uri)
        except (ParseError, UriError):
            return
        host = self.call.host
        stamper = host.stamper
        route_set = list(reversed(resp.values("record-route")))
        # Our own Record-Route entries are at the end of the callee's view; drop them.
        route_set = [r for r in route_set if not stamper.route_is_me(r)]
        target = stamper.next_hop_from(route_set, remote)
        cseq = self.request.cseq[0]
        for method, seq in (("ACK", cseq), ("BYE", cseq + 1)):
            req = SipRequest(method, str(remote))
            branch = stamper.new_branch(self.request) + method[0].lower()
            req.headers.append(["via", "Via", stamper.via_for(target.transport, branch)])
            for r in route_set:
                req.headers.append(["route", "Route", r])
            for h in self.request.headers:
                if h[0] in ("from", "call-id"):
                    req.headers.append(list(h))
            req.headers.append(["to", "To", resp.get("to") or ""])
            req.headers.append(["cseq", "CSeq", f"{seq} {method}"])
            req.headers.append(["max-forwards", "Max-Forwards", "70"])
            if method == "ACK":
                host.send(target, req.serialize())
            else:
                host.start_client(req, target, (branch, "BYE"), CANCEL_OWNER, now)


class Call:
    """An initial INVITE: its server transaction, the ClearIP leg and the carrier branches."""

    __slots__ = (
        "answered",
        "attempts",
        "base",
        "branch",
        "cancelled",
        "clearip_cancel_held",
        "clearip_ct",
        "clearip_latency_ms",
        "clearip_outcome",
        "clearip_request",
        "clearip_sent",
        "clearip_watch",
        "deadline",
        "emergency",
        "final_reason",
        "fork_until",
        "host",
        "identity",
        "next_target",
        "pai",
        "pdd_ms",
        "phase",
        "probe",
        "proxy_failed",
        "queue",
        "reason",
        "received",
        "request",
        "responses",
        "source",
        "st",
        "targets",
    )

    def __init__(
        self, host: CallHost, st: ServerTransaction, request: SipRequest, source: Target, received: float
    ) -> None:
        self.host = host
        self.st = st
        self.request = request
        self.source = source
        self.received = received
        self.phase: Phase = "clearip"
        self.deadline: float | None = None
        self.queue: float | None = None  # the duration queue holding it (see Timers.arm)
        self.clearip_ct: ClientTransaction | None = None
        self.clearip_request: SipRequest | None = None
        self.clearip_sent = 0.0
        # The caller cancelled while ClearIP had not answered: the call is over, but whether ClearIP
        # answers (the INVITE or the CANCEL) by the INVITE's `timeout` still feeds the breaker.
        self.clearip_watch = False
        self.clearip_cancel_held = False  # a CANCEL for ClearIP waits for its first provisional
        self.clearip_outcome: ClearIpOutcome | None = None
        self.clearip_latency_ms: float | None = None
        self.base: SipRequest | None = None  # the INVITE with ClearIP's headers copied in
        self.targets: list[CarrierTarget] = []
        self.next_target = 0
        self.fork_until = math.inf  # no new carrier attempt after this (ClearIP asked + fork_window)
        self.branch: Branch | None = None
        self.responses: list[SipResponse] = []
        self.attempts = 0
        self.cancelled = False
        self.answered = False
        self.pdd_ms: float | None = None
        self.emergency = False
        self.probe = False  # sent to ClearIP as the half-open breaker's probe
        self.proxy_failed = False
        self.reason = ""
        # For the record: ClearIP's Identity / P-Asserted-Identity values (read by metrics/stir.py)
        # and the reason phrase of the final sent to the caller ("Network Blocked": a 603+).
        self.identity: tuple[str, ...] = ()
        self.pai: tuple[str, ...] = ()
        self.final_reason = ""

    # =========================================================================================
    # Events
    # =========================================================================================
    def start(self, now: float) -> None:
        """The INVITE was accepted (100 Trying sent): route an emergency call, or ask ClearIP."""
        host = self.host
        s = host.settings
        req = self.request
        if host.is_emergency(req):
            self.emergency = True
            if s.emergency_action == "route" and s.emergency_route:
                self.phase = "fork"
                self.base = req
                self.targets = [CarrierTarget(str(parse_uri(s.emergency_route)))]
                self._advance(now)
            else:
                # Never wait on ClearIP for an emergency call: the switch takes its direct route.
                self.fail(503, "emergency call: use the direct emergency route", now, failed=False)
            return
        admission = host.admit(now)
        if admission is Admission.REJECT:
            # ClearIP is connected but not answering (brownout): 503 now, not after `timeout`.
            self.fail(503, "ClearIP not answering (breaker open)", now)
            return
        self.probe = admission is Admission.PROBE
        if not host.clearip_up:
            if not host.can_wait_for_link:
                self.clearip_outcome = ClearIpOutcome.UNAVAILABLE
                self.fail(503, "ClearIP unreachable", now)
                return
            # Held (bounded) while the adapter connects now, whatever its reconnect backoff:
            # ask_clearip when the link is up, link_failed when the connect failed.
            self.phase = "link"
            host.arm(self, s.link_wait, now)
            host.hold_for_link(self)
            return
        self.ask_clearip(now)

    def ask_clearip(self, now: float) -> None:
        """Send the INVITE to ClearIP (the link is up) and wait up to ``timeout`` for its answer."""
        if self.phase not in ("clearip", "link"):
            return
        self.phase = "clearip"
        host = self.host
        stamper = host.stamper
        target = host.clearip_target
        req = self.request
        branch = stamper.new_branch(req)
        out = stamper.prepare_forward(req, target, branch)
        self.clearip_request = out
        self.clearip_sent = now
        self.clearip_ct = host.start_client(out, target, (branch, "INVITE"), self, now)
        host.arm(self, host.settings.timeout, now)

    def link_failed(self, now: float) -> None:
        """The connect this call was held for failed (refused, TLS...): 503 at once."""
        if self.phase == "link":
            self.clearip_outcome = ClearIpOutcome.UNAVAILABLE
            self.fail(503, "ClearIP unreachable", now)

    def on_clearip_response(self, resp: SipResponse, now: float) -> None:
        status = resp.status
        if self.clearip_cancel_held:
            # The CANCEL held back until ClearIP sent a provisional (RFC 3261 §9.1): send it now,
            # so the INVITE there ends (487, or Timer C after 64*T1); after a final none is needed.
            self.clearip_cancel_held = False
            request, self.clearip_request = self.clearip_request, None  # kept for it (_release)
            if status < 200 and request is not None:
                self.host.send_cancel(request, self.host.clearip_target, now)
        if status >= 200 and self.clearip_watch:
            # A call the caller cancelled: ClearIP answered after all (its 487 to our CANCEL, or
            # what it had already sent). Nothing goes to the caller, but ClearIP is alive.
            self.clearip_watch = False
            self.host.arm(self, None, now)
            self.host.clearip_answered(now)
            return
        if status < 200 or self.phase != "clearip":
            return
        host = self.host
        self.clearip_latency_ms = (now - self.clearip_sent) * 1000.0
        self.clearip_outcome = routing.clearip_outcome(status)
        self.clearip_request = None  # answered: nothing left to CANCEL there; free it
        self.clearip_ct = None
        host.clearip_answered(now)  # any final: ClearIP is answering (the breaker closes)
        if status == 403:
            host.clearip_forbidden(now)
        if status not in host.settings.redirect_codes:
            # DESIGN §2: any final but a followed redirect is relayed, 6xx (603, 607, 608) with
            # their Reason and Call-Info untouched; a 503 without its Retry-After (ClearIP briefly
            # unavailable must not make the switch shun the proxy for every call).
            relayed = routing.drop_server_retry_after(strip_own_via(resp))
            self._finish(relayed, now, reason=f"ClearIP {status}")
            return
        redirect = routing.redirect_targets(resp)
        ignored = [name for t in redirect.targets for name in t.ignored]
        if ignored:
            host.redirect_headers_ignored(ignored, now)
        if not redirect.targets:
            # Never relay it: the switch would chase the redirect (or fail the call) itself. A 503
            # with the cause, as for the other ClearIP faults, makes it route-advance.
            self.clearip_outcome = ClearIpOutcome.REDIRECT_UNUSABLE
            self.fail(503, f"ClearIP {status} without a usable Contact ({redirect.why_unusable})", now)
            return
        self.phase = "fork"
        base = self.request.copy()
        routing.copy_headers(resp, base, host.settings.copy_headers)
        self.identity = tuple(resp.get_all("identity"))
        self.pai = tuple(resp.get_all("p-asserted-identity"))
        self.base = base
        self.request = base  # same Via/From/To/Call-ID/CSeq for our responses: drop the original
        limit = host.settings.max_contacts
        self.targets = [CarrierTarget(str(t.uri), t.headers) for t in redirect.targets[:limit]]
        # From when ClearIP was asked: its PASSporT's iat is no older than that.
        self.fork_until = self.clearip_sent + host.settings.fork_window
        host.arm(self, None, now)
        self._advance(now)

    def on_clearip_failed(self, ct: ClientTransaction, text: str, now: float) -> None:
        """The ClearIP leg timed out or could not be sent."""
        if self.phase == "clearip" and ct is self.clearip_ct:
            self.clearip_outcome = ClearIpOutcome.UNAVAILABLE
            self.fail(503, f"ClearIP {text}", now)

    def on_branch_response(self, br: Branch, resp: SipResponse, now: float) -> None:
        host = self.host
        status = resp.status
        if br.abandoned or self.branch is not br:
            # A branch we gave up on: cancel it if it rings; hang up if it answers, so the call
            # is never connected twice.
            if status < 200:
                if not br.cancel_sent:
                    br.cancel_sent = True
                    host.send_cancel(br.request, br.target, now)
            elif status < 300 and not (self.answered and self.branch is br):
                br.hang_up(resp, now)
            return
        if status < 200:
            if not br.provisional:
                br.provisional = True
                if self.cancelled:
                    br.cancel(now)
                    return
                host.arm(self, host.settings.ring_timeout, now)
            if status > 100:
                if self.pdd_ms is None:
                    self.pdd_ms = (now - self.received) * 1000.0
                host.pass_upstream(self.st, resp, now)
            return
        if status < 300:
            if self.cancelled or self.phase == "done":
                if not self.answered:
                    br.hang_up(resp, now)  # answered after the caller cancelled
                else:
                    host.pass_upstream(self.st, resp, now)  # 2xx retransmission
                return
            self.answered = True
            self._finish(strip_own_via(resp), now, reason=f"answered by carrier {self.attempts}")
            return
        # A failure from this Contact.
        if self.phase == "done":
            return
        if status < 400:
            # A carrier's 3xx: a failed branch, its Contacts not followed. Never relayed (the
            # switch could call that carrier directly, unsigned): counted as a 503 naming it, as a
            # transport error is, so with nothing better the switch route-advances.
            self.responses.append(self._synth(503, f"carrier {status} redirect not followed"))
        else:
            self.responses.append(strip_own_via(resp))
        if not self.cancelled and routing.should_advance(status, advance_on_4xx=host.settings.advance_on_4xx):
            self._advance(now)
        else:
            self._finish_best(now)

    def on_branch_failed(self, br: Branch, status: int, text: str, now: float) -> None:
        """A carrier attempt timed out or could not be sent: try the next one."""
        if self.branch is not br or br.abandoned or self.phase != "fork":
            return
        br.abandoned = True
        self.responses.append(self._synth(503 if status != 408 else 408, f"carrier {text}"))
        if self.cancelled:
            self._finish_best(now)
        else:
            self._advance(now)

    def on_timer(self, now: float) -> None:
        self.deadline = None
        if self.clearip_watch:
            # Cancelled by the caller, and ClearIP answered neither the INVITE nor (if one went) the CANCEL
            # within `timeout`: a ClearIP timeout like any other for the breaker (a switch whose
            # own post-dial timer is shorter than `timeout` must not hide a silent ClearIP).
            self.clearip_watch = False
            if self.host.clearip_up:
                self.host.clearip_timed_out(now, probe=self.probe)
        elif self.phase == "link":
            # The link did not come up within the bounded wait (a connect that hangs).
            self.clearip_outcome = ClearIpOutcome.UNAVAILABLE
            wait = self.host.settings.link_wait
            self.fail(503, f"ClearIP unreachable (no connection within {wait:g} s)", now)
        elif self.phase == "clearip":
            # No answer from ClearIP within `timeout`: 503 so the switch route-advances.
            self.clearip_outcome = ClearIpOutcome.TIMEOUT
            self.host.clearip_timed_out(now, probe=self.probe)
            self._cancel_clearip(now)
            self.fail(503, f"ClearIP did not answer within {self.host.settings.timeout:g} s", now)
        elif self.phase == "fork" and self.branch is not None:
            br = self.branch
            if not br.provisional:
                # No provisional response from this Contact within `timeout`: advance.
                br.abandoned = True
                self.responses.append(self._synth(408, "No response from carrier"))
                self._advance(now)
            else:
                # Rang past the ring limit: cancel and give up (ringing again elsewhere would
                # ring the same callee twice).
                br.cancel(now)
                br.abandoned = True
                self.responses.append(self._synth(408, "Ring timeout"))
                self._finish_best(now)

    def cancel(self, now: float) -> None:
        """The caller CANCELled: CANCEL ClearIP (if it rang) or the live branch, 487 to the caller."""
        if self.st.has_final or self.phase == "done":
            return
        self.cancelled = True
        if self.phase == "clearip" and self.clearip_request is not None:
            self._cancel_clearip(now)
            self.clearip_watch = True  # the INVITE's `timeout` stays armed (see _finish)
        br = self.branch
        if br is not None and not br.abandoned:
            br.cancel(now)
        resp = make_response(self.request, 487, to_tag=self.host.stamper.instance)
        self._finish(resp, now, reason="cancelled by caller")

    def clearip_lost(self, now: float) -> None:
        """The ClearIP connection went down: a call still waiting on it gets 503 at once."""
        if self.phase == "clearip" and self.clearip_ct is not None:
            self.host.abandon_client(self.clearip_ct)
            self.clearip_outcome = ClearIpOutcome.UNAVAILABLE
            self.fail(503, "ClearIP connection lost", now)

    def abort(self, now: float) -> None:
        """The end of a drain: CANCEL what is live and answer 503 with Retry-After."""
        if self.phase == "clearip":
            self._cancel_clearip(now)
        if self.branch is not None and not self.branch.abandoned:
            self.branch.cancel(now)
        self.fail(503, "proxy restarting", now, retry_after=True)

    def _cancel_clearip(self, now: float) -> None:
        """CANCEL the INVITE sent to ClearIP, but only once ClearIP sent a provisional (RFC 3261
        §9.1: a CANCEL MUST NOT be sent before one). ClearIP, a redirect server, answers finals
        alone (no 100 Trying when it answers within 200 ms), so usually nothing goes: its final
        still comes, is ACKed by the client transaction, and is not relayed (the call is over);
        with no answer, Timer B ends the transaction. A CANCEL wanted before a provisional is held
        and sent when one arrives (:meth:`on_clearip_response`): in Proceeding no Timer B ends the
        INVITE there, the CANCEL's Timer C does."""
        ct = self.clearip_ct
        if ct is None or self.clearip_request is None:
            return
        if ct.state is State.PROCEEDING:
            self.host.send_cancel(self.clearip_request, self.host.clearip_target, now)
        elif ct.state is State.CALLING:
            self.clearip_cancel_held = True  # _release keeps the request for it

    def server_ended(self) -> None:
        """Its server transaction ended: let go of the client transactions (reference cycles)."""
        self.branch = None
        self.clearip_ct = None

    # =========================================================================================
    # The fork
    # =========================================================================================
    def _advance(self, now: float) -> None:
        """Start the next carrier attempt, or finish with the best response."""
        while self.next_target < len(self.targets) and not self.cancelled:
            if self.attempts and now > self.fork_until:
                # The redirect's PASSporT is too old for another carrier. 503, not the best
                # response: the Contacts left untried mean the switch should route-advance (and
                # get a fresh PASSporT from ClearIP), which a 404 or 486 from a carrier the proxy
                # advanced past would stop. A 6xx never gets here: it ends the fork at once.
                window = self.host.settings.fork_window
                self.fail(503, f"fork window ({window:g} s) passed", now, failed=False)
                return
            dest = self.targets[self.next_target]
            self.next_target += 1
            self.attempts += 1
            self.branch = br = Branch.build(self, dest, now)
            if not br.send(now):
                continue
            (self.base or self.request).forget_parsed()
            self.host.arm(self, self.host.settings.timeout, now)
            return
        self._finish_best(now)

    # =========================================================================================
    # The end
    # =========================================================================================
    def fail(
        self, status: int, text: str, now: float, *, retry_after: bool = False, failed: bool = True
    ) -> None:
        """The proxy itself ends the call: ``status`` with a Reason header naming the cause."""
        extra = [("Reason", f'SIP;cause={status};text="{text}"')]
        if retry_after:
            extra.append(("Retry-After", "5"))
        self.proxy_failed = failed
        resp = make_response(self.request, status, to_tag=self.host.stamper.instance, extra=extra)
        self._finish(resp, now, reason=text)

    def _finish_best(self, now: float) -> None:
        best = routing.best_response(self.responses)
        if best is None:
            self.fail(503, "no usable carrier route", now)
            return
        best = routing.drop_server_retry_after(best)  # a copy (strip_own_via) or our own
        self._finish(best, now, reason=f"all {self.attempts} carrier attempt(s) failed")

    def _finish(self, resp: SipResponse, now: float, *, reason: str) -> None:
        """Send the call's final response (once), report the end and let go of what is done."""
        if self.phase == "done":
            return
        self.phase = "done"
        host = self.host
        if not self.clearip_watch:
            host.arm(self, None, now)
        host.respond(self.st, resp, now)
        if self.pdd_ms is None:
            self.pdd_ms = (now - self.received) * 1000.0
        self.reason = reason
        self.final_reason = resp.reason
        host.call_finished(self, resp.status)
        self._release()

    def _release(self) -> None:
        """The call has its final response: keep only what its transactions still need.

        The server transaction absorbs retransmissions and ACKs by itself. The winning branch's
        client transaction passes 2xx retransmissions straight to it (:class:`Upstream`). Branches
        still live (cancelled, abandoned) keep their own request and the call, for late answers."""
        self.st.owner = None
        br, self.branch = self.branch, None
        if self.answered and br is not None and br.ct is not None and br.ct.owner is br:
            br.ct.owner = Upstream(self.st)
            br.ct = None
        self.base = None
        if not self.clearip_cancel_held:
            self.clearip_request = None
        self.responses = []
        self.targets = []

    def _synth(self, status: int, text: str) -> SipResponse:
        return make_response(
            self.request,
            status,
            to_tag=self.host.stamper.instance,
            extra=[("Reason", f'SIP;cause={status};text="{text}"')],
        )


def _stir_headers(call: Call) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ClearIP's Identity and P-Asserted-Identity for the call as it went out: the 302's, or those
    the last Contact tried carried in its URI (RFC 3261 §19.1.1), which replaced them on its branch."""
    identity, pai = call.identity, call.pai
    if 0 < call.next_target <= len(call.targets):
        own = call.targets[call.next_target - 1].headers
        if own:
            keys = [(header_key(n), v) for n, v in own]
            identity = tuple(v for k, v in keys if k == "identity") or identity
            pai = tuple(v for k, v in keys if k == "p-asserted-identity") or pai
    return identity, pai


def call_record(call: Call, status: int) -> CallRecord:
    """The call's metrics record (the per-call line masks the numbers unless ``log_numbers``)."""
    request = call.request
    number = routing.dialled_number(request) or ""
    try:
        caller = parse_uri(parse_name_addr(request.get("from") or "").uri).user or ""
    except (ParseError, UriError):
        caller = ""
    identity, pai = _stir_headers(call)
    br = call.branch
    return CallRecord(
        call_id=request.call_id,
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
        identity=identity,
        pai=pai,
        final_reason=call.final_reason,
        carrier=f"{br.target.host}:{br.target.port}" if br is not None else "",
    )
