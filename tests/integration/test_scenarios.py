"""The SIPp scenarios validated against each other WITHOUT the proxy (switch straight to a carrier or
to the ClearIP stand-in), so a failure in the proxy tests is the proxy's, not the scenarios'."""

from __future__ import annotations

import pytest

from tests.integration.flows import PAI_VERSTAT
from tests.integration.harness import Lab, contact_list, make_identity

pytestmark = pytest.mark.sipp

TRANSPORTS = ["udp", "tcp"]


def _methods(peer, direction="received"):
    msgs = peer.received() if direction == "received" else peer.sent()
    return [m.method or str(m.status) for m in msgs]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("uac", "uas", "keys", "expect_at_uas"),
    [
        ("uac_call.xml", "carrier_answer.xml", {}, ["INVITE", "ACK", "BYE"]),
        ("uac_reinvite.xml", "carrier_answer.xml", {}, ["INVITE", "ACK", "INVITE", "ACK", "BYE"]),
        ("uac_update.xml", "carrier_answer.xml", {}, ["INVITE", "ACK", "UPDATE", "BYE"]),
        ("uac_info.xml", "carrier_answer.xml", {}, ["INVITE", "ACK", "INFO", "BYE"]),
        ("uac_notify.xml", "carrier_answer.xml", {}, ["INVITE", "ACK", "NOTIFY", "BYE"]),
        ("uac_callee_requests.xml", "carrier_bye.xml", {}, ["INVITE", "ACK", "200"]),
        ("uac_callee_requests.xml", "carrier_reinvite.xml", {}, ["INVITE", "ACK", "200", "200"]),
        ("uac_callee_requests.xml", "carrier_update.xml", {}, ["INVITE", "ACK", "200", "200"]),
        ("uac_callee_requests.xml", "carrier_info.xml", {}, ["INVITE", "ACK", "200", "200"]),
        ("uac_callee_requests.xml", "carrier_notify.xml", {}, ["INVITE", "ACK", "200", "200"]),
        ("uac_prack.xml", "carrier_prack.xml", {}, ["INVITE", "PRACK", "ACK", "BYE"]),
        ("uac_cancel.xml", "carrier_ring_cancel.xml", {}, ["INVITE", "CANCEL", "ACK"]),
        ("uac_expect_final.xml", "carrier_486.xml", {}, ["INVITE", "ACK"]),
        ("uac_expect_final.xml", "carrier_503.xml", {}, ["INVITE", "ACK"]),
        ("uac_expect_final.xml", "carrier_607.xml", {}, ["INVITE", "ACK"]),
        ("uac_expect_final.xml", "carrier_608.xml", {}, ["INVITE", "ACK"]),
    ],
)
def test_switch_against_carrier_directly(lab: Lab, transport, uac, uas, keys, expect_at_uas):
    carrier = lab.carrier("carrier", uas, transport, keys=keys)
    switch = lab.switch(uac, carrier.port, transport, keys=keys)
    lab.settle(carrier)
    assert switch.exit_code == 0, lab.describe()
    assert carrier.exit_code == 0, lab.describe()
    assert _methods(carrier) == expect_at_uas, lab.describe()


@pytest.mark.parametrize(
    ("scenario", "keys", "status"),
    [
        ("clearip_302.xml", "302", 302),
        ("clearip_302_div.xml", "302div", 302),
        ("clearip_302_pai.xml", "302pai", 302),
        ("clearip_404.xml", {}, 404),
        ("clearip_403.xml", {}, 403),
        ("clearip_603plus.xml", {}, 603),
        ("clearip_607.xml", {}, 607),
        ("clearip_608.xml", {}, 608),
        ("clearip_300.xml", "300", 300),
        ("clearip_302_no_contact.xml", "302", 302),
    ],
)
def test_switch_against_clearip_directly(lab: Lab, scenario, keys, status):
    if isinstance(keys, str):
        dummy = lab.sipp("dummy", "carrier_answer.xml")  # only for its port number in Contact
        keys = {
            "identity1": make_identity("a"),
            "identity2": make_identity("b"),
            "identity3": make_identity("c", ppt="div", quoted_ppt=True),
            "pai": PAI_VERSTAT,
            "contacts": contact_list([("+15555550100", dummy, 0.9), ("+15555550100", dummy, 0.5)]),
        }
    clearip = lab.clearip(scenario, keys)
    switch = lab.switch("uac_expect_final.xml", clearip.port, "tcp")
    lab.settle(clearip)
    assert switch.exit_code == 0, lab.describe()
    assert clearip.exit_code == 0, lab.describe()
    finals = switch.final_responses()
    assert [m.status for m in finals] == [status]
    sent = clearip.sent(status)[0]
    assert finals[0].headers == sent.headers
    assert [m.method for m in clearip.received()] == ["INVITE", "ACK"]
