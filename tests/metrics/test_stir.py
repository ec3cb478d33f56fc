"""Reading STIR/SHAKEN outcomes (metrics/stir.py) from real-shaped header values, and counting them."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from proxy_runtime.metrics import names, stir
from proxy_runtime.metrics.recorder import CALL_LOGGER, MetricsRecorder
from proxy_runtime.metrics.stir import Attestation, Block, Verstat
from tests.metrics import helpers
from tests.metrics.helpers import call

SIGNATURE, CERT = helpers.SIGNATURE, helpers.CERT
HDR = base64.urlsafe_b64encode(b'{"alg":"ES256","ppt":"shaken","typ":"passport"}').rstrip(b"=").decode()
b64, passport = helpers.b64, helpers.passport


@pytest.mark.parametrize("level", ["A", "B", "C"])
def test_attestation_of_a_shaken_passport(level: str) -> None:
    value = passport(level)
    assert len(value) > 400  # the shape seen on the wire
    out = stir.read_stir((value,), ())
    assert out == stir.StirOutcome(attestation=Attestation(level), shaken=1)


def test_quoted_ppt_lowercase_attest_and_folded_whitespace() -> None:
    value = "  " + passport("b", param='"shaken"')
    assert stir.read_stir((value,), ()).attestation is Attestation.PARTIAL


def test_several_identity_headers_with_diversion() -> None:
    values = (passport("A"), passport(None, ppt="div"), passport(None, ppt="div"))
    out = stir.read_stir(values, ())
    assert (out.attestation, out.shaken, out.div, out.undecodable) == (Attestation.FULL, 1, 2, 0)


def test_identity_values_joined_with_commas_in_one_header_line() -> None:
    out = stir.read_stir((passport("C") + ", " + passport(None, ppt="div"),), ())
    assert (out.attestation, out.div) == (Attestation.GATEWAY, 1)


def test_ppt_from_the_parameter_when_the_jws_header_is_unreadable() -> None:
    value = passport(None, ppt="div")
    _, payload, sig = value.split(";", 1)[0].split(".")
    broken = f"!!!.{payload}.{sig};info=<{CERT}>;alg=ES256;ppt=div"
    assert stir.read_stir((broken,), ()).div == 1


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-jws;info=<https://x/c.pem>",  # no dots
        "a.b;info=<https://x/c.pem>",  # two parts
        f"{b64({'alg': 'ES256', 'ppt': 'shaken'})}.%%%%.{SIGNATURE}",  # payload not base64url
        f"{b64({'alg': 'ES256', 'ppt': 'shaken'})}.{b64('just a string')}.{SIGNATURE}",  # not an object
        f"{b64({'alg': 'ES256', 'ppt': 'shaken'})}..{SIGNATURE};ppt=shaken",  # RFC 8225 compact form
        f"{b64({'alg': 'ES256', 'ppt': 'shaken'})}.{base64.urlsafe_b64encode(b'{').decode()}.{SIGNATURE}",
        f"{HDR}.{base64.urlsafe_b64encode(bytes([0xFF, 0xFE])).decode()}.x",  # not UTF-8
        passport(None),  # SHAKEN without attest (missing claim)
        passport("D"),  # not an attestation level
        f"{HDR}.{b64({'attest': ['A']})}.{SIGNATURE}",  # wrong type
        "x" * 20_000 + ".a.b",  # absurdly long
    ],
)
def test_undecodable_values_are_counted_never_raised(bad: str) -> None:
    out = stir.read_stir((bad, passport("B")), ())
    assert (out.undecodable, out.attestation, out.shaken) == (1, Attestation.PARTIAL, 1)


def test_other_passport_types_are_neither_counted_nor_undecodable() -> None:
    out = stir.read_stir((passport(None, ppt="rph"),), ())
    assert out == stir.StirOutcome()


@pytest.mark.parametrize(
    ("pai", "expected", "raw"),
    [
        (
            '"[V] Alice" <sip:+12025550100;verstat=TN-Validation-Passed@clearip.example;user=phone>',
            Verstat.PASSED,
            "TN-Validation-Passed",
        ),
        ("<tel:+12025550100;verstat=TN-Validation-Failed>", Verstat.FAILED, "TN-Validation-Failed"),
        (
            "<sip:+12025550100@10.0.0.1;user=phone>;verstat=No-TN-Validation",
            Verstat.NO_VALIDATION,
            "No-TN-Validation",
        ),
        ("<sip:+12025550100;VERSTAT=tn-validation-passed@h>", Verstat.PASSED, "tn-validation-passed"),
        ("<tel:+12025550100;verstat=TN-Validation-Passed-A>", Verstat.OTHER, "TN-Validation-Passed-A"),
        ('"verstat=TN-Validation-Passed" <sip:+12025550100@h>', None, ""),  # in the display name only
        ("<sip:+12025550100@h>", None, ""),
    ],
)
def test_verstat(pai: str, expected: Verstat | None, raw: str) -> None:
    out = stir.read_stir((), (pai,))
    assert (out.verstat, out.verstat_raw) == (expected, raw)


def test_verstat_from_the_first_pai_that_has_one() -> None:
    values = ("<sip:+12025550100@h;user=phone>", "<tel:+12025550100;verstat=TN-Validation-Failed>")
    assert stir.read_stir((), values).verstat is Verstat.FAILED
    joined = ('"Bob, Jr" <sip:+1202@h>, <tel:+12025550100;verstat=No-TN-Validation>',)
    assert stir.read_stir((), joined).verstat is Verstat.NO_VALIDATION


@pytest.mark.parametrize(
    ("status", "reason", "block"),
    [
        (603, "Decline", Block.DECLINE_603),
        (603, "Network Blocked", Block.NETWORK_BLOCKED_603),
        (603, "network blocked ", Block.NETWORK_BLOCKED_603),
        (607, "Unwanted", Block.UNWANTED_607),
        (608, "Rejected", Block.REJECTED_608),
        (600, "Busy Everywhere", None),
        (200, "OK", None),
        (503, "Network Blocked", None),
    ],
)
def test_blocked(status: int, reason: str, block: Block | None) -> None:
    assert stir.blocked(status, reason) is block


def test_recorder_counts_stir_outcomes_and_blocks() -> None:
    r = MetricsRecorder(proxy_id="p")
    r.record_call(call(1, identity=(passport("A"),)))
    r.record_call(call(2, identity=(passport("A"), passport(None, ppt="div"))))
    r.record_call(call(3, identity=(passport("B"), "garbage")))
    r.record_call(call(4, identity=(passport("C"),)))
    r.record_call(call(5, pai=("<tel:+12025550100;verstat=TN-Validation-Passed>",)))
    r.record_call(call(6, pai=("<tel:+12025550100;verstat=TN-Validation-Failed>",)))
    r.record_call(call(7, pai=("<tel:+12025550100;verstat=No-TN-Validation>",)))
    r.record_call(call(8, pai=("<tel:+12025550100;verstat=Something-Else>",)))
    r.record_call(call(9, final_status=603, final_reason="Decline", carrier_attempts=0))
    r.record_call(call(10, final_status=603, final_reason="Network Blocked", carrier_attempts=0))
    r.record_call(call(11, final_status=607, final_reason="Unwanted", carrier_attempts=0))
    r.record_call(call(12, final_status=608, final_reason="Rejected", carrier_attempts=0))
    iv = r.close_interval(0.0)
    att = names.STIR_ATTESTATION_METRICS
    assert [iv.count(att[k]) for k in "ABC"] == [2, 1, 1]
    assert iv.count(names.STIR_DIV_CALLS) == 1
    assert iv.count(names.STIR_UNDECODABLE) == 1
    vs = names.STIR_VERSTAT_METRICS
    assert [iv.count(m) for m in vs.values()] == [1, 1, 1, 1]
    assert [iv.count(m) for m in names.BLOCKED_METRICS.values()] == [1, 1, 1, 1]
    assert iv.count(names.CALLS) == 12
    nxt = r.close_interval(60.0)  # zeros next interval, still published
    assert all(nxt.count(m) == 0 for m in (*att.values(), *vs.values(), *names.BLOCKED_METRICS.values()))
    assert names.STIR_DIV_CALLS in nxt.counts


def test_call_line_carries_stir_fields(caplog: pytest.LogCaptureFixture) -> None:
    r = MetricsRecorder(proxy_id="p")
    with caplog.at_level(logging.INFO, logger=CALL_LOGGER):
        r.record_call(call(1, identity=(passport("B"), passport(None, ppt="div")), carrier="192.0.2.10:5060"))
        r.record_call(
            call(
                2,
                pai=('"[V] +12025550100" <sip:+12025550100;verstat=TN-Validation-Passed@h;user=phone>',),
                final_status=603,
                final_reason="Network Blocked",
            )
        )
    first, second = (json.loads(x.getMessage()) for x in caplog.records if x.name == CALL_LOGGER)
    assert (first["attest"], first["div"], first["identity_bad"], first["carrier"]) == (
        "B",
        1,
        0,
        "192.0.2.10:5060",
    )
    assert (first["verstat"], first["blocked"]) == (None, None)
    assert (second["attest"], second["verstat"], second["blocked"]) == (None, "TN-Validation-Passed", "603+")


def test_a_failing_reader_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_: object) -> stir.StirOutcome:
        raise RuntimeError("unforeseen")

    r = MetricsRecorder(proxy_id="p", read_stir=boom)
    with caplog.at_level(logging.INFO):
        r.record_call(call(1, identity=(passport("A"),)))
        r.record_call(call(2, identity=(passport("A"),)))
    iv = r.close_interval(0.0)
    assert iv.count(names.CALLS) == 2
    assert iv.count(names.STIR_ATTESTATION_METRICS["A"]) == 0
    assert len([x for x in caplog.records if "reading STIR/SHAKEN headers failed" in x.getMessage()]) == 1
    assert len([x for x in caplog.records if x.name == CALL_LOGGER]) == 2
