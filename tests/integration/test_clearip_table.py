"""One test per row of DESIGN.md §2's ClearIP table (and route advance over Contacts), with SIPp as the
switch, ClearIP and carriers, over real UDP and TCP on 127.0.0.1. Each asserts what each peer got."""

from __future__ import annotations

import pytest

from tests.integration.flows import (
    CALLED,
    IDENTITY_1,
    IDENTITY_2,
    IDENTITY_DIV,
    PAI_OUTBOUND,
    PAI_VERSTAT,
    PARTITION_HOST,
    acked,
    direct_to_proxy,
    elapsed_to_final,
    first_invite,
    routed_call,
)
from tests.integration.harness import CALLER_IDENTITY, HOST, Lab, free_port

pytestmark = pytest.mark.sipp

BOTH = pytest.mark.parametrize("transport", ["udp", "tcp"])


# --- 302 --------------------------------------------------------------------------------------


@BOTH
def test_302_identity_and_pai_copied_byte_for_byte_to_the_carrier(lab: Lab, transport: str) -> None:
    call = routed_call(
        lab,
        switch_transport=transport,
        carriers=[("carrier_answer.xml", transport, 0.9)],
        switch_kw={"ruri_host": PARTITION_HOST},
    )
    d = lab.describe
    assert call.switch.exit_code == 0, d()
    assert call.switch_final().status == 200, d()
    # ClearIP got the INVITE with the Request-URI unchanged, and an ACK for its 302.
    sent_invite = call.switch.sent("INVITE")[0]
    at_clearip = first_invite(call.clearip)
    assert at_clearip.request_uri == sent_invite.request_uri == f"sip:{CALLED}@{PARTITION_HOST}", d()
    assert at_clearip.request_uri == sent_invite.request_uri, d()
    the_302 = call.clearip.sent(302)[0]
    assert acked(call.clearip, the_302), "ClearIP got no ACK for its 302\n" + d()
    # The carrier got the INVITE with ClearIP's Identity headers, byte for byte, in order, and its PAI;
    # the switch's own Identity/PAI are gone.
    at_carrier = first_invite(call.carrier)
    assert the_302.all("Identity") == [IDENTITY_1, IDENTITY_2]
    assert at_carrier.all("Identity") == [IDENTITY_1, IDENTITY_2], d()
    assert CALLER_IDENTITY not in at_carrier.raw.decode(), d()
    assert at_carrier.all("P-Asserted-Identity") == [PAI_OUTBOUND], d()
    assert f"{CALLED}@{HOST}:{call.carrier.port}" in at_carrier.request_uri, d()
    # Max-Forwards decremented; the proxy record-routes, so the dialog's BYE reached the carrier.
    assert int(at_carrier.get("Max-Forwards") or 0) < 70, d()
    assert at_carrier.all("Record-Route"), d()
    assert call.carrier.received("BYE") and call.carrier.received("ACK"), d()
    assert [m.status for m in call.switch.received() if m.cseq[1] == "BYE"] == [200], d()
    assert call.carrier.exit_code == 0 and call.clearip.exit_code == 0, d()


def test_302_three_identities_with_diversion_over_udp(lab: Lab) -> None:
    """Three Identity headers (~2.7 kB, one ppt="div") still arrive intact at a UDP carrier."""
    call = routed_call(lab, clearip_scenario="clearip_302_div.xml")
    d = lab.describe
    assert call.switch_final().status == 200, d()
    at_carrier = first_invite(call.carrier)
    assert at_carrier.all("Identity") == [IDENTITY_1, IDENTITY_2, IDENTITY_DIV], d()
    assert 'ppt="div"' in at_carrier.all("Identity")[2]
    assert call.clearip.sent(302)[0].all("Identity") == at_carrier.all("Identity")
    assert call.switch.exit_code == 0 and call.carrier.exit_code == 0, d()


@BOTH
def test_302_inbound_pai_with_verstat_reaches_the_switch(lab: Lab, transport: str) -> None:
    """Inbound direction: ClearIP's 302 carries a verified PAI ("[V]" name, verstat); the callee side
    (a carrier UAS here, i.e. the customer's switch) gets it byte for byte instead of the caller's."""
    call = routed_call(
        lab,
        switch_transport=transport,
        carriers=[("carrier_answer.xml", transport, 1.0)],
        clearip_scenario="clearip_302_pai.xml",
        clearip_keys={"pai": PAI_VERSTAT},
    )
    d = lab.describe
    assert call.switch_final().status == 200, d()
    at_callee = first_invite(call.carrier)
    assert at_callee.all("P-Asserted-Identity") == [PAI_VERSTAT], d()
    assert call.clearip.sent(302)[0].get("P-Asserted-Identity") == PAI_VERSTAT


