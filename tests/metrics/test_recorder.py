from __future__ import annotations

import json
import logging

import pytest

from proxy_runtime.metrics import names
from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.metrics.recorder import CALL_LOGGER, COUNTER_METRICS, MetricsRecorder
from proxy_runtime.metrics.records import quantize_ms
from tests.metrics.helpers import call


def test_seven_calls_fold_exactly() -> None:
    r = MetricsRecorder(proxy_id="p1")
    for i in range(4):
        r.record_call(call(i))
    r.record_call(call(4, carrier_attempts=3, route_advances=2, final_status=200))
    r.record_call(call(5, carrier_attempts=2, route_advances=1, final_status=486, reason="busy"))
    r.record_call(
        call(
            6,
            clearip_outcome=ClearIpOutcome.TIMEOUT,
            clearip_latency_ms=None,
            carrier_attempts=0,
            final_status=504,
            post_dial_delay_ms=5000.0,
            proxy_failed=True,
        )
    )
    iv = r.close_interval(1_700_000_000.0)
    assert iv.timestamp == 1_700_000_000.0
    assert iv.count(names.CALLS) == 7
    assert iv.count(names.CALLS_ANSWERED) == 5
    assert iv.count(names.PROXY_FAILED_CALLS) == 1
    assert iv.count(names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome.REDIRECT_302]) == 6
    assert iv.count(names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome.TIMEOUT]) == 1
    assert iv.count(names.HEARTBEAT) == 1
    adv = iv.distributions[names.ROUTE_ADVANCES]
    assert adv.sum == 3 and adv.sample_count == 6  # over the 6 routed calls
    att = iv.distributions[names.CARRIER_ATTEMPTS]
    assert att.sum == 4 + 3 + 2 and att.sample_count == 6
    lat = iv.distributions[names.CLEARIP_LATENCY]
    assert lat.sample_count == 6 and lat.sum == 6 * 12.5
    pdd = iv.distributions[names.POST_DIAL_DELAY]
    assert pdd.sample_count == 7 and pdd.maximum == 5000.0 and pdd.minimum == 250.0


def test_every_counter_published_with_zeros_and_interval_resets() -> None:
    r = MetricsRecorder(proxy_id="p1")
    r.record_call(call())
    r.close_interval(0.0)
    iv = r.close_interval(60.0)
    assert set(COUNTER_METRICS) <= set(iv.counts)
    assert iv.count(names.CALLS) == 0
    assert iv.count(names.HEARTBEAT) == 1
    assert iv.distributions == {}
    assert set(iv.gauges) == {names.CLEARIP_CONNECTED, names.IN_FLIGHT, names.CLEARIP_BREAKER_OPEN}
    assert iv.gauges[names.CLEARIP_CONNECTED].maximum == 0


def test_emergency_and_overload() -> None:
    r = MetricsRecorder(proxy_id="p1")
    r.record_call(
        call(
            clearip_outcome=None,
            clearip_latency_ms=None,
            carrier_attempts=0,
            emergency=True,
            final_status=503,
        )
    )
    r.record_call(
        call(
            clearip_outcome=None,
            clearip_latency_ms=None,
            carrier_attempts=0,
            final_status=503,
            post_dial_delay_ms=0.2,
            proxy_failed=True,
            overload_rejected=True,
        )
    )
    iv = r.close_interval(0.0)
    assert iv.count(names.EMERGENCY_BYPASS) == 1
    assert iv.count(names.OVERLOAD_REJECTED) == 1
    assert iv.count(names.CALLS) == 2
    assert sum(iv.count(m) for m in names.CLEARIP_OUTCOME_METRICS.values()) == 0
    assert names.CARRIER_ATTEMPTS not in iv.distributions
    assert names.CLEARIP_LATENCY not in iv.distributions


def test_counters_and_gauges() -> None:
    r = MetricsRecorder(proxy_id="p1")
    r.incr(names.MALFORMED_MESSAGES)
    r.incr(names.MALFORMED_MESSAGES, 4)
    r.incr(names.CLEARIP_RECONNECTS)
    r.set_gauge(names.CLEARIP_CONNECTED, 1)
    r.set_gauge(names.CLEARIP_CONNECTED, 0)
    r.set_gauge(names.CLEARIP_CONNECTED, 1)
    for n in (3, 10, 7):
        r.set_gauge(names.IN_FLIGHT, n)
    iv = r.close_interval(0.0)
    assert iv.count(names.MALFORMED_MESSAGES) == 5
    assert iv.count(names.CLEARIP_RECONNECTS) == 1
    # Gauges start at 0: one sample before the proxy sets them.
    c = iv.gauges[names.CLEARIP_CONNECTED]
    assert (c.minimum, c.maximum, c.last, c.sample_count, c.sum) == (0, 1, 1, 4, 2)
    f = iv.gauges[names.IN_FLIGHT]
    assert (f.minimum, f.maximum, f.last, f.sample_count, f.sum) == (0, 10, 7, 4, 20)
    # Carried into the next interval as its first sample.
    g = r.close_interval(60.0).gauges[names.IN_FLIGHT]
    assert (g.minimum, g.maximum, g.last, g.sample_count) == (7, 7, 7, 1)
    assert r.close_interval(120.0).count(names.MALFORMED_MESSAGES) == 0


