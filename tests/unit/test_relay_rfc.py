"""ACK, CANCEL and non-INVITE relaying through ProxyCore (bytes in, bytes out, fake clock):
RFC 6026 §7.1/§8.5 (an ACK in Accepted goes to the TU), RFC 3261 §9.1 (no CANCEL before a
provisional), §16.7 (provisionals and finals relayed), §16.9 and RFC 4320 §4.2 (no 408 to a
non-INVITE)."""

from __future__ import annotations

from proxy_runtime.core.proxy import CLEARIP, ProxyCore, Target
from proxy_runtime.sip.message import SipRequest, SipResponse
from tests.unit.test_proxy_core import (
    CARRIER_A,
    CARRIER_B,
    SWITCH,
    Net,
    clearip_reply,
    invite,
    make_core,
    redirect,
    reinvite,
    response_to,
    to_clearip,
)

CARRIER_B_TARGET = Target("udp", *CARRIER_B)
CALLEE_A = Target("udp", CARRIER_A[0], 5060)


def ack_for_2xx(via: str) -> bytes:
    """The switch's ACK for the carrier's 200: to the callee's Contact, through our Record-Route."""
    return (
        f"ACK sip:callee@{CARRIER_B[0]}:{CARRIER_B[1]} SIP/2.0\r\nVia: {via}\r\n"
        "Route: <sip:203.0.113.7:5060;lr>\r\nMax-Forwards: 70\r\n"
        "From: <sip:+12125550100@10.0.0.5>;tag=sw1\r\n"
        "To: <sip:+15551234567@acme.sip.clearip.com>;tag=far\r\nCall-ID: call-1@10.0.0.5\r\n"
        "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def answered_call(core: ProxyCore, net: Net, data: bytes) -> SipRequest:
    """``data`` (the switch's INVITE) via ClearIP's 302 to carrier B, which answers 200: the
    switch has the 200. Returns carrier B's INVITE."""
    req = to_clearip(core, net, data=data)
    clearip_reply(core, redirect(req), 0.05)
    fwd = next(m for t, m in net.take() if t.transport != CLEARIP)
    assert isinstance(fwd, SipRequest) and fwd.method == "INVITE"
    ok = response_to(
        fwd,
        200,
        "OK",
        f"Contact: <sip:callee@{CARRIER_B[0]}:{CARRIER_B[1]}>\r\nRecord-Route: <sip:203.0.113.7:5060;lr>\r\n",
    )
    core.receive(ok, CARRIER_B_TARGET, 0.3)
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [200]
    return fwd


def acks_to_carrier(net: Net) -> list[SipRequest]:
    return [
        m
        for t, m in net.take()
        if isinstance(m, SipRequest) and m.method == "ACK" and (t.host, t.port) == CARRIER_B
    ]


# ---------------------------------------------------------------------------------------------
# 1. ACK for a 2xx that matches the server transaction (Accepted): forwarded, never absorbed


def test_ack_from_an_rfc2543_switch_for_a_2xx_reaches_the_carrier() -> None:
    """A switch without the magic cookie: its INVITE's transaction key is Call-ID, From tag and
    CSeq number, which its ACK for the 2xx shares. RFC 6026 §8.5: an ACK in the Accepted state is
    passed to the TU (forwarded end to end), or the callee tears the call down after 64*T1."""
    core, net = make_core()
    answered_call(core, net, invite().replace(b";branch=z9hG4bKsw1", b""))
    core.receive(ack_for_2xx("SIP/2.0/UDP 10.0.0.5:5060"), SWITCH, 0.4)
    acks = acks_to_carrier(net)
    assert len(acks) == 1
    assert acks[0].uri == f"sip:callee@{CARRIER_B[0]}:{CARRIER_B[1]}"
    assert not acks[0].has("route")  # our Route popped
    assert acks[0].top_via.host == "203.0.113.7" and acks[0].top_via.branch.startswith("z9hG4bK")
    # Its retransmission (the 2xx retransmitted) is forwarded again, with the same branch.
    core.receive(ack_for_2xx("SIP/2.0/UDP 10.0.0.5:5060"), SWITCH, 0.9)
    again = acks_to_carrier(net)
    assert len(again) == 1 and again[0].top_via.branch == acks[0].top_via.branch


def test_ack_for_a_2xx_reusing_the_invites_branch_reaches_the_carrier() -> None:
    """A UA that gives its ACK for the 2xx the INVITE's branch (RFC 3261 §17.1.1.3 asks for a new
    one): it still matches the server transaction, which must not absorb it."""
    core, net = make_core()
    answered_call(core, net, invite())
    core.receive(ack_for_2xx("SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKsw1"), SWITCH, 0.4)
    assert len(acks_to_carrier(net)) == 1


def test_ack_for_a_non_2xx_final_is_still_absorbed_hop_by_hop() -> None:
    """An ACK for our non-2xx final (Completed) is the transaction's own: absorbed, and the
    final's retransmissions stop (Confirmed)."""
    core, net = make_core()
    req = to_clearip(core, net, data=invite().replace(b";branch=z9hG4bKsw1", b""))
    clearip_reply(core, response_to(req, 404, "Not Found", to_tag="cip"), 0.05)
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [404]
    ack = ack_for_2xx("SIP/2.0/UDP 10.0.0.5:5060").replace(b";tag=far", b";tag=cip")
    core.receive(ack, SWITCH, 0.1)
    core.handle_timer(5.0)  # Timer G would have retransmitted the 404 by now without the ACK
    assert net.take() == []


# ---------------------------------------------------------------------------------------------
# 2. CANCEL of a relayed INVITE: held until a provisional (§9.1); the final is downstream's


def relayed_reinvite(core: ProxyCore, net: Net, branch: str) -> tuple[str, SipRequest]:
    request = reinvite(branch, f"{branch}@10.0.0.5")
    core.receive(request.encode(), SWITCH, 0.0)
    fwd = [m for _, m in net.take() if isinstance(m, SipRequest)]
    assert len(fwd) == 1 and fwd[0].method == "INVITE"
    return request, fwd[0]


def cancel_of(request: str) -> bytes:
    return (request.split("Contact:")[0].replace("INVITE", "CANCEL") + "Content-Length: 0\r\n\r\n").encode()


def switch_finals(out: list[tuple[Target, SipRequest | SipResponse]]) -> list[tuple[str, int]]:
    up = [m for t, m in out if t == SWITCH and isinstance(m, SipResponse)]
    return [(m.cseq[1], m.status) for m in up if m.status >= 200]


def cancels(out: list[tuple[Target, SipRequest | SipResponse]]) -> list[SipRequest]:
    return [m for _, m in out if isinstance(m, SipRequest) and m.method == "CANCEL"]


def test_cancel_of_a_relayed_invite_waits_for_a_provisional_then_downstreams_487_is_relayed() -> None:
    """RFC 3261 §9.1: no CANCEL before a provisional; the proxy holds it and sends it on the first
    1xx (a 100 counts). The caller's CANCEL gets 200 at once; the INVITE's 487 is downstream's."""
    core, net = make_core()
    request, fwd = relayed_reinvite(core, net, "z9hG4bKc1")
    core.receive(cancel_of(request), SWITCH, 0.05)
    out = net.take()
    assert switch_finals(out) == [("CANCEL", 200)]
    assert cancels(out) == []
    core.handle_timer(0.4)
    assert cancels(net.take()) == []
    core.receive(response_to(fwd, 100, "Trying"), CALLEE_A, 0.45)
    out = net.take()
    assert [m.top_via.branch for m in cancels(out)] == [fwd.top_via.branch]
    assert [t for t, _ in out if t == SWITCH] == []  # the 100 is hop by hop
    core.receive(response_to(fwd, 487, "Request Terminated"), CALLEE_A, 0.5)
    out = net.take()
    assert switch_finals(out) == [("INVITE", 487)]


def test_a_final_before_any_provisional_drops_the_held_cancel_and_a_2xx_reaches_the_caller() -> None:
    """CANCEL held (no provisional yet), then downstream answers 200: the CANCEL is never sent and
    the 2xx (which crossed the caller's CANCEL) reaches the caller, retransmissions too."""
    core, net = make_core()
    request, fwd = relayed_reinvite(core, net, "z9hG4bKc2")
    core.receive(cancel_of(request), SWITCH, 0.05)
    net.take()
    ok = response_to(fwd, 200, "OK", f"Contact: <sip:callee@{CARRIER_A[0]}>\r\n")
    core.receive(ok, CALLEE_A, 0.1)
    out = net.take()
    assert switch_finals(out) == [("INVITE", 200)]
    assert cancels(out) == []
    core.receive(ok, CALLEE_A, 0.6)
    assert switch_finals(net.take()) == [("INVITE", 200)]
    core.receive(response_to(fwd, 180, "Ringing"), CALLEE_A, 0.7)  # a stray late 1xx
    assert cancels(net.take()) == []


def test_a_2xx_crossing_the_cancel_of_a_ringing_relayed_invite_reaches_the_caller() -> None:
    """RFC 3261 §16.10, §16.7 step 10, RFC 6026: the proxy answers the CANCEL 200 but not the
    INVITE; downstream's 2xx that crossed the CANCEL is relayed to the caller (and its
    retransmission), never swallowed behind a 487 of the proxy's own."""
    core, net = make_core()
    request, fwd = relayed_reinvite(core, net, "z9hG4bKc3")
    core.receive(response_to(fwd, 180, "Ringing"), CALLEE_A, 0.1)
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [180]
    core.receive(cancel_of(request), SWITCH, 0.2)
    out = net.take()
    assert switch_finals(out) == [("CANCEL", 200)]
    assert len(cancels(out)) == 1
    ok = response_to(fwd, 200, "OK", f"Contact: <sip:callee@{CARRIER_A[0]}>\r\n")
    core.receive(ok, CALLEE_A, 0.25)
    out = net.take()
    assert switch_finals(out) == [("INVITE", 200)]
    vias = [m.values("via") for t, m in out if t == SWITCH]
    assert vias == [["SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKc3"]]
    core.receive(ok, CALLEE_A, 0.75)
    assert switch_finals(net.take()) == [("INVITE", 200)]


def test_a_2xx_crossing_the_ring_limit_cancel_reaches_the_caller() -> None:
    """RFC 3261 §16.8: at the ring limit, after a provisional, the proxy only CANCELs; downstream's
    final is the caller's. A 200 that crossed the CANCEL is relayed (and its retransmission),
    not lost behind a 408 of the proxy's own; a 487 would be relayed the same way."""
    core, net = make_core(ring_timeout=10.0)
    _, fwd = relayed_reinvite(core, net, "z9hG4bKc5")
    core.receive(response_to(fwd, 180, "Ringing"), CALLEE_A, 0.1)
    net.take()
    core.handle_timer(10.1)
    out = net.take()
    assert switch_finals(out) == []
    assert [m.top_via.branch for m in cancels(out)] == [fwd.top_via.branch]
    ok = response_to(fwd, 200, "OK", f"Contact: <sip:callee@{CARRIER_A[0]}>\r\n")
    core.receive(ok, CALLEE_A, 10.2)
    assert switch_finals(net.take()) == [("INVITE", 200)]
    core.receive(ok, CALLEE_A, 10.7)
    assert switch_finals(net.take()) == [("INVITE", 200)]


def test_ring_limit_before_any_provisional_answers_408_and_cancels_only_once_it_rings() -> None:
    """Timer C firing while downstream sent nothing: 408 to the caller, the CANCEL held until
    downstream's first provisional (RFC 3261 §9.1)."""
    core, net = make_core(ring_timeout=10.0)
    _, fwd = relayed_reinvite(core, net, "z9hG4bKc4")
    core.handle_timer(10.0)
    out = net.take()
    assert switch_finals(out) == [("INVITE", 408)]
    assert cancels(out) == []
    core.receive(response_to(fwd, 180, "Ringing"), CALLEE_A, 11.0)
    out = net.take()
    assert [m.top_via.branch for m in cancels(out)] == [fwd.top_via.branch]
    assert [t for t, _ in out if t == SWITCH] == []


def test_cancel_while_clearip_is_asked_goes_to_clearip_only_after_its_provisional() -> None:
    """ClearIP (a redirect server) answers finals alone: a CANCEL to it before a provisional would
    break RFC 3261 §9.1, so none goes; the caller still has its 487 at once, and ClearIP's late
    302 is ACKed and not followed. After a 100 from ClearIP the CANCEL does go."""
    core, net = make_core()
    req = to_clearip(core, net)
    cancel = cancel_of(invite().decode().replace("Identity: old-identity-from-switch\r\n", ""))
    core.receive(cancel, SWITCH, 0.1)
    out = net.take()
    assert sorted(switch_finals(out)) == [("CANCEL", 200), ("INVITE", 487)]
    assert [t for t, _ in out if t.transport == CLEARIP] == []
    clearip_reply(core, redirect(req), 0.2)
    out = net.take()
    assert [(t.transport, m.method) for t, m in out if isinstance(m, SipRequest)] == [(CLEARIP, "ACK")]
    assert [t for t, _ in out if t == SWITCH] == []

    core, net = make_core()
    req = to_clearip(core, net)
    clearip_reply(core, response_to(req, 100, "Trying"), 0.05)
    core.receive(cancel, SWITCH, 0.1)
    out = net.take()
    assert sorted(switch_finals(out)) == [("CANCEL", 200), ("INVITE", 487)]
    assert [(t.transport, m.method) for t, m in out if isinstance(m, SipRequest)] == [(CLEARIP, "CANCEL")]


def test_a_cancel_held_for_clearip_goes_when_its_provisional_comes_after_the_timeout() -> None:
    """ClearIP silent past ``timeout`` (the caller got 503), then its 100 arrives: the CANCEL held
    since the timeout goes now, so the INVITE there ends (its 487, or Timer C) instead of waiting in
    Proceeding, where no Timer B runs, for ever."""
    core, net = make_core()
    req = to_clearip(core, net)
    core.handle_timer(5.01)
    out = net.take()
    assert [m.status for t, m in out if t == SWITCH and isinstance(m, SipResponse)] == [503]
    assert [t for t, _ in out if t.transport == CLEARIP] == []  # no CANCEL before a provisional
    clearip_reply(core, response_to(req, 100, "Trying"), 6.0)
    out = net.take()
    assert [(t.transport, m.method) for t, m in out if isinstance(m, SipRequest)] == [(CLEARIP, "CANCEL")]
    for t in (6.0 + 0.5 * i for i in range(1, 200)):
        core.handle_timer(t)
    assert core.table_sizes() == {"calls": 0, "server_transactions": 0, "client_transactions": 0, "timers": 0}


# ---------------------------------------------------------------------------------------------
# 3, 4. A relayed non-INVITE (BYE): no 100 relayed, no 408 of the proxy's own (RFC 4320 §4.2)


def bye(branch: str) -> bytes:
    return (
        f"BYE sip:callee@{CARRIER_A[0]}:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch={branch}\r\n"
        "Route: <sip:203.0.113.7:5060;lr>\r\nMax-Forwards: 70\r\n"
        "From: <sip:+12125550100@10.0.0.5>;tag=sw1\r\n"
        "To: <sip:+15551234567@acme.sip.clearip.com>;tag=far\r\nCall-ID: call-1@10.0.0.5\r\nCSeq: 2 BYE\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def test_a_100_to_a_relayed_bye_is_not_relayed_but_other_responses_are() -> None:
    """RFC 3261 §16.7 step 5: provisionals other than 100 are forwarded; a 100 is hop by hop."""
    core, net = make_core()
    core.receive(bye("z9hG4bKb1"), SWITCH, 0.0)
    fwd = net.take()[0][1]
    assert isinstance(fwd, SipRequest) and fwd.method == "BYE"
    core.receive(response_to(fwd, 100, "Trying"), CALLEE_A, 0.1)
    assert net.take() == []
    core.receive(response_to(fwd, 183, "Progress"), CALLEE_A, 0.2)
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [183]
    core.receive(response_to(fwd, 200, "OK"), CALLEE_A, 0.3)
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [200]


def test_a_relayed_bye_that_gets_no_answer_gets_no_408_and_the_tables_drain() -> None:
    """RFC 4320 §4.2: a proxy MUST NOT send 408 to a non-INVITE. Downstream silent: the BYE is
    retransmitted (Timer E) and, at Timer F, nothing goes to the switch, whose own transaction
    times out; the proxy's transactions are gone."""
    core, net = make_core()
    core.receive(bye("z9hG4bKb2"), SWITCH, 0.0)
    net.take()
    now = 0.0
    while (deadline := core.next_deadline()) is not None and deadline < 100.0:
        now = deadline
        core.handle_timer(now)
    out = net.take()
    assert out and all(isinstance(m, SipRequest) and m.method == "BYE" for _, m in out)  # retransmissions
    assert [t for t, _ in out if t == SWITCH] == []
    assert now >= 32.0
    assert core.table_sizes() == {"calls": 0, "server_transactions": 0, "client_transactions": 0, "timers": 0}


def test_a_relayed_bye_whose_send_fails_gets_500() -> None:
    """A transport error forwarding a BYE: as if downstream answered 503 (RFC 3261 §16.9), which
    the proxy does not pass on but answers 500 (§16.7 step 6); never 408 (RFC 4320 §4.2)."""
    core, net = make_core()
    core.receive(bye("z9hG4bKb3"), SWITCH, 0.0)
    key = net.sent[0][2]
    net.take()
    core.transport_error(key, 0.01)
    finals = [m for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)]
    assert [(m.status, m.cseq[1]) for m in finals] == [(500, "BYE")]
    assert finals[0].values("via") == ["SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKb3"]


def test_a_relayed_in_dialog_503_reaches_the_caller_without_its_retry_after() -> None:
    """A callee's 503 + Retry-After to a BYE (or re-INVITE) would tell the switch to keep away from
    its next hop, the proxy, for every call: relayed as 503, without Retry-After, Reason kept."""
    core, net = make_core()
    core.receive(bye("z9hG4bKb9"), SWITCH, 0.0)
    fwd = net.take()[0][1]
    assert isinstance(fwd, SipRequest)
    extra = 'Retry-After: 300\r\nReason: SIP;cause=503;text="busy"\r\n'
    core.receive(response_to(fwd, 503, "Service Unavailable", extra), CALLEE_A, 0.1)
    up = [m for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)]
    assert [m.status for m in up] == [503]
    assert up[0].get("retry-after") is None
    assert up[0].get("reason") == 'SIP;cause=503;text="busy"'