@BOTH
def test_302_serial_fork_in_q_order_first_503_then_second(lab: Lab, transport: str) -> None:
    """Contact lists the q=0.5 carrier first and the q=0.9 one second: q wins. The q=0.9 carrier
    answers 503 (route advance); the q=0.5 carrier (other transport) answers the call."""
    other = "tcp" if transport == "udp" else "udp"
    call = routed_call(
        lab,
        switch_transport=transport,
        carriers=[("carrier_503.xml", transport, 0.9), ("carrier_answer.xml", other, 0.5)],
        contacts_order=[1, 0],
    )
    d = lab.describe
    first, second = call.carriers
    assert call.switch_final().status == 200, d()
    assert [m.status for m in call.switch.final_responses()] == [200], d()
    inv1, inv2 = first_invite(first), first_invite(second)
    assert inv1.time <= inv2.time, "the q=0.9 Contact must be tried first\n" + d()
    assert acked(first, first.sent(503)[0]), d()
    assert inv2.all("Identity") == [IDENTITY_1, IDENTITY_2], d()
    assert second.received("BYE"), d()


def test_302_ties_in_q_are_tried_in_listed_order(lab: Lab) -> None:
    call = routed_call(
        lab,
        carriers=[("carrier_503.xml", "udp", 0.5), ("carrier_answer.xml", "udp", 0.5)],
    )
    d = lab.describe
    assert call.switch_final().status == 200, d()
    assert first_invite(call.carriers[0]).time <= first_invite(call.carriers[1]).time, d()


@BOTH
def test_302_first_contact_silent_then_second_within_timeout(lab: Lab, transport: str) -> None:
    call = routed_call(
        lab,
        switch_transport=transport,
        carriers=[("carrier_silent.xml", transport, 0.9), ("carrier_answer.xml", transport, 0.8)],
        proxy_kw={"timeout": 1.0},
    )
    d = lab.describe
    silent, answering = call.carriers
    assert call.switch_final().status == 200, d()
    gap = first_invite(answering).time - first_invite(silent).time
    # Not before the 1 s timeout (the proxy's timer never fires early; 0.1 s for the trace clocks of
    # two SIPp processes). The upper limit only shows the silent Contact did not hold the call past
    # its timeout: anything beyond 1 s is scheduling delay, of which a loaded 2-core machine may add
    # a few seconds; a proxy that never advanced would leave the call to SIPp's 15 s timeout.
    assert 0.9 <= gap <= 1.0 + 3.0, f"advanced after {gap:.2f} s, expected about the 1 s timeout\n" + d()
    assert answering.received("BYE"), d()


