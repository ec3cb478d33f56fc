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