def test_wrong_kind_rejected() -> None:
    r = MetricsRecorder(proxy_id="p1")
    with pytest.raises(ValueError):
        r.incr(names.CLEARIP_LATENCY)
    with pytest.raises(ValueError):
        r.set_gauge(names.CALLS, 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.0, 0.0), (-3.0, 0.0), (0.123, 0.12), (12.34, 12.3), (12.5, 12.5), (123.4, 123.0), (98765.4, 98800.0)],
)
def test_quantize(value: float, expected: float) -> None:
    assert quantize_ms(value) == expected


def test_quantize_bounded_and_accurate() -> None:
    seen = set()
    v = 1.0
    while v < 200_000:
        q = quantize_ms(v)
        assert abs(q - v) <= 0.005 * v + 1e-9
        seen.add(q)
        v *= 1.0003
    assert len(seen) <= 6 * 900


def test_call_log_line_masks_numbers(caplog: pytest.LogCaptureFixture) -> None:
    r = MetricsRecorder(proxy_id="proxy-a")
    with caplog.at_level(logging.INFO, logger=CALL_LOGGER):
        r.record_call(call(1, carrier_attempts=2, route_advances=1, clearip_latency_ms=12.345))
    [rec] = [x for x in caplog.records if x.name == CALL_LOGGER]
    assert rec.levelno == logging.INFO
    text = rec.getMessage()
    line = json.loads(text)
    assert line == {
        "event": "call",
        "proxy": "proxy-a",
        "call_id": "call-1@10.0.0.1",
        "outcome": "302",
        "clearip_ms": 12.3,
        "attempts": 2,
        "advances": 1,
        "carrier": None,
        "status": 200,
        "pdd_ms": 250.0,
        "attest": None,
        "div": 0,
        "identity_bad": 0,
        "verstat": None,
        "blocked": None,
        "emergency": False,
        "proxy_failed": False,
        "overload": False,
        "reason": "302 -> carrier 200",
        # Masked as SIP traces mask them: all digits but the last four.
        "caller": "+xxxxxxx1234",
        "callee": "+xxxxxxx9876",
    }
    for digits in ("5551234", "2125551", "5559876", "3105559"):
        assert digits not in text


def test_call_log_line_with_numbers(caplog: pytest.LogCaptureFixture) -> None:
    r = MetricsRecorder(proxy_id="proxy-a", log_numbers=True)
    with caplog.at_level(logging.INFO, logger=CALL_LOGGER):
        r.record_call(call(1, clearip_outcome=None, clearip_latency_ms=None, emergency=True))
    line = json.loads(caplog.records[-1].getMessage())
    assert line["caller"] == "+12125551234" and line["callee"] == "+13105559876"
    assert line["outcome"] is None and line["clearip_ms"] is None and line["emergency"] is True


def test_no_log_work_when_disabled(caplog: pytest.LogCaptureFixture) -> None:
    r = MetricsRecorder(proxy_id="p")
    with caplog.at_level(logging.WARNING, logger=CALL_LOGGER):
        r.record_call(call())
    assert not [x for x in caplog.records if x.name == CALL_LOGGER]
    assert r.close_interval(0).count(names.CALLS) == 1


def test_carriers_failed_counts_routed_calls_that_ran_out_of_carriers() -> None:
    r = MetricsRecorder(proxy_id="p")
    r.record_call(call(1, carrier_attempts=2, route_advances=1, final_status=503))  # all failed
    r.record_call(call(2, carrier_attempts=1, final_status=408))  # the only carrier timed out
    r.record_call(call(3, carrier_attempts=1, final_status=486))  # callee busy: not a carrier failure
    r.record_call(call(4, carrier_attempts=1, final_status=603))  # a block
    r.record_call(call(5, carrier_attempts=2, route_advances=1, final_status=200))  # advanced, answered
    r.record_call(call(6, carrier_attempts=0, final_status=503, proxy_failed=True))  # never routed
    assert r.close_interval(0).count(names.CARRIERS_FAILED_CALLS) == 2
