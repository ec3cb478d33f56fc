"""build_requests honours every PutMetricData limit, at 10x (and far beyond) what the proxy emits."""

from __future__ import annotations

import collections
import datetime as dt
import json
from typing import Any

import botocore.session
import pytest
from botocore.serialize import create_serializer
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_runtime.metrics import names
from proxy_runtime.metrics.names import MetricSpec, Unit
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.metrics.records import Distribution, GaugeStats, Interval, quantize_ms
from proxy_runtime.metrics.serialize import (
    MAX_DATUMS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    MAX_VALUES_PER_DATUM,
    build_requests,
    estimate_datum_bytes,
    interval_record,
)
from tests.metrics.helpers import call

DIMS = {names.DIMENSION_PROXY_ID: "i-0123456789abcdef0"}
TS = 1_764_158_400.0

_OP = botocore.session.get_session().get_service_model("cloudwatch").operation_model("PutMetricData")
PROTOCOLS = ("query", "json", "smithy-rpc-v2-cbor")


def body_size(request: dict[str, Any], protocol: str) -> int:
    """The real request body botocore would send, with each protocol CloudWatch speaks."""
    serialized = create_serializer(protocol).serialize_to_request(request, _OP)
    body = serialized["body"]
    if isinstance(body, dict):  # query: a form dict, url-encoded when sent
        from urllib.parse import urlencode

        return len(urlencode(body).encode())
    return len(body)


def check_limits(interval: Interval, requests: list[dict[str, Any]], *, measure: int = 1) -> None:
    """Every limit, and the figures preserved exactly. The first ``measure`` requests are also
    serialised by botocore with each protocol (slow) to check the size estimate is an upper bound."""
    assert requests, "at least one request"
    for i, req in enumerate(requests):
        assert req["Namespace"] == names.NAMESPACE
        data = req["MetricData"]
        assert 1 <= len(data) <= MAX_DATUMS_PER_REQUEST
        estimated = sum(estimate_datum_bytes(d) for d in data)
        assert estimated <= MAX_REQUEST_BYTES
        for d in data:
            assert d["Dimensions"] == [{"Name": "ProxyId", "Value": DIMS["ProxyId"]}]
            assert d["Timestamp"] == dt.datetime.fromtimestamp(TS, tz=dt.UTC)
            if "Values" in d:
                assert 1 <= len(d["Values"]) <= MAX_VALUES_PER_DATUM
                assert len(d["Values"]) == len(d["Counts"]) == len(set(d["Values"]))
        if i < measure:
            for protocol in PROTOCOLS:
                assert body_size(req, protocol) <= estimated + 200, protocol
    # Figures preserved exactly.
    counts: collections.Counter[str] = collections.Counter()
    hists: dict[str, collections.Counter[float]] = collections.defaultdict(collections.Counter)
    stats: dict[str, dict[str, float]] = {}
    for req in requests:
        for d in req["MetricData"]:
            if "Value" in d:
                counts[d["MetricName"]] += d["Value"]
            elif "Values" in d:
                for v, c in zip(d["Values"], d["Counts"], strict=True):
                    hists[d["MetricName"]][v] += c
            else:
                stats[d["MetricName"]] = d["StatisticValues"]
    assert counts == {s.name: n for s, n in interval.counts.items() if n} | {
        s.name: 0 for s, n in interval.counts.items() if not n
    }
    for spec, dist in interval.distributions.items():
        assert dict(hists[spec.name]) == dict(zip(dist.values, map(float, dist.counts), strict=True))
        assert sum(v * c for v, c in hists[spec.name].items()) == pytest.approx(dist.sum, rel=1e-12)
    assert set(hists) == {s.name for s in interval.distributions}
    for spec, g in interval.gauges.items():
        assert stats[spec.name] == {
            "SampleCount": g.sample_count,
            "Sum": g.sum,
            "Minimum": g.minimum,
            "Maximum": g.maximum,
        }


def busy_interval() -> Interval:
    """What a busy proxy's minute looks like: every metric, latencies spread over 4 decades."""
    r = MetricsRecorder(proxy_id="p")
    for i in range(20_000):
        r.record_call(
            call(
                i,
                clearip_latency_ms=1.0 + (i * 7.77) % 9_000,
                post_dial_delay_ms=50.0 + (i * 13.1) % 60_000,
                carrier_attempts=1 + i % 4,
                route_advances=i % 4,
                final_status=200 if i % 3 else 486,
            )
        )
    for spec in (names.MALFORMED_MESSAGES, names.UNTRUSTED_DROPPED, names.CLEARIP_RECONNECTS):
        r.incr(spec, 3)
    r.set_gauge(names.CLEARIP_CONNECTED, 1)
    r.set_gauge(names.IN_FLIGHT, 250)
    return r.close_interval(TS)


