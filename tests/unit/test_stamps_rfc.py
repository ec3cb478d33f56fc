"""The proxy's stamps and checks against the RFCs, driven through :class:`ProxyCore` (bytes in,
(target, bytes) out): spirals versus loops (RFC 3261 §16.3 step 4, §16.6 step 8), received= with
rport (RFC 3581 §4), SIPS Record-Route (RFC 3261 §16.6 step 4, RFC 5658) and Allow (§20.5)."""

from __future__ import annotations

import pytest

from proxy_runtime.core.proxy import ProxyCore, Target
from proxy_runtime.settings import load
from proxy_runtime.sip.message import SipRequest, SipResponse
from tests.unit.test_proxy_core import (
    SWITCH,
    Net,
    clearip_reply,
    invite,
    make_core,
    response_to,
    to_clearip,
)

ME = "203.0.113.7"
CARRIER_PROXY = Target("udp", "192.0.2.50", 5060)  # a record-routing carrier proxy
CALLEE = Target("udp", "10.0.0.9", 5060)


def in_dialog(method: str, route: str, cseq: int = 2, uri: str = "sip:callee@10.0.0.9:5060") -> bytes:
    route_line = f"Route: {route}\r\n" if route else ""
    return (
        f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK{method.lower()}H\r\n"
        f"{route_line}Max-Forwards: 70\r\nFrom: <sip:+12125550100@10.0.0.5>;tag=sw1\r\n"
        "To: <sip:+15551234567@acme.sip.clearip.com>;tag=far\r\nCall-ID: hp-1@10.0.0.5\r\n"
        f"CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


# A hairpinned dialog: its route set passes the proxy, a record-routing carrier proxy, the proxy.
HAIRPIN = f"<sip:{ME}:5060;lr>, <sip:{CARRIER_PROXY.host}:5060;lr>, <sip:{ME}:5060;lr>"


def carrier_proxy_passes_back(fwd: SipRequest) -> bytes:
    """What the carrier proxy does with what we sent it: pops its Route (RFC 3261 §16.4), adds its
    Via and sends the request to the next Route (us again)."""
    back = fwd.copy()
    assert back.pop_first_value("route") == f"<sip:{CARRIER_PROXY.host}:5060;lr>"
    back.add("Via", f"SIP/2.0/UDP {CARRIER_PROXY.host}:5060;branch=z9hG4bKcarrier1", first=True)
    back.set("Max-Forwards", str(int(back.get("max-forwards") or "70") - 1))
    return back.serialize()


def only_request(net: Net) -> tuple[Target, SipRequest]:
    out = net.take()
    assert len(out) == 1, out
    target, msg = out[0]
    assert isinstance(msg, SipRequest), msg
    return target, msg


# --- spirals and loops (RFC 3261 §16.3 step 4, §16.6 step 8) ------------------------------------
def test_hairpinned_bye_spirals_through_the_proxy_twice_and_its_200_comes_back() -> None:
    """The second pass differs from the first only by its Route (the carrier popped its own): a
    spiral, forwarded to the callee, not answered 482."""
    core, net = make_core()
    core.receive(in_dialog("BYE", HAIRPIN), SWITCH, 0.0)
    target, first = only_request(net)
    assert target == CARRIER_PROXY
    assert first.values("route") == [f"<sip:{CARRIER_PROXY.host}:5060;lr>", f"<sip:{ME}:5060;lr>"]

    core.receive(carrier_proxy_passes_back(first), CARRIER_PROXY, 0.1)
    target, second = only_request(net)
    assert (target.host, target.port) == (CALLEE.host, CALLEE.port)
    assert second.method == "BYE" and not second.has("route")
    assert len(second.values("via")) == 4  # ours, the carrier's, ours, the switch's

    # The callee's 200 retraces the path: to the carrier proxy, which relays it back to us.
    core.receive(response_to(second, 200, "OK"), CALLEE, 0.2)
    out = net.take()
    assert [(t, m.status) for t, m in out if isinstance(m, SipResponse)] == [(CARRIER_PROXY, 200)]
    relayed = out[0][1]
    assert isinstance(relayed, SipResponse)
    relayed.pop_first_value("via")  # the carrier proxy takes its Via off
    core.receive(relayed.serialize(), CARRIER_PROXY, 0.3)
    up = net.take()
    assert [(t, m.status) for t, m in up if isinstance(m, SipResponse)] == [(SWITCH, 200)]


def test_hairpinned_ack_spirals_through_the_proxy_twice() -> None:
    """The ACK for a 2xx is forwarded statelessly (RFC 3261 §16.11) on both passes, not dropped."""
    core, net = make_core()
    core.receive(in_dialog("ACK", HAIRPIN, cseq=1), SWITCH, 0.0)
    target, first = only_request(net)
    assert target == CARRIER_PROXY and first.method == "ACK"
    core.receive(carrier_proxy_passes_back(first), CARRIER_PROXY, 0.1)
    target, second = only_request(net)
    assert (target.host, target.port) == (CALLEE.host, CALLEE.port)
    assert second.method == "ACK" and not second.has("route")
    # A retransmission of the first ACK is forwarded with the same branch (stateless).
    core.receive(in_dialog("ACK", HAIRPIN, cseq=1), SWITCH, 0.5)
    _, again = only_request(net)
    assert again.top_via.branch == first.top_via.branch


def test_bye_reflected_back_unchanged_is_a_loop() -> None:
    """The carrier proxy sends the BYE straight back as it got it (no Route popped): 482."""
    core, net = make_core()
    core.receive(in_dialog("BYE", HAIRPIN), SWITCH, 0.0)
    _, first = only_request(net)
    core.receive(first.serialize(), CARRIER_PROXY, 0.1)
    out = net.take()
    assert [(t, m.status) for t, m in out if isinstance(m, SipResponse)] == [(CARRIER_PROXY, 482)]
    assert not [m for _, m in out if isinstance(m, SipRequest)]


@pytest.mark.parametrize("method", ["BYE", "ACK"])
def test_request_sent_back_through_us_as_outbound_proxy_is_a_loop(method: str) -> None:
    """The next hop sends the request back with our Route pushed on top (it uses us as its
    outbound proxy): once our Route is popped it is the request we sent, so a loop (a BYE gets
    482, an ACK is dropped), as on both sides the loop hash is taken without our own Routes."""
    core, net = make_core()
    core.receive(in_dialog(method, f"<sip:{ME}:5060;lr>"), SWITCH, 0.0)
    target, first = only_request(net)
    assert (target.host, target.port) == (CALLEE.host, CALLEE.port) and not first.has("route")
    back = first.copy()
    back.add("Route", f"<sip:{ME}:5060;lr>")
    back.add("Via", f"SIP/2.0/UDP {CALLEE.host}:5060;branch=z9hG4bKcallee1", first=True)
    core.receive(back.serialize(), CALLEE, 0.1)
    out = net.take()
    assert not [m for _, m in out if isinstance(m, SipRequest)]
    expected = [] if method == "ACK" else [(CALLEE, 482)]
    assert [(t, m.status) for t, m in out if isinstance(m, SipResponse)] == expected


def test_ack_that_comes_back_unchanged_is_dropped_as_a_loop() -> None:
    core, net = make_core()
    core.receive(in_dialog("ACK", f"<sip:{ME}:5060;lr>", cseq=1), SWITCH, 0.0)
    target, first = only_request(net)
    assert (target.host, target.port) == (CALLEE.host, CALLEE.port)
    core.receive(first.serialize(), CALLEE, 0.1)
    assert net.take() == []


# --- received= with rport (RFC 3581 §4) --------------------------------------------------------
def test_rport_request_gets_received_even_when_it_equals_sent_by() -> None:
    """sent-by is the source IP (10.0.0.5) but the source port differs: received=10.0.0.5 is
    still added next to rport=5070, on the Via relayed downstream and in our responses."""
    core, net = make_core()
    source = Target("udp", SWITCH.host, 5070)
    data = invite().replace(b"10.0.0.5:5060;branch=z9hG4bKsw1", b"10.0.0.5:5060;rport;branch=z9hG4bKsw1")
    core.receive(data, source, 0.0)
    out = net.take()
    trying_target, trying = out[0]
    assert isinstance(trying, SipResponse) and trying.status == 100
    assert trying_target == source  # rport: answered at the source port
    assert trying.values("via") == [
        "SIP/2.0/UDP 10.0.0.5:5060;rport=5070;branch=z9hG4bKsw1;received=10.0.0.5"
    ]
    fwd = out[1][1]
    assert isinstance(fwd, SipRequest)
    assert fwd.values("via")[1] == "SIP/2.0/UDP 10.0.0.5:5060;rport=5070;branch=z9hG4bKsw1;received=10.0.0.5"


def test_without_rport_received_is_added_only_when_the_address_differs() -> None:
    core, net = make_core()
    core.receive(invite(), SWITCH, 0.0)
    trying = net.take()[0][1]
    assert trying.values("via") == ["SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKsw1"]


# --- SIPS Record-Route (RFC 3261 §16.6 step 4, RFC 5658) ---------------------------------------
def tls_core() -> tuple[ProxyCore, Net]:
    s = load(environ={}, overrides={"allow": ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24"], "timeout": 5})
    net = Net()
    core = ProxyCore(s, net, advertise=ME, ports={"udp": 5060, "tcp": 5060, "tls": 5061}, instance="t35t")
    core.set_clearip_up(True, 0.0)
    return core, net


def fork_to(core: ProxyCore, net: Net, contact: str, data: bytes | None = None) -> tuple[Target, SipRequest]:
    req = to_clearip(core, net, data=data)
    clearip_reply(
        core, response_to(req, 302, "Moved Temporarily", f"Contact: <{contact}>\r\n", to_tag="cip"), 0.05
    )
    out = [(t, m) for t, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE"]
    assert len(out) == 1
    return out[0]


def test_sips_contact_gets_a_sips_record_route_on_its_leg() -> None:
    """Switch over UDP (sip:), carrier at a sips: Contact (TLS): double Record-Route (RFC 5658),
    the carrier-facing entry a SIPS URI, the switch-facing one a plain sip: URI on UDP."""
    core, net = tls_core()
    target, fwd = fork_to(core, net, "sips:+15551234567@192.0.2.10")
    assert (target.transport, target.host, target.port) == ("tls", "192.0.2.10", 5061)
    assert fwd.get_all("record-route") == [f"<sips:{ME}:5061;lr;r2=on>", f"<sip:{ME}:5060;lr;r2=on>"]

    # In-dialog requests with those Routes are recognised as ours, both entries popped, each way.
    bye_from_callee = (
        "BYE sip:+12125550100@10.0.0.5:5060 SIP/2.0\r\nVia: SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bKcb1\r\n"
        f"Route: <sips:{ME}:5061;lr;r2=on>, <sip:{ME}:5060;lr;r2=on>\r\nMax-Forwards: 70\r\n"
        "From: <sips:+15551234567@192.0.2.10>;tag=far\r\nTo: <sip:+12125550100@10.0.0.5>;tag=sw1\r\n"
        "Call-ID: call-1@10.0.0.5\r\nCSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    core.receive(bye_from_callee, Target("tls", "192.0.2.10", 40001, 3), 1.0)
    target, bye = only_request(net)
    assert (target.transport, target.host, target.port) == ("udp", "10.0.0.5", 5060)
    assert not bye.has("route")

    bye_from_switch = (
        "BYE sips:+15551234567@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKsb1\r\n"
        f"Route: <sip:{ME}:5060;lr;r2=on>, <sips:{ME}:5061;lr;r2=on>\r\nMax-Forwards: 70\r\n"
        "From: <sip:+12125550100@10.0.0.5>;tag=sw1\r\nTo: <sip:+15551234567@acme.sip.clearip.com>;tag=far\r\n"
        "Call-ID: call-1@10.0.0.5\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    core.receive(bye_from_switch, SWITCH, 1.1)
    target, bye = only_request(net)
    assert (target.transport, target.host, target.port) == ("tls", "192.0.2.10", 5061)
    assert not bye.has("route")


def tls_invite(uri_scheme: str) -> bytes:
    data = invite().replace(b"SIP/2.0/UDP 10.0.0.5:5060", b"SIP/2.0/TLS 10.0.0.5:5061")
    return data.replace(b"INVITE sip:", f"INVITE {uri_scheme}:".encode(), 1)


@pytest.mark.parametrize(
    ("contact", "expected"),
    [
        # TLS both sides: one entry, SIPS because a leg's Request-URI is.
        ("sips:+15551234567@192.0.2.10", [f"<sips:{ME}:5061;lr>"]),
        ("sip:+15551234567@192.0.2.10;transport=tls", [f"<sips:{ME}:5061;lr>"]),
        # Carrier over UDP: the caller's (TLS, sips:) entry is SIPS, the carrier's plain.
        ("sip:+15551234567@192.0.2.10", [f"<sip:{ME}:5060;lr;r2=on>", f"<sips:{ME}:5061;lr;r2=on>"]),
    ],
)
def test_sips_caller_over_tls_gets_sips_record_route_on_its_leg(contact: str, expected: list[str]) -> None:
    core, net = tls_core()
    switch_tls = Target("tls", "10.0.0.5", 40000, 7)
    core.receive(tls_invite("sips"), switch_tls, 0.0)
    out = net.take()
    req = out[1][1]
    assert isinstance(req, SipRequest)
    clearip_reply(
        core, response_to(req, 302, "Moved Temporarily", f"Contact: <{contact}>\r\n", to_tag="cip"), 0.05
    )
    fwd = next(m for _, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
    assert fwd.get_all("record-route") == expected


def test_sip_caller_over_tls_to_sip_tls_contact_keeps_a_sip_record_route() -> None:
    core, net = tls_core()
    core.receive(tls_invite("sip"), Target("tls", "10.0.0.5", 40000, 7), 0.0)
    req = net.take()[1][1]
    assert isinstance(req, SipRequest)
    contact = "Contact: <sip:+15551234567@192.0.2.10;transport=tls>\r\n"
    clearip_reply(core, response_to(req, 302, "Moved Temporarily", contact, to_tag="cip"), 0.05)
    fwd = next(m for _, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
    assert fwd.get_all("record-route") == [f"<sip:{ME}:5061;transport=tls;lr>"]


# --- Allow (RFC 3261 §20.5, §21.4.6) -----------------------------------------------------------
def out_of_dialog(method: str, branch: str) -> bytes:
    return (
        f"{method} sip:+15551234567@acme.sip.clearip.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK{branch}\r\nMax-Forwards: 70\r\n"
        "From: <sip:+12125550100@10.0.0.5>;tag=sw1\r\nTo: <sip:+15551234567@acme.sip.clearip.com>\r\n"
        f"Call-ID: ood-{branch}@10.0.0.5\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("method", ["MESSAGE", "SUBSCRIBE", "REGISTER", "PUBLISH"])
def test_405_allow_lists_only_methods_the_proxy_accepts(method: str) -> None:
    core, net = make_core()
    core.receive(out_of_dialog(method, "m1"), SWITCH, 0.0)
    out = net.take()
    assert len(out) == 1
    resp = out[0][1]
    assert isinstance(resp, SipResponse) and resp.status == 405
    allow = [m.strip() for m in (resp.get("allow") or "").split(",")]
    assert method not in allow
    # Every method the 405 says is allowed is not refused with 405 (BYE and friends: 481 without a
    # dialog, CANCEL: 481 without its INVITE, ACK: forwarded).
    for i, allowed in enumerate(allow):
        core.receive(out_of_dialog(allowed, f"a{i}"), SWITCH, 1.0 + i)
        statuses = [m.status for _, m in net.take() if isinstance(m, SipResponse)]
        assert 405 not in statuses, allowed
    # OPTIONS answers the same list.
    core.receive(out_of_dialog("OPTIONS", "o1"), SWITCH, 20.0)
    options = net.take()[0][1]
    assert isinstance(options, SipResponse) and options.status == 200
    assert options.get("allow") == resp.get("allow")
