"""Dialog cases of issue 2 §5 through the proxy (Record-Route, loose routing from either side, PRACK,
CANCEL, OPTIONS to the proxy, Max-Forwards, untrusted sources), switch over UDP and over TCP."""

from __future__ import annotations

import contextlib
import socket

import pytest

from tests.integration.flows import IDENTITY_1, IDENTITY_2, direct_to_proxy, first_invite, routed_call
from tests.integration.harness import HOST, Lab

pytestmark = pytest.mark.sipp

BOTH = pytest.mark.parametrize("transport", ["udp", "tcp"])


def _statuses_for(peer, method: str) -> list[int]:
    return [m.status for m in peer.received() if not m.is_request and m.cseq[1] == method]


def _answered(lab: Lab, transport: str, switch_scenario: str, carrier_scenario: str):
    call = routed_call(
        lab,
        switch_transport=transport,
        switch_scenario=switch_scenario,
        carriers=[(carrier_scenario, transport, 1.0)],
    )
    d = lab.describe
    assert call.switch.exit_code == 0, "the switch's scenario did not complete\n" + d()
    assert call.carrier.exit_code == 0, "the carrier's scenario did not complete\n" + d()
    assert first_invite(call.carrier).all("Identity") == [IDENTITY_1, IDENTITY_2], d()
    ok = [m for m in call.switch.received(200) if m.cseq == (1, "INVITE")]
    assert ok and ok[0].all("Record-Route"), "no Record-Route in the 200 for the INVITE\n" + d()
    return call


@BOTH
def test_bye_from_caller(lab: Lab, transport: str) -> None:
    call = _answered(lab, transport, "uac_call.xml", "carrier_answer.xml")
    bye = call.carrier.received("BYE")
    assert len(bye) == 1, lab.describe()
    assert bye[0].request_uri.startswith(f"sip:carrier@127.0.0.1:{call.carrier.port}"), lab.describe()
    assert _statuses_for(call.switch, "BYE") == [200], lab.describe()


@BOTH
def test_bye_from_callee(lab: Lab, transport: str) -> None:
    call = _answered(lab, transport, "uac_callee_requests.xml", "carrier_bye.xml")
    assert len(call.switch.received("BYE")) == 1, lab.describe()
    assert call.switch.received("BYE")[0].request_uri.startswith("sip:switch@"), lab.describe()
    assert _statuses_for(call.carrier, "BYE") == [200], lab.describe()


@BOTH
def test_reinvite_from_caller(lab: Lab, transport: str) -> None:
    call = _answered(lab, transport, "uac_reinvite.xml", "carrier_answer.xml")
    invites = call.carrier.received("INVITE")
    assert [m.cseq for m in invites] == [(1, "INVITE"), (2, "INVITE")], lab.describe()
    assert b"v=0" in invites[1].body, lab.describe()
    assert [m.cseq for m in call.carrier.received("ACK")] == [(1, "ACK"), (2, "ACK")], lab.describe()
    assert 200 in _statuses_for(call.switch, "INVITE"), lab.describe()


@pytest.mark.parametrize("method", ["UPDATE", "INFO", "NOTIFY"])
@BOTH
def test_in_dialog_request_from_caller(lab: Lab, transport: str, method: str) -> None:
    call = _answered(lab, transport, f"uac_{method.lower()}.xml", "carrier_answer.xml")
    got = call.carrier.received(method)
    assert len(got) == 1, lab.describe()
    assert got[0].body == call.switch.sent(method)[0].body, lab.describe()
    assert _statuses_for(call.switch, method) == [200], lab.describe()
    assert call.carrier.received("BYE"), lab.describe()


@BOTH
def test_reinvite_from_callee(lab: Lab, transport: str) -> None:
    call = _answered(lab, transport, "uac_callee_requests.xml", "carrier_reinvite.xml")
    assert [m.cseq for m in call.switch.received("INVITE")] == [(1, "INVITE")], lab.describe()
    assert call.switch.received("ACK"), "the callee's ACK for its re-INVITE did not arrive\n" + lab.describe()
    assert 200 in _statuses_for(call.carrier, "INVITE"), lab.describe()
    assert call.switch.received("BYE"), lab.describe()