def test_busy_interval_one_request() -> None:
    interval = busy_interval()
    assert interval.count(names.CALLS) == 20_000
    requests = build_requests(interval, names.NAMESPACE, DIMS)
    check_limits(interval, requests)
    # A latency histogram this wide needs several datums, but the whole minute stays small.
    assert len(requests) <= 2


def ten_times(interval: Interval) -> Interval:
    """10x the metrics (10 copies of every spec under new names) and 10x the distinct values."""
    counts: dict[MetricSpec, int] = {}
    dists: dict[MetricSpec, Distribution] = {}
    gauges: dict[MetricSpec, GaugeStats] = {}
    for k in range(10):
        for s, n in interval.counts.items():
            counts[MetricSpec(f"{s.name}{k}", s.unit, "")] = n + k
        for s, g in interval.gauges.items():
            gauges[MetricSpec(f"{s.name}{k}", s.unit, "")] = g
        for s, d in interval.distributions.items():
            hist = collections.Counter(dict(zip(d.values, d.counts, strict=True)))
            for j, (v, c) in enumerate(zip(d.values, d.counts, strict=True)):
                for m in range(1, 10):  # 9 more distinct values near each one
                    hist[v + m * 1e-3 * (j % 7 + 1)] += c
            dists[MetricSpec(f"{s.name}{k}", s.unit, "")] = Distribution.from_mapping(hist)
    return Interval(TS, counts, dists, gauges)


def test_ten_times_what_we_emit() -> None:
    interval = ten_times(busy_interval())
    assert len(interval.counts) >= 180
    assert max(len(d.values) for d in interval.distributions.values()) > 10 * MAX_VALUES_PER_DATUM
    requests = build_requests(interval, names.NAMESPACE, DIMS)
    assert len(requests) > 1  # the 1 MB limit binds
    check_limits(interval, requests, measure=2)
    # Packed tightly: every request but the last is at least 3/4 full by size or by count.
    for req in requests[:-1]:
        size = sum(estimate_datum_bytes(d) for d in req["MetricData"])
        assert size > 0.75 * MAX_REQUEST_BYTES or len(req["MetricData"]) == MAX_DATUMS_PER_REQUEST


def test_datum_count_limit() -> None:
    counts = {MetricSpec(f"M{i}", Unit.COUNT, ""): i for i in range(2_500)}
    interval = Interval(TS, counts)
    requests = build_requests(interval, names.NAMESPACE, DIMS)
    assert [len(r["MetricData"]) for r in requests] == [1000, 1000, 500]
    check_limits(interval, requests, measure=0)


def test_too_many_dimensions() -> None:
    with pytest.raises(ValueError):
        build_requests(Interval(TS), names.NAMESPACE, {f"D{i}": "x" for i in range(31)})


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(st.integers(0, 300), st.integers(0, 10**6), max_size=300),
    st.lists(
        st.dictionaries(
            st.floats(0, 600_000, allow_nan=False).map(quantize_ms),
            st.integers(1, 10**9),
            min_size=1,
            max_size=900,
        ),
        max_size=12,
    ),
)
def test_limits_hold_for_any_interval(counters: dict[int, int], hists: list[dict[float, int]]) -> None:
    interval = Interval(
        TS,
        {MetricSpec(f"C{k}", Unit.COUNT, ""): n for k, n in counters.items()},
        {
            MetricSpec(f"D{i}", Unit.MILLISECONDS, ""): Distribution.from_mapping(h)
            for i, h in enumerate(hists)
        },
    )
    requests = build_requests(interval, names.NAMESPACE, DIMS)
    if not counters and not hists:
        assert requests == []  # an empty interval costs no request
    else:
        check_limits(interval, requests, measure=0)  # asserts at least one request, every figure kept


def test_interval_record_is_one_json_line() -> None:
    interval = busy_interval()
    rec = interval_record(interval, names.NAMESPACE, DIMS)
    line = json.dumps(rec)
    assert "\n" not in line
    assert rec["counts"]["Calls"] == 20_000 and rec["counts"]["Heartbeat"] == 1
    lat = rec["distributions"]["ClearIpLatency"]
    assert lat["count"] == 20_000 and lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert rec["gauges"]["InFlightTransactions"]["max"] == 250
    assert rec["timestamp"] == "2025-11-26T12:00:00Z"
