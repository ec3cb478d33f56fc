"""What the proxy hands to the metrics recorder, and what the recorder hands to a sink.

:class:`CallRecord` is built once per finished call on the hot path; :class:`Interval` is the folded
figures of one metrics interval, built off the hot path by ``MetricsRecorder.close_interval``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy_runtime.metrics.names import ClearIpOutcome, MetricSpec


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What one call did. Built by the proxy when it sends the final response to the caller."""

    call_id: str
    clearip_outcome: ClearIpOutcome | None  # None when ClearIP was not asked (emergency, overload, drain)
    clearip_latency_ms: float | None
    carrier_attempts: int
    route_advances: int
    final_status: int  # status sent to the caller
    post_dial_delay_ms: float | None  # INVITE received -> first 18x or final
    emergency: bool
    proxy_failed: bool  # the proxy itself failed the call (timeout, unavailable, overload, internal)
    overload_rejected: bool = False
    caller: str = ""  # From user part; logged only when log_numbers
    callee: str = ""  # R-URI user part; logged only when log_numbers
    reason: str = ""  # short text, e.g. "clearip timeout", "302 -> carrier 200"; never a phone number
    # ClearIP's answer as copied into the INVITE (read by metrics/stir.py, never verified).
    identity: tuple[str, ...] = ()  # Identity values of the 302 (outbound: ClearIP signed)
    pai: tuple[str, ...] = ()  # P-Asserted-Identity values of the 302 (inbound: ClearIP verified)
    final_reason: str = ""  # reason phrase of the final sent to the caller ("Network Blocked": 603+)
    carrier: str = ""  # host:port of the last carrier tried ("" when none); an address, not a number


def quantize_ms(value: float) -> float:
    """Round a latency to 3 significant digits (0.01 ms below 1 ms).

    The relative error is at most 0.5 %, well inside CloudWatch's own percentile accuracy, and the
    number of distinct values stays bounded (at most 900 a decade), so an interval's histogram is
    small whatever the call rate.
    """
    if not value > 0.0:
        return 0.0
    if value < 1.0:
        return round(value, 2)
    exponent = math.floor(math.log10(value))
    step = 10.0 ** (exponent - 2)
    return round(round(value / step) * step, max(0, 2 - exponent))


@dataclass(frozen=True, slots=True)
class Distribution:
    """A histogram: distinct ``values`` (ascending) and how often each occurred."""

    values: tuple[float, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_mapping(cls, histogram: Mapping[float, int]) -> Distribution:
        items = sorted((v, c) for v, c in histogram.items() if c > 0)
        return cls(tuple(v for v, _ in items), tuple(c for _, c in items))

    @property
    def sample_count(self) -> int:
        return sum(self.counts)

    @property
    def sum(self) -> float:
        return math.fsum(v * c for v, c in zip(self.values, self.counts, strict=True))

    @property
    def minimum(self) -> float:
        return self.values[0]

    @property
    def maximum(self) -> float:
        return self.values[-1]

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile, ``0 < p <= 100``."""
        rank = max(1, math.ceil(p / 100.0 * self.sample_count))
        seen = 0
        for value, count in zip(self.values, self.counts, strict=True):
            seen += count
            if seen >= rank:
                return value
        return self.values[-1]


@dataclass(frozen=True, slots=True)
class GaugeStats:
    """A gauge's samples within an interval (the value carried in from the last interval counts once)."""

    minimum: float
    maximum: float
    last: float
    sum: float
    sample_count: int


@dataclass(frozen=True, slots=True)
class Interval:
    """The folded figures of one metrics interval.

    ``timestamp`` (seconds since the epoch) is what the figures are stamped with in CloudWatch.
    ``counts`` holds every counter, zeros included, so alarms never see missing data while the proxy
    runs; ``distributions`` only metrics that had samples; ``gauges`` every gauge (they start at 0).
    """

    timestamp: float
    counts: Mapping[MetricSpec, int] = field(default_factory=dict)
    distributions: Mapping[MetricSpec, Distribution] = field(default_factory=dict)
    gauges: Mapping[MetricSpec, GaugeStats] = field(default_factory=dict)

    def with_count(self, spec: MetricSpec, n: int) -> Interval:
        """A copy with ``n`` added to counter ``spec``."""
        counts = dict(self.counts)
        counts[spec] = counts.get(spec, 0) + n
        return Interval(self.timestamp, counts, self.distributions, self.gauges)

    def count(self, spec: MetricSpec) -> int:
        return self.counts.get(spec, 0)
