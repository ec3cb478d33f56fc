"""A Call alone: events in, actions out, through a fake CallHost (no ProxyCore, no transactions
table, no timers structure), in the manner of h11's tests of its state machine.

What the host records is everything the call asked for, so these tests pin down the call's
decisions (who is asked, in what order, what the caller gets, what is CANCELled, what is armed)
independently of the dispatcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from proxy_runtime.core.breaker import Admission
from proxy_runtime.core.call import Branch, Call
from proxy_runtime.core.routing import EmergencyMatcher
from proxy_runtime.core.stamp import CLEARIP, Stamper, Target
from proxy_runtime.settings import Settings, load
from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message
from proxy_runtime.sip.transaction import ClientTransaction, ServerTransaction
from tests.unit.test_proxy_core import CARRIER_A, CARRIER_B, invite, redirect

SWITCH = Target("udp", "10.0.0.5", 5060)
CLEARIP_TARGET = Target(CLEARIP, "sip.clearip.example", 5061)


def stamper() -> Stamper:
    return Stamper(
        advertise="203.0.113.7", ports={"udp": 5060}, own_hosts=(), instance="t35t", clearip_transport="tls"
    )


@dataclass
class FakeHost:
    """A CallHost that records every action as a tuple."""

    settings: Settings
    clearip_up: bool = True
    stamper: Stamper = field(default_factory=stamper)
    clearip_target: Target = CLEARIP_TARGET
    actions: list[tuple[object, ...]] = field(default_factory=list)
    sent: list[SipRequest] = field(default_factory=list)

    def is_emergency(self, request: SipRequest) -> bool:
        return EmergencyMatcher(self.settings.emergency_numbers).matches(request.parsed_uri.user)

    # The breaker and the link wait are ProxyCore's (tested in test_breaker / test_outage_core):
    # here every call is admitted and a down link is not waited for.
    def admit(self, now: float) -> Admission:
        return Admission.SEND

    @property
    def can_wait_for_link(self) -> bool:
        return False

    def hold_for_link(self, call: Call) -> None:
        raise AssertionError("can_wait_for_link is False: a call must not be held")

    def clearip_answered(self, now: float) -> None:
        pass

    def clearip_timed_out(self, now: float, *, probe: bool) -> None:
        pass

    def start_client(
        self, out: SipRequest, target: Target, key: tuple[str, str], owner: object, now: float
    ) -> ClientTransaction:
        self.actions.append(("client", target, out.method))
        self.sent.append(out)
        ct = ClientTransaction(key, out.serialize(), lambda d: None, invite=True, reliable=True, now=now)
        ct.owner = owner
        return ct

    def abandon_client(self, ct: ClientTransaction) -> None:
        self.actions.append(("abandon", ct.key))

    def send_cancel(self, invite: SipRequest, target: Target, now: float) -> None:
        self.actions.append(("cancel", target))

    def respond(self, st: ServerTransaction, resp: SipResponse, now: float) -> None:
        self.actions.append(("respond", resp.status, resp.get("reason")))

    def pass_upstream(self, st: ServerTransaction, resp: SipResponse, now: float) -> None:
        self.actions.append(("upstream", resp.status))

    def send(self, target: Target, data: bytes) -> None:
        self.actions.append(("send", target))

    def arm(self, call: Call, duration: float | None, now: float) -> None:
        self.actions.append(("arm", duration))

    def call_finished(self, call: Call, status: int) -> None:
        self.actions.append(("finished", status, call.reason))

    def clearip_forbidden(self, now: float) -> None:
        self.actions.append(("forbidden",))

    def redirect_headers_ignored(self, names: Sequence[str], now: float) -> None:
        self.actions.append(("ignored", tuple(names)))

    def take(self) -> list[tuple[object, ...]]:
        out, self.actions = self.actions, []
        return out


def new_call(**overrides: object) -> tuple[Call, FakeHost]:
    settings = replace(load(environ={}), timeout=5.0, ring_timeout=180.0, **overrides)  # type: ignore[arg-type]
    host = FakeHost(settings)
    req = parse_message(invite(), datagram=True)
    assert isinstance(req, SipRequest)
    st = ServerTransaction(
        ("z9hG4bKsw1", "10.0.0.5:5060", "INVITE"), lambda d: None, invite=True, reliable=False
    )
    call = Call(host, st, req, SWITCH, 0.0)
    st.owner = call
    return call, host


def reply(req: SipRequest, status: int, *, to_tag: str = "far") -> SipResponse:
    return make_response(req, status, to_tag=to_tag)


def asked_clearip(call: Call, host: FakeHost) -> SipRequest:
    call.start(0.0)
    assert host.take() == [("client", host.clearip_target, "INVITE"), ("arm", 5.0)]
    return host.sent[-1]


def forked(call: Call, host: FakeHost) -> SipResponse:
    """Ask ClearIP and feed the call its 302 (two Contacts, B at q=0.9 before A at q=0.5)."""
    resp = parse_message(redirect(asked_clearip(call, host)), datagram=True)
    assert isinstance(resp, SipResponse)
    call.on_clearip_response(resp, 0.05)
    return resp


def test_a_302_forks_in_q_order_advances_on_503_and_returns_the_best_response() -> None:
    call, host = new_call()
    resp = forked(call, host)
    assert host.take() == [("arm", None), ("client", Target("udp", *CARRIER_B), "INVITE"), ("arm", 5.0)]
    first = host.sent[-1]
    assert first.get_all("identity") == resp.get_all("identity")  # ClearIP's headers copied in
    assert isinstance(call.branch, Branch)
    call.on_branch_response(call.branch, reply(first, 503), 0.1)
    assert host.take() == [("client", Target("udp", CARRIER_A[0], 5060), "INVITE"), ("arm", 5.0)]
    call.on_branch_response(call.branch, reply(host.sent[-1], 486), 0.2)
    actions = host.take()
    assert actions[:2] == [("arm", None), ("respond", 486, None)]  # 486 beats 503 (RFC 3261 §16.7)
    assert actions[2] == ("finished", 486, "all 2 carrier attempt(s) failed")
    assert call.phase == "done" and call.attempts == 2 and call.branch is None


def test_caller_cancel_while_ringing_cancels_the_branch_and_answers_487() -> None:
    call, host = new_call()
    forked(call, host)
    host.take()
    br = call.branch
    assert br is not None
    call.on_branch_response(br, reply(br.request, 180), 0.3)
    assert host.take() == [("arm", 180.0), ("upstream", 180)]  # the ring limit replaces `timeout`
    call.cancel(0.4)
    assert host.take() == [
        ("cancel", Target("udp", *CARRIER_B)),
        ("arm", None),
        ("respond", 487, None),
        ("finished", 487, "cancelled by caller"),
    ]
    # The carrier answers anyway: it is hung up (ACK + BYE), never connected to the caller.
    ok = reply(br.request, 200)
    ok.add("Contact", f"<sip:callee@{CARRIER_B[0]}:{CARRIER_B[1]}>")
    call.on_branch_response(br, ok, 0.5)
    assert [a[0] for a in host.take()] == ["send", "client"]
    assert [m.method for m in host.sent[-1:]] == ["BYE"]


def test_clearip_silent_past_timeout_is_cancelled_and_the_caller_gets_503_with_a_reason() -> None:
    """503 at ``timeout``; the ClearIP INVITE is CANCELled only if ClearIP sent a provisional
    (RFC 3261 §9.1: no CANCEL before one)."""
    call, host = new_call()
    asked_clearip(call, host)
    call.on_timer(5.0)
    actions = host.take()
    assert ("cancel", host.clearip_target) not in actions
    assert ("respond", 503, 'SIP;cause=503;text="ClearIP did not answer within 5 s"') in actions
    assert call.clearip_outcome is not None and call.clearip_outcome.name == "TIMEOUT"
    call, host = new_call()
    req = asked_clearip(call, host)
    trying = reply(req, 100)
    assert call.clearip_ct is not None
    call.clearip_ct.receive_response(trying, 100, 0.1)  # as the dispatcher does, then the call
    call.on_clearip_response(trying, 0.1)
    call.on_timer(5.0)
    actions = host.take()
    assert actions[0] == ("cancel", host.clearip_target)
    assert actions[2] == ("respond", 503, 'SIP;cause=503;text="ClearIP did not answer within 5 s"')


def test_clearip_down_answers_503_without_asking_and_emergency_never_asks() -> None:
    call, host = new_call()
    host.clearip_up = False
    call.start(0.0)
    assert [a[:2] for a in host.take()] == [("arm", None), ("respond", 503), ("finished", 503)]
    call, host = new_call()
    call.request.uri = "sip:911@acme.sip.clearip.com"
    call.start(0.0)
    assert ("client", host.clearip_target, "INVITE") not in host.take()
    assert call.emergency and not call.proxy_failed


def test_contact_uri_headers_go_to_their_branch_and_ignored_ones_are_reported() -> None:
    call, host = new_call()
    req = asked_clearip(call, host)
    contacts = (
        f"<sip:+15551234567@{CARRIER_B[0]}:{CARRIER_B[1]}?Identity=id-b%3Bppt%3Dshaken&Via=forged>;q=0.9, "
        f"<sip:+15551234567@{CARRIER_A[0]}>;q=0.5"
    )
    raw = redirect(req).replace(b"Contact: ", f"Contact: {contacts}\r\nX-Old-Contact: ".encode(), 1)
    resp = parse_message(raw, datagram=True)
    assert isinstance(resp, SipResponse)
    call.on_clearip_response(resp, 0.05)
    acts = host.take()
    assert ("ignored", ("Via",)) in acts
    first = host.sent[-1]
    assert first.uri == f"sip:+15551234567@{CARRIER_B[0]}:{CARRIER_B[1]}"
    assert first.get_all("identity") == ["id-b;ppt=shaken"]
    branch = call.branch
    assert branch is not None
    call.on_branch_response(branch, reply(first, 503), 0.1)
    second = host.sent[-1]
    assert second.uri == f"sip:+15551234567@{CARRIER_A[0]}"
    assert len(second.get_all("identity")) == 2 and "id-b" not in second.serialize().decode()  # the 302's