def test_no_contact_is_tried_after_the_fork_window(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three silent Contacts, 1 s each, a 1.5 s fork window: the second starts at about 1 s, the
    third (about 2 s, its PASSporT older than the window allows) never does; the switch gets 503
    with the cause at once, and route-advances."""
    monkeypatch.setenv("CLEARIP_PROXY_FORK_WINDOW", "1.5")
    call = routed_call(
        lab,
        switch_scenario="uac_expect_final.xml",
        carriers=[("carrier_silent.xml", "tcp", q) for q in (0.9, 0.8, 0.7)],
        proxy_kw={"timeout": 1.0},
    )
    d = lab.describe
    first, second, third = call.carriers
    (final,) = call.switch.final_responses()
    assert final.status == 503 and "fork window (1.5 s) passed" in (final.get("Reason") or ""), d()
    assert first.received("INVITE") and second.received("INVITE"), d()
    assert not third.received("INVITE"), d()
    assert "fork window (1.5 s) passed" in call.proxy.log_text(), d()


@BOTH
def test_302_all_contacts_fail_best_response(lab: Lab, transport: str) -> None:
    """503 then 486: both advance; the best response (RFC 3261 §16.7: 4xx before 5xx) is 486."""
    call = routed_call(
        lab,
        switch_transport=transport,
        switch_scenario="uac_expect_final.xml",
        carriers=[("carrier_503.xml", "udp", 0.9), ("carrier_486.xml", "tcp", 0.8)],
    )
    d = lab.describe
    assert [m.status for m in call.switch.final_responses()] == [486], d()
    for c in call.carriers:
        assert len(c.received("INVITE")) >= 1, d()
        assert acked(c, c.sent()[-1]), d()


def test_302_carrier_603_is_not_route_advanced(lab: Lab) -> None:
    call = routed_call(
        lab,
        switch_scenario="uac_expect_final.xml",
        carriers=[("carrier_603.xml", "udp", 0.9), ("carrier_answer.xml", "udp", 0.8)],
    )
    d = lab.describe
    assert [m.status for m in call.switch.final_responses()] == [603], d()
    assert call.carriers[1].received("INVITE") == [], "advanced after a 6xx\n" + d()


# --- ClearIP finals relayed --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "code"),
    [("clearip_503.xml", 503), ("clearip_404.xml", 404), ("clearip_403.xml", 403), ("clearip_480.xml", 480)],
)
@BOTH
def test_clearip_final_is_relayed_to_the_switch(lab: Lab, transport: str, scenario: str, code: int) -> None:
    call = direct_to_proxy(lab, "uac_expect_final.xml", switch_transport=transport, clearip_scenario=scenario)
    d = lab.describe
    finals = call.switch.final_responses()
    assert [m.status for m in finals] == [code], d()
    assert finals[0].reason_phrase == call.clearip.sent(code)[0].reason_phrase, d()
    assert acked(call.clearip, call.clearip.sent(code)[0]), "ClearIP got no ACK for its final\n" + d()
    assert call.carrier.received() == [], "no carrier may be contacted\n" + d()
    assert call.switch.exit_code == 0, d()


@BOTH
def test_clearip_603_plus_relayed_with_reason_intact_and_no_carrier(lab: Lab, transport: str) -> None:
    call = direct_to_proxy(
        lab, "uac_expect_final.xml", switch_transport=transport, clearip_scenario="clearip_603plus.xml"
    )
    d = lab.describe
    finals = call.switch.final_responses()
    assert [m.status for m in finals] == [603], d()
    got, sent = finals[0], call.clearip.sent(603)[0]
    assert got.start_line == "SIP/2.0 603 Network Blocked", d()
    assert got.all("Reason") == sent.all("Reason") == ['SIP;cause=603;text="Network Blocked"'], d()
    assert got.all("Call-Info") == sent.all("Call-Info"), d()
    assert got.all("Warning") == sent.all("Warning"), d()
    assert call.carrier.received() == [], d()
    assert acked(call.clearip, sent), d()


@BOTH
def test_clearip_silent_gives_503_with_reason_within_timeout(lab: Lab, transport: str) -> None:
    call = direct_to_proxy(
        lab,
        "uac_expect_final.xml",
        switch_transport=transport,
        clearip_scenario="clearip_silent.xml",
        proxy_kw={"timeout": 1.0},
    )
    d = lab.describe
    finals = call.switch.final_responses()
    assert [m.status for m in finals] == [503], d()
    assert finals[0].get("Reason"), "the 503 must say why in a Reason header\n" + d()
    took = elapsed_to_final(call.switch)
    # The 503 comes from the 1 s timeout (not before it), and not from anything much later: the
    # switch's own 15 s SIPp timeout, or the 32 s of Timer B. Load may add a few seconds to 1 s.
    assert 0.9 <= took <= 1.0 + 3.0, f"503 after {took:.2f} s; timeout is 1 s\n" + d()
    assert call.clearip.received("INVITE"), d()
    assert call.carrier.received() == [], d()


@BOTH
def test_clearip_not_running_gives_503_at_once(lab: Lab, transport: str) -> None:
    dead = free_port()
    proxy = lab.proxy(dead, wait_clearip=False, timeout=5.0)
    switch = lab.switch("uac_expect_final.xml", proxy, transport)
    d = lab.describe
    finals = switch.final_responses()
    assert [m.status for m in finals] == [503], d()
    assert finals[0].get("Reason"), d()
    took = elapsed_to_final(switch)
    # A proxy that waited for its 5 s timeout would take >= 5 s; half of it leaves a loaded machine
    # 2.5 s of slack and still proves the 503 did not wait for the timeout.
    assert took <= 5.0 / 2, (
        f"503 after {took:.2f} s; must not wait the 5 s timeout when ClearIP is down\n" + d()
    )


# --- emergency numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("number", ["911", "+1911", "933", "+1933"])
@BOTH
def test_emergency_number_gets_503_at_once_without_clearip(lab: Lab, transport: str, number: str) -> None:
    call = direct_to_proxy(
        lab,
        "uac_expect_final.xml",
        switch_transport=transport,
        switch_kw={"number": number},
        proxy_kw={"timeout": 5.0},
    )
    d = lab.describe
    assert [m.status for m in call.switch.final_responses()] == [503], d()
    # Never waits on ClearIP: a proxy that asked it would take up to its 5 s timeout; half of that
    # is the slack a loaded machine gets.
    assert elapsed_to_final(call.switch) <= 5.0 / 2, d()
    assert call.clearip.received() == [], "ClearIP must not be asked for an emergency number\n" + d()
    assert call.carrier.received() == [], d()


def test_configured_emergency_number_gets_503_at_once(lab: Lab) -> None:
    call = direct_to_proxy(
        lab,
        "uac_expect_final.xml",
        switch_kw={"number": "112"},
        proxy_kw={"timeout": 5.0, "emergency_numbers": ["911", "933", "112"]},
    )
    d = lab.describe
    assert [m.status for m in call.switch.final_responses()] == [503], d()
    # Never waits on ClearIP: a proxy that asked it would take up to its 5 s timeout; half of that
    # is the slack a loaded machine gets.
    assert elapsed_to_final(call.switch) <= 5.0 / 2, d()
    assert call.clearip.received() == [], d()
