"""The STIR/SHAKEN facts of a call's record come from what its INVITE carried when it went out
(core/call.py ``call_record``): the 302's Identity / P-Asserted-Identity, or those the Contact tried
last carried in its URI (RFC 3261 §19.1.1), which replace them on that branch. Fake clock, no I/O."""

from __future__ import annotations

import json
import logging

import pytest

from proxy_runtime.metrics import names
from proxy_runtime.metrics.recorder import CALL_LOGGER
from tests.unit.test_proxy_core import clearip_reply, response_to, to_clearip
from tests.unit.test_redirect_shapes import (
    CARRIER_A,
    CARRIER_B,
    ID_A,
    ID_B,
    ID_DIV,
    contact,
    invites_to,
    make_core,
    redirect_with,
)

VERIFIED = "<tel:+12125550100;verstat=TN-Validation-Passed>"


def test_the_last_contacts_own_passport_is_the_calls(caplog: pytest.LogCaptureFixture) -> None:
    core, net, rec = make_core()
    req = to_clearip(core, net)
    contacts = [
        contact(CARRIER_A, 0.9, [("Identity", ID_A), ("Identity", ID_DIV)]),
        contact(CARRIER_B, 0.8, [("Identity", ID_B), ("P-Asserted-Identity", VERIFIED)]),
    ]
    clearip_reply(core, redirect_with(req, contacts), 0.05)
    ((_, first),) = invites_to(net.take())
    core.receive(response_to(first, 503, "Service Unavailable"), CARRIER_A, 0.1)
    ((_, second),) = invites_to(net.take())
    with caplog.at_level(logging.INFO, logger=CALL_LOGGER):
        core.receive(
            response_to(second, 200, "OK", "Contact: <sip:callee@198.51.100.20>\r\n"), CARRIER_B, 0.2
        )
    iv = rec.close_interval(60.0)
    attest = names.STIR_ATTESTATION_METRICS
    assert [iv.count(attest[k]) for k in "ABC"] == [0, 1, 0]  # carrier B's branch, not A's
    assert iv.count(names.STIR_DIV_CALLS) == 0
    assert iv.count(names.STIR_VERSTAT_METRICS["TN-Validation-Passed"]) == 1
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == CALL_LOGGER]
    assert (line["attest"], line["verstat"], line["carrier"]) == (
        "B",
        "TN-Validation-Passed",
        "198.51.100.20:5080",
    )


def test_the_302s_headers_when_the_contact_has_none() -> None:
    core, net, rec = make_core()
    req = to_clearip(core, net)
    extra = f"P-Asserted-Identity: {VERIFIED}\r\n"
    clearip_reply(core, redirect_with(req, [contact(CARRIER_A, 0.9)], extra=extra), 0.05)
    ((_, fwd),) = invites_to(net.take())
    core.receive(response_to(fwd, 200, "OK", "Contact: <sip:callee@192.0.2.10>\r\n"), CARRIER_A, 0.2)
    iv = rec.close_interval(60.0)
    assert iv.count(names.STIR_VERSTAT_METRICS["TN-Validation-Passed"]) == 1
    assert iv.count(names.CALLS_ANSWERED) == 1


def test_a_network_blocked_answer_is_a_603_plus() -> None:
    core, net, rec = make_core()
    req = to_clearip(core, net)
    clearip_reply(core, response_to(req, 603, "Network Blocked", to_tag="cip"), 0.05)
    iv = rec.close_interval(60.0)
    assert iv.count(names.BLOCKED_METRICS["603+"]) == 1
    assert iv.count(names.BLOCKED_METRICS["603"]) == 0