@pytest.mark.parametrize("method", ["UPDATE", "INFO", "NOTIFY"])
@BOTH
def test_in_dialog_request_from_callee(lab: Lab, transport: str, method: str) -> None:
    call = _answered(lab, transport, "uac_callee_requests.xml", f"carrier_{method.lower()}.xml")
    got = call.switch.received(method)
    assert len(got) == 1, lab.describe()
    assert got[0].body == call.carrier.sent(method)[0].body, lab.describe()
    assert _statuses_for(call.carrier, method) == [200], lab.describe()
    assert call.switch.received("BYE"), lab.describe()


@BOTH
def test_prack_with_100rel(lab: Lab, transport: str) -> None:
    call = _answered(lab, transport, "uac_prack.xml", "carrier_prack.xml")
    p183 = call.switch.received(183)
    assert p183 and p183[0].get("RSeq") == "1" and "100rel" in (p183[0].get("Require") or ""), lab.describe()
    prack = call.carrier.received("PRACK")
    assert len(prack) == 1 and prack[0].get("RAck") == "1 1 INVITE", lab.describe()
    assert _statuses_for(call.switch, "PRACK") == [200], lab.describe()
    assert call.carrier.received("BYE"), lab.describe()


@BOTH
def test_cancel_after_ringing(lab: Lab, transport: str) -> None:
    call = routed_call(
        lab,
        switch_transport=transport,
        switch_scenario="uac_cancel.xml",
        carriers=[("carrier_ring_cancel.xml", transport, 1.0)],
    )
    d = lab.describe
    assert call.switch.exit_code == 0, d()
    assert _statuses_for(call.switch, "CANCEL") == [200], d()
    assert [m.status for m in call.switch.final_responses()] == [487], d()
    assert len(call.carrier.received("CANCEL")) == 1, "the CANCEL did not reach the ringing carrier\n" + d()
    assert call.carrier.received("ACK"), "the carrier got no ACK for its 487\n" + d()
    assert call.carrier.exit_code == 0, d()


@BOTH
def test_options_to_the_proxy_gets_200(lab: Lab, transport: str) -> None:
    call = direct_to_proxy(lab, "uac_options.xml", switch_transport=transport)
    assert call.switch.exit_code == 0, lab.describe()
    assert _statuses_for(call.switch, "OPTIONS") == [200], lab.describe()
    assert call.clearip.received() == [] and call.carrier.received() == [], lab.describe()


@BOTH
def test_max_forwards_zero_gets_483(lab: Lab, transport: str) -> None:
    call = direct_to_proxy(
        lab, "uac_expect_final.xml", switch_transport=transport, switch_kw={"keys": {"max_forwards": "0"}}
    )
    assert [m.status for m in call.switch.final_responses()] == [483], lab.describe()
    assert call.clearip.received() == [] and call.carrier.received() == [], lab.describe()


@pytest.mark.parametrize("scenario", ["uac_expect_final.xml", "uac_options.xml"])
@BOTH
def test_untrusted_source_gets_no_response_at_all(lab: Lab, transport: str, scenario: str) -> None:
    call = direct_to_proxy(
        lab,
        scenario,
        switch_transport=transport,
        proxy_kw={"allow": ["127.0.0.2/32"]},
        switch_kw={"timeout": 2.0},
    )
    # Nothing may come back to SIPp, whatever it managed to send.
    assert call.switch.received() == [], "an untrusted source must get no response\n" + lab.describe()
    if transport == "udp":
        assert call.switch.sent(), lab.describe()  # the request was sent and ignored
    else:
        # Over TCP the proxy closes an untrusted connection at once, possibly before SIPp could
        # write. Show that refusal directly: a connection from the same address is closed by the
        # proxy, without a byte, well before the 10 s a silently held connection would last.
        with socket.create_connection((HOST, call.proxy.port), timeout=10) as s:
            with contextlib.suppress(OSError):
                s.sendall(b"OPTIONS sip:x SIP/2.0\r\n")
            got = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):  # raises TimeoutError if the proxy keeps it open
                    got += chunk
            assert got == b"", got
    assert call.clearip.received() == [] and call.carrier.received() == [], lab.describe()


def test_sigterm_exits_zero(lab: Lab) -> None:
    call = routed_call(lab)
    assert call.switch_final().status == 200, lab.describe()
    assert call.proxy.stop() == 0, lab.describe()
