"""Pure serialisers: an :class:`Interval` to PutMetricData requests, or to one JSON log record.

:func:`build_requests` honours every PutMetricData limit: at most :data:`MAX_DATUMS_PER_REQUEST`
datums and :data:`MAX_REQUEST_BYTES` bytes a request (measured as the query protocol would encode
it, the largest of the protocols botocore may use), at most :data:`MAX_VALUES_PER_DATUM` distinct
values a datum (a larger histogram becomes several datums of the same metric and timestamp, which
CloudWatch aggregates), at most :data:`MAX_DIMENSIONS` dimensions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from proxy_runtime.metrics.records import Distribution, GaugeStats, Interval

MAX_DATUMS_PER_REQUEST = 1000
MAX_VALUES_PER_DATUM = 150
MAX_REQUEST_BYTES = 1_000_000
"""The API allows 1 MB a request; we stay under 10**6 bytes as measured by :func:`estimate_datum_bytes`."""
MAX_DIMENSIONS = 30

# Query-protocol key prefix of a datum, with the widest index ("1000").
_PREFIX = len("MetricData.member.1000.")
_VALUE_KEY = _PREFIX + len("Values.member.150=") + 1  # + "&"
_COUNT_KEY = _PREFIX + len("Counts.member.150=") + 1
_REQUEST_OVERHEAD = len("Action=PutMetricData&Version=2010-08-01&Namespace=") + 64


def _enc_len(text: str) -> int:
    return len(quote(text, safe="-_.~"))


def _num_len(value: float) -> int:
    # repr is the longest form botocore writes; "+" in an exponent is percent-encoded (2 more bytes).
    return len(repr(float(value))) + 2


def estimate_datum_bytes(datum: Mapping[str, Any]) -> int:
    """An upper bound of the bytes ``datum`` takes in a request body (any protocol)."""
    n = _PREFIX + len("MetricName=&") + _enc_len(str(datum["MetricName"]))
    n += _PREFIX + len("Timestamp=&") + 40
    if "Unit" in datum:
        n += _PREFIX + len("Unit=&") + _enc_len(str(datum["Unit"]))
    if "StorageResolution" in datum:
        n += _PREFIX + len("StorageResolution=&") + 4
    for i, dim in enumerate(datum.get("Dimensions", ()), start=1):
        idx = len(str(i))
        n += 2 * (_PREFIX + len("Dimensions.member.=&") + idx) + len("Name") + len("Value")
        n += _enc_len(str(dim["Name"])) + _enc_len(str(dim["Value"]))
    if "Value" in datum:
        n += _PREFIX + len("Value=&") + _num_len(datum["Value"])
    for v in datum.get("Values", ()):
        n += _VALUE_KEY + _num_len(v)
    for c in datum.get("Counts", ()):
        n += _COUNT_KEY + _num_len(c)
    stats = datum.get("StatisticValues")
    if stats:
        for key, v in stats.items():
            n += _PREFIX + len("StatisticValues.=&") + len(key) + _num_len(v)
    return n


def _timestamp(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _datums(interval: Interval, dims: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Counters first (MetricsDroppedIntervals rides in the first request), gauges, histograms."""
    ts = _timestamp(interval.timestamp)
    out: list[dict[str, Any]] = []
    for spec, n in interval.counts.items():
        out.append(
            {
                "MetricName": spec.name,
                "Dimensions": dims,
                "Timestamp": ts,
                "Value": float(n),
                "Unit": spec.unit.value,
            }
        )
    for spec, g in interval.gauges.items():
        out.append(
            {
                "MetricName": spec.name,
                "Dimensions": dims,
                "Timestamp": ts,
                "StatisticValues": {
                    "SampleCount": float(g.sample_count),
                    "Sum": float(g.sum),
                    "Minimum": float(g.minimum),
                    "Maximum": float(g.maximum),
                },
                "Unit": spec.unit.value,
            }
        )
    for spec, d in interval.distributions.items():
        for start in range(0, len(d.values), MAX_VALUES_PER_DATUM):
            stop = start + MAX_VALUES_PER_DATUM
            out.append(
                {
                    "MetricName": spec.name,
                    "Dimensions": dims,
                    "Timestamp": ts,
                    "Values": [float(v) for v in d.values[start:stop]],
                    "Counts": [float(c) for c in d.counts[start:stop]],
                    "Unit": spec.unit.value,
                }
            )
    return out


def build_requests(interval: Interval, namespace: str, dimensions: Mapping[str, str]) -> list[dict[str, Any]]:
    """PutMetricData keyword arguments for ``interval``, as few requests as the limits allow."""
    if len(dimensions) > MAX_DIMENSIONS:
        raise ValueError(f"at most {MAX_DIMENSIONS} dimensions")
    dims = [{"Name": k, "Value": v} for k, v in dimensions.items()]
    overhead = _REQUEST_OVERHEAD + _enc_len(namespace)
    requests: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    size = overhead
    for datum in _datums(interval, dims):
        n = estimate_datum_bytes(datum)
        if batch and (len(batch) >= MAX_DATUMS_PER_REQUEST or size + n > MAX_REQUEST_BYTES):
            requests.append({"Namespace": namespace, "MetricData": batch})
            batch, size = [], overhead
        batch.append(datum)
        size += n
    if batch:
        requests.append({"Namespace": namespace, "MetricData": batch})
    return requests


def _distribution_record(d: Distribution) -> dict[str, float | int]:
    return {
        "count": d.sample_count,
        "sum": round(d.sum, 3),
        "min": d.minimum,
        "max": d.maximum,
        "p50": d.percentile(50),
        "p90": d.percentile(90),
        "p99": d.percentile(99),
    }


def _gauge_record(g: GaugeStats) -> dict[str, float | int]:
    avg = g.sum / g.sample_count if g.sample_count else g.last
    return {
        "min": g.minimum,
        "max": g.maximum,
        "last": g.last,
        "avg": round(avg, 3),
        "samples": g.sample_count,
    }


def interval_record(interval: Interval, namespace: str, dimensions: Mapping[str, str]) -> dict[str, Any]:
    """The interval as one JSON-able record (the ``log`` sink's line)."""
    return {
        "event": "metrics",
        "namespace": namespace,
        "dimensions": dict(dimensions),
        "timestamp": _timestamp(interval.timestamp).isoformat().replace("+00:00", "Z"),
        "counts": {spec.name: n for spec, n in interval.counts.items()},
        "gauges": {spec.name: _gauge_record(g) for spec, g in interval.gauges.items()},
        "distributions": {spec.name: _distribution_record(d) for spec, d in interval.distributions.items()},
    }
