"""The proxy core, sans-I/O: bytes in, (target, bytes) out, on a fake clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy_runtime.core.proxy import CLEARIP, ProxyCore, Target
from proxy_runtime.settings import load
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message

SWITCH = Target("udp", "10.0.0.5", 5060)
CARRIER_A = ("192.0.2.10", 5060)
CARRIER_B = ("198.51.100.20", 5080)
IDENTITY_1 = "eyJhbGciOiJFUzI1NiJ9." + "A" * 700 + ";info=<https://cert.example/c.pem>;alg=ES256;ppt=shaken"
IDENTITY_2 = "eyJhbGciOiJFUzI1NiJ9." + "B" * 700 + ';info=<https://cert.example/c.pem>;alg=ES256;ppt="div"'


class Net:
    def __init__(self) -> None:
        self.sent: list[tuple[Target, bytes, object]] = []

    def __call__(self, target: Target, data: bytes, key: object) -> None:
        self.sent.append((target, data, key))

    def take(self) -> list[tuple[Target, SipRequest | SipResponse]]:
        out = [(t, parse_message(d, datagram=False)) for t, d, _ in self.sent]
        self.sent.clear()
        return out  # type: ignore[return-value]


def make_core(**overrides: object) -> tuple[ProxyCore, Net]:
    s = load(environ={}, overrides={"allow": ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24"], "timeout": 5})
    if overrides:
        s = replace(s, **overrides)  # type: ignore[arg-type]
    net = Net()
    core = ProxyCore(s, net, advertise="203.0.113.7", ports={"udp": 5060, "tcp": 5060}, instance="t35t")
    core.set_clearip_up(True, 0.0)
    return core, net


def invite(number: str = "+15551234567", branch: str = "z9hG4bKsw1", extra: str = "") -> bytes:
    body = (
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    )
    head = (
        f"INVITE sip:{number}@acme.sip.clearip.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.5:5060;branch={branch}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:+12125550100@10.0.0.5>;tag=sw1\r\n"
        f"To: <sip:{number}@acme.sip.clearip.com>\r\n"
        "Call-ID: call-1@10.0.0.5\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:+12125550100@10.0.0.5:5060>\r\n"
        "Identity: old-identity-from-switch\r\n"
        f"{extra}"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def response_to(req: SipRequest, status: int, reason: str, extra: str = "", to_tag: str = "far") -> bytes:
    vias = "".join(f"Via: {v}\r\n" for v in req.values("via"))
    to = req.get("to") or ""
    if status > 100 and ";tag=" not in to:
        to += f";tag={to_tag}"
    return (
        f"SIP/2.0 {status} {reason}\r\n{vias}From: {req.get('from')}\r\nTo: {to}\r\n"
        f"Call-ID: {req.call_id}\r\nCSeq: {req.get('cseq')}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def redirect(req: SipRequest) -> bytes:
    extra = (
        f"Identity: {IDENTITY_1}\r\nIdentity: {IDENTITY_2}\r\n"
        'P-Asserted-Identity: "[V] Alice" <sip:+12125550100@acme.example;verstat=TN-Validation-Passed>\r\n'
        f"Contact: <sip:+15551234567@{CARRIER_A[0]}>;q=0.5, "
        f"<sip:+15551234567@{CARRIER_B[0]}:{CARRIER_B[1]}>;q=0.9\r\n"
    )
    return response_to(req, 302, "Moved Temporarily", extra, to_tag="cip")


def to_clearip(core: ProxyCore, net: Net, now: float = 0.0, data: bytes | None = None) -> SipRequest:
    core.receive(data or invite(), SWITCH, now)
    out = net.take()
    assert [type(m).__name__ for _, m in out] == ["SipResponse", "SipRequest"]
    trying = out[0][1]
    assert isinstance(trying, SipResponse) and trying.status == 100
    target, req = out[1]
    assert target.transport == CLEARIP
    assert isinstance(req, SipRequest)
    return req


def clearip_reply(core: ProxyCore, data: bytes, now: float) -> None:
    core.receive(data, Target(CLEARIP, "127.0.0.1", 5061, 1), now)


def test_invite_goes_to_clearip_with_request_uri_unchanged() -> None:
    core, net = make_core()
    req = to_clearip(core, net)
    assert req.uri == "sip:+15551234567@acme.sip.clearip.com"
    assert req.get("max-forwards") == "69"
    assert req.top_via.host == "203.0.113.7"
    assert req.top_via.transport == "TLS"
    assert len(req.values("via")) == 2
    assert core.in_flight == 1


def test_302_copies_identity_headers_and_forks_in_q_order() -> None:
    core, net = make_core()
    req = to_clearip(core, net)
    clearip_reply(core, redirect(req), 0.05)
    out = net.take()
    ack = [m for t, m in out if t.transport == CLEARIP]
    assert len(ack) == 1 and isinstance(ack[0], SipRequest) and ack[0].method == "ACK"
    carrier = [(t, m) for t, m in out if t.transport != CLEARIP]
    assert len(carrier) == 1
    target, fwd = carrier[0]
    assert (target.host, target.port) == CARRIER_B  # q=0.9 first
    assert isinstance(fwd, SipRequest)
    assert fwd.uri == f"sip:+15551234567@{CARRIER_B[0]}:{CARRIER_B[1]}"
    assert fwd.get_all("identity") == [IDENTITY_1, IDENTITY_2]  # byte for byte, both, old one replaced
    assert "verstat=TN-Validation-Passed" in (fwd.get("p-asserted-identity") or "")
    assert fwd.get_all("record-route") == ["<sip:203.0.113.7:5060;lr>"]
    assert fwd.body.startswith(b"v=0")


def advance_to_carrier(core: ProxyCore, net: Net) -> tuple[SipRequest, SipRequest]:
    req = to_clearip(core, net)
    clearip_reply(core, redirect(req), 0.05)
    fwd = next(m for t, m in net.take() if t.transport != CLEARIP)
    assert isinstance(fwd, SipRequest)
    return req, fwd


def test_carrier_503_advances_to_next_contact_then_200_reaches_switch() -> None:
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    core.receive(response_to(first, 503, "Service Unavailable"), Target("udp", *CARRIER_B), 0.1)
    out = net.take()
    assert isinstance(out[0][1], SipRequest) and out[0][1].method == "ACK"  # hop-by-hop ACK of the 503
    target, second = out[1]
    assert (target.host, target.port) == (CARRIER_A[0], 5060)
    assert isinstance(second, SipRequest) and second.method == "INVITE"
    assert second.get_all("identity") == [IDENTITY_1, IDENTITY_2]
    core.receive(response_to(second, 180, "Ringing"), Target("udp", CARRIER_A[0], 5060), 0.2)
    core.receive(
        response_to(second, 200, "OK", "Contact: <sip:callee@192.0.2.10>\r\n"),
        Target("udp", CARRIER_A[0], 5060),
        0.3,
    )
    up = [m for t, m in net.take() if t == SWITCH]
    assert [m.status for m in up if isinstance(m, SipResponse)] == [180, 200]
    assert len(up[-1].values("via")) == 1  # our Via removed
    assert core.in_flight == 0


def test_no_provisional_within_timeout_advances() -> None:
    core, net = make_core()
    advance_to_carrier(core, net)
    core.handle_timer(4.9)
    out = net.take()
    # Timer A retransmits to carrier B over UDP meanwhile; carrier A is not tried yet.
    assert {t.host for t, m in out if isinstance(m, SipRequest)} == {CARRIER_B[0]}
    core.handle_timer(5.06)
    invites = [
        (t, m)
        for t, m in net.take()
        if isinstance(m, SipRequest) and m.method == "INVITE" and t.host == CARRIER_A[0]
    ]
    assert len(invites) == 1


def test_all_contacts_fail_returns_best_response() -> None:
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    core.receive(response_to(first, 503, "Service Unavailable"), Target("udp", *CARRIER_B), 0.1)
    second = next(m for t, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
    core.receive(response_to(second, 486, "Busy Here"), Target("udp", CARRIER_A[0], 5060), 0.2)
    finals = [m for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse) and m.status >= 200]
    assert [m.status for m in finals] == [486]  # 4xx beats 5xx


def test_6xx_from_carrier_stops_the_fork() -> None:
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    core.receive(response_to(first, 603, "Decline"), Target("udp", *CARRIER_B), 0.1)
    out = net.take()
    assert not [m for t, m in out if isinstance(m, SipRequest) and m.method == "INVITE"]
    assert [m.status for t, m in out if t == SWITCH and isinstance(m, SipResponse)] == [603]


def test_carriers_503_with_retry_after_reaches_the_switch_without_it() -> None:
    # RFC 3261 §21.5.4, §16.7 step 6: a carrier's Retry-After on 503 says that carrier is down;
    # relayed, the switch would take it as saying so of the proxy and shun it for every call.
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    reason = 'Reason: Q.850;cause=34;text="No circuit/channel available"\r\n'
    core.receive(
        response_to(first, 503, "Service Unavailable", f"Retry-After: 300\r\n{reason}"),
        Target("udp", *CARRIER_B),
        0.1,
    )
    second = next(m for t, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
    core.receive(
        response_to(second, 503, "Service Unavailable", f"{reason}Retry-After: 600 (maintenance)\r\n"),
        Target("udp", CARRIER_A[0], 5060),
        0.2,
    )
    finals = [m for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse) and m.status >= 200]
    assert [m.status for m in finals] == [503]  # still 503: the switch route-advances
    assert finals[0].get_all("retry-after") == []
    assert finals[0].get("reason") == 'Q.850;cause=34;text="No circuit/channel available"'
    assert finals[0].call_id == "call-1@10.0.0.5" and len(finals[0].values("via")) == 1


def test_carriers_486_keeps_its_retry_after() -> None:
    # On a 486 (and 480, 404, 500, 6xx) Retry-After is about this callee: relayed as it came.
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    core.receive(response_to(first, 503, "Service Unavailable"), Target("udp", *CARRIER_B), 0.1)
    second = next(m for t, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
    core.receive(
        response_to(second, 486, "Busy Here", "Retry-After: 30\r\n"), Target("udp", CARRIER_A[0], 5060), 0.2
    )
    finals = [m for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse) and m.status >= 200]
    assert [(m.status, m.get("retry-after")) for m in finals] == [(486, "30")]


def test_clearip_503_with_retry_after_is_relayed_without_it() -> None:
    # ClearIP briefly unavailable (or "no route" for this number) must not make the switch stop
    # sending the proxy any call for Retry-After seconds: the 503 is relayed, its Retry-After not.
    core, net = make_core()
    req = to_clearip(core, net)
    extra = 'Retry-After: 120\r\nReason: SIP;cause=503;text="no route"\r\n'
    clearip_reply(core, response_to(req, 503, "Service Unavailable", extra), 0.05)
    up = [m for t, m in net.take() if t == SWITCH]
    assert len(up) == 1 and isinstance(up[0], SipResponse) and up[0].status == 503
    assert up[0].get_all("retry-after") == []
    assert up[0].get("reason") == 'SIP;cause=503;text="no route"'


def test_a_carriers_302_advances_to_the_next_contact_not_its_own() -> None:
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    elsewhere = "Contact: <sip:+15551234567@203.0.113.99>\r\n"
    core.receive(response_to(first, 302, "Moved Temporarily", elsewhere), Target("udp", *CARRIER_B), 0.1)
    out = net.take()
    assert not [m for t, m in out if t == SWITCH and isinstance(m, SipResponse) and m.status >= 200]
    assert [(t.host, m.method) for t, m in out if isinstance(m, SipRequest)] == [
        (CARRIER_B[0], "ACK"),  # hop-by-hop ACK of the 302
        (CARRIER_A[0], "INVITE"),  # the next Contact of ClearIP's 302, never 203.0.113.99
    ]
    second = next(m for t, m in out if isinstance(m, SipRequest) and m.method == "INVITE")
    assert second.get_all("identity") == [IDENTITY_1, IDENTITY_2]
    core.receive(
        response_to(second, 200, "OK", "Contact: <sip:callee@192.0.2.10>\r\n"),
        Target("udp", CARRIER_A[0], 5060),
        0.2,
    )
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [200]


@pytest.mark.parametrize(("second_status", "expected"), [(301, 503), (486, 486), (503, 503)])
def test_a_carriers_3xx_is_never_relayed_when_every_contact_failed(second_status: int, expected: int) -> None:
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    core.receive(
        response_to(first, 302, "Moved Temporarily", "Contact: <sip:x@203.0.113.99>\r\n"),
        Target("udp", *CARRIER_B),
        0.1,
    )
    second = next(m for t, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
    extra = "Contact: <sip:x@203.0.113.98>\r\n" if second_status < 400 else ""
    answer = response_to(second, second_status, "Whatever", extra)
    core.receive(answer, Target("udp", CARRIER_A[0], 5060), 0.2)
    out = net.take()
    assert not [m for t, m in out if isinstance(m, SipRequest) and m.method == "INVITE"]
    finals = [m for t, m in out if t == SWITCH and isinstance(m, SipResponse) and m.status >= 200]
    assert [m.status for m in finals] == [expected]
    assert b"203.0.113.9" not in finals[0].serialize()  # no carrier's Contact leaks out
    if second_status == 301:
        assert finals[0].get("reason") == 'SIP;cause=503;text="carrier 302 redirect not followed"'
    assert core.in_flight == 0


@pytest.mark.parametrize("status", [503, 404, 403, 480, 603])
def test_clearip_finals_are_relayed(status: int) -> None:
    core, net = make_core()
    req = to_clearip(core, net)
    extra = 'Reason: SIP;cause=603;text="Network Blocked"\r\nCall-Info: <https://clearip.example/why>;purpose=info\r\n'
    clearip_reply(core, response_to(req, status, "Whatever", extra if status == 603 else ""), 0.05)
    up = [m for t, m in net.take() if t == SWITCH]
    assert len(up) == 1 and isinstance(up[0], SipResponse)
    assert up[0].status == status
    if status == 603:
        assert up[0].get("reason") == 'SIP;cause=603;text="Network Blocked"'
        assert up[0].get("call-info") == "<https://clearip.example/why>;purpose=info"


def test_clearip_timeout_answers_503_with_reason_at_timeout() -> None:
    core, net = make_core()
    to_clearip(core, net)
    core.handle_timer(4.99)
    assert not [m for t, m in net.take() if t == SWITCH]
    assert core.next_deadline() == pytest.approx(5.0)
    core.handle_timer(5.0)
    out = net.take()
    up = [m for t, m in out if t == SWITCH]
    assert isinstance(up[0], SipResponse) and up[0].status == 503
    assert "ClearIP did not answer" in (up[0].get("reason") or "")
    # ClearIP sent no provisional: no CANCEL (RFC 3261 §9.1); its late final is ACKed, not relayed.
    assert not [m for t, m in out if t.transport == CLEARIP]


def test_clearip_down_answers_503_at_once_and_drop_fails_waiting_calls() -> None:
    core, net = make_core()
    to_clearip(core, net)
    core.set_clearip_up(False, 1.0)
    up = [m for t, m in net.take() if t == SWITCH]
    assert isinstance(up[0], SipResponse) and up[0].status == 503
    core.receive(invite(branch="z9hG4bKsw2"), SWITCH, 2.0)
    out = net.take()
    assert [m.status for _, m in out if isinstance(m, SipResponse)] == [100, 503]
    assert not [t for t, _ in out if t.transport == CLEARIP]


@pytest.mark.parametrize("number", ["911", "+1911", "1911", "933", "+1933"])
def test_emergency_numbers_never_wait_on_clearip(number: str) -> None:
    core, net = make_core()
    core.receive(invite(number), SWITCH, 0.0)
    out = net.take()
    assert not [t for t, _ in out if t.transport == CLEARIP]
    assert [m.status for _, m in out if isinstance(m, SipResponse)] == [100, 503]


def test_retransmitted_invite_is_absorbed_not_forwarded_twice() -> None:
    core, net = make_core()
    to_clearip(core, net)
    core.receive(invite(), SWITCH, 0.5)
    out = net.take()
    assert not [t for t, _ in out if t.transport == CLEARIP]
    assert [m.status for _, m in out if isinstance(m, SipResponse)] == [100]


def test_cancel_after_ringing_cancels_branch_and_answers_487() -> None:
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    core.receive(response_to(first, 180, "Ringing"), Target("udp", *CARRIER_B), 0.1)
    net.take()
    cancel = (
        b"CANCEL sip:+15551234567@acme.sip.clearip.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKsw1\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:+12125550100@10.0.0.5>;tag=sw1\r\n"
        b"To: <sip:+15551234567@acme.sip.clearip.com>\r\nCall-ID: call-1@10.0.0.5\r\n"
        b"CSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    )
    core.receive(cancel, SWITCH, 0.2)
    out = net.take()
    assert sorted(m.status for t, m in out if t == SWITCH and isinstance(m, SipResponse)) == [200, 487]
    cancels = [(t, m) for t, m in out if isinstance(m, SipRequest) and m.method == "CANCEL"]
    assert len(cancels) == 1 and (cancels[0][0].host, cancels[0][0].port) == CARRIER_B
    assert cancels[0][1].top_via.branch == first.top_via.branch


def test_max_forwards_zero_gets_483_and_untrusted_gets_nothing() -> None:
    core, net = make_core()
    core.receive(invite().replace(b"Max-Forwards: 70", b"Max-Forwards: 0"), SWITCH, 0.0)
    assert [m.status for _, m in net.take() if isinstance(m, SipResponse)] == [483]
    core.receive(invite(branch="z9hG4bKother"), Target("udp", "172.16.0.1", 5060), 0.0)
    assert net.take() == []


def test_malformed_request_with_via_gets_400() -> None:
    core, net = make_core()
    bad = invite().replace(b"CSeq: 1 INVITE", b"CSeq: 1 BYE")
    core.receive(bad, SWITCH, 0.0)
    out = net.take()
    assert [m.status for _, m in out if isinstance(m, SipResponse)] == [400]


def test_in_dialog_bye_follows_route_and_pops_our_route() -> None:
    core, net = make_core()
    bye = (
        f"BYE sip:callee@{CARRIER_A[0]}:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKbye1\r\n"
        "Route: <sip:203.0.113.7:5060;lr>\r\nMax-Forwards: 70\r\n"
        "From: <sip:+12125550100@10.0.0.5>;tag=sw1\r\n"
        "To: <sip:+15551234567@acme.sip.clearip.com>;tag=far\r\nCall-ID: call-1@10.0.0.5\r\nCSeq: 2 BYE\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    core.receive(bye, SWITCH, 0.0)
    out = net.take()
    assert len(out) == 1
    target, fwd = out[0]
    assert (target.host, target.port) == (CARRIER_A[0], 5060)
    assert isinstance(fwd, SipRequest) and not fwd.has("route")
    core.receive(response_to(fwd, 200, "OK"), Target("udp", CARRIER_A[0], 5060), 0.1)
    up = net.take()
    assert up[0][0] == SWITCH and isinstance(up[0][1], SipResponse) and up[0][1].status == 200


def test_loop_is_detected() -> None:
    core, net = make_core()
    req = to_clearip(core, net)
    # The request comes back to us unchanged (a routing loop).
    core.receive(req.serialize(), SWITCH, 0.1)
    out = net.take()
    assert [m.status for _, m in out if isinstance(m, SipResponse)] == [482]


def test_overload_answers_503_retry_after() -> None:
    core, net = make_core(max_in_flight=1)
    to_clearip(core, net)
    core.receive(invite(branch="z9hG4bKsw2").replace(b"call-1", b"call-2"), SWITCH, 0.1)
    out = net.take()
    finals = [m for _, m in out if isinstance(m, SipResponse) and m.status == 503]
    assert finals and finals[0].get("retry-after") == "5"


def test_drain_answers_options_and_invites_503() -> None:
    core, net = make_core()
    core.start_drain()
    core.receive(invite(), SWITCH, 0.0)
    assert [m.status for _, m in net.take() if isinstance(m, SipResponse)] == [100, 503]


def test_late_answer_from_abandoned_contact_is_hung_up_not_connected() -> None:
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    core.handle_timer(5.06)  # no provisional from carrier B: advance to carrier A
    second = next(
        m
        for t, m in net.take()
        if isinstance(m, SipRequest) and m.method == "INVITE" and t.host == CARRIER_A[0]
    )
    # Carrier B answers late: ACK + BYE to it, nothing to the switch.
    core.receive(
        response_to(first, 200, "OK", f"Contact: <sip:b@{CARRIER_B[0]}:{CARRIER_B[1]}>\r\n"),
        Target("udp", *CARRIER_B),
        6.0,
    )
    out = net.take()
    assert not [m for t, m in out if t == SWITCH]
    assert sorted(m.method for t, m in out if isinstance(m, SipRequest)) == ["ACK", "BYE"]
    # Carrier A's answer is the one the switch gets.
    core.receive(
        response_to(second, 200, "OK", "Contact: <sip:a@192.0.2.10>\r\n"),
        Target("udp", CARRIER_A[0], 5060),
        6.1,
    )
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [200]


def test_abort_all_gives_every_call_in_progress_a_final_response() -> None:
    core, net = make_core()
    _, first = advance_to_carrier(core, net)
    core.receive(response_to(first, 180, "Ringing"), Target("udp", *CARRIER_B), 0.1)
    net.take()
    assert core.abort_all(1.0) == 1
    out = net.take()
    assert [m.status for t, m in out if t == SWITCH and isinstance(m, SipResponse)] == [503]
    assert [m.method for t, m in out if isinstance(m, SipRequest)] == ["CANCEL"]
    assert core.in_flight == 0


def test_unsupported_proxy_require_gets_420_with_unsupported() -> None:
    core, net = make_core()
    core.receive(invite(extra="Proxy-Require: noProxiesSupportThis\r\n"), SWITCH, 0.0)
    out = net.take()
    finals = [m for _, m in out if isinstance(m, SipResponse)]
    assert [m.status for m in finals] == [420]
    assert finals[0].get("unsupported") == "noProxiesSupportThis"
    assert not [t for t, _ in out if t.transport == CLEARIP]


def reinvite(branch: str, call_id: str) -> str:
    """An in-dialog re-INVITE from the switch, routed through us to the callee at carrier A."""
    return (
        f"INVITE sip:callee@{CARRIER_A[0]}:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.5:5060;branch={branch}\r\n"
        "Route: <sip:203.0.113.7:5060;lr>\r\nMax-Forwards: 70\r\n"
        "From: <sip:+12125550100@10.0.0.5>;tag=sw1\r\n"
        f"To: <sip:+15551234567@acme.sip.clearip.com>;tag=far\r\nCall-ID: {call_id}\r\nCSeq: 3 INVITE\r\n"
        "Contact: <sip:+12125550100@10.0.0.5:5060>\r\nContent-Length: 0\r\n\r\n"
    )


def test_cancel_of_a_relayed_reinvite_answers_487_with_only_the_callers_via() -> None:
    """A re-INVITE relayed along the route set, ringing, then CANCELled by the caller: CANCEL goes
    downstream and the caller gets 200 (CANCEL), then downstream's 487 (INVITE, RFC 3261 §16.10)
    carrying its own Via alone (RFC 3261 §8.1.3.3: a UAC discards a response with more than one
    Via)."""
    core, net = make_core()
    request = reinvite("z9hG4bKre1", "call-1@10.0.0.5")
    core.receive(request.encode(), SWITCH, 0.0)
    fwd = [m for _, m in net.take() if isinstance(m, SipRequest)]
    assert len(fwd) == 1 and fwd[0].method == "INVITE"
    core.receive(response_to(fwd[0], 180, "Ringing"), Target("udp", CARRIER_A[0], 5060), 0.1)
    net.take()
    cancel = request.split("Contact:")[0].replace("INVITE", "CANCEL") + "Content-Length: 0\r\n\r\n"
    core.receive(cancel.encode(), SWITCH, 0.2)
    out = net.take()
    up = {m.cseq[1]: m for t, m in out if t == SWITCH and isinstance(m, SipResponse)}
    assert up["CANCEL"].status == 200 and "INVITE" not in up  # the INVITE's final is downstream's
    downstream = [m for t, m in out if isinstance(m, SipRequest) and m.method == "CANCEL"]
    assert len(downstream) == 1 and downstream[0].top_via.branch == fwd[0].top_via.branch
    core.receive(response_to(fwd[0], 487, "Request Terminated"), Target("udp", CARRIER_A[0], 5060), 0.3)
    up = {m.cseq[1]: m for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)}
    assert up["INVITE"].status == 487
    assert up["INVITE"].values("via") == ["SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKre1"]


def test_relayed_reinvite_that_rings_past_the_ring_limit_is_cancelled_then_answered_408() -> None:
    """Timer C (RFC 3261 §16.8) on a relayed INVITE: 1xx then nothing. At the ring limit the proxy
    CANCELs downstream and waits for its final; 64*T1 after the CANCEL with still none, it answers
    408 (one Via), the client transaction is destroyed and the tables drain."""
    core, net = make_core(ring_timeout=60.0)
    core.receive(reinvite("z9hG4bKre2", "call-2@10.0.0.5").encode(), SWITCH, 0.0)
    fwd = next(m for _, m in net.take() if isinstance(m, SipRequest))
    core.receive(response_to(fwd, 180, "Ringing"), Target("udp", CARRIER_A[0], 5060), 0.1)
    net.take()
    core.handle_timer(59.9)
    assert [m for _, m in net.take() if isinstance(m, SipRequest) and m.method == "CANCEL"] == []
    core.handle_timer(60.0)
    out = net.take()
    assert [m for t, m in out if t == SWITCH and isinstance(m, SipResponse)] == []
    assert [m.top_via.branch for _, m in out if isinstance(m, SipRequest) and m.method == "CANCEL"] == [
        fwd.top_via.branch
    ]
    now = 60.0
    while (deadline := core.next_deadline()) is not None and deadline < 200.0:
        now = deadline
        core.handle_timer(now)
    assert now >= 60.0 + 32.0  # the guard waited 64*T1 for a final after the CANCEL
    finals = [m for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)]
    assert finals and {m.status for m in finals} == {408}  # and its retransmissions (no ACK here)
    assert finals[0].values("via") == ["SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKre2"]
    assert core.table_sizes() == {"calls": 0, "server_transactions": 0, "client_transactions": 0, "timers": 0}
