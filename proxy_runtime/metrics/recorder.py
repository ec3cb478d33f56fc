"""Sans-I/O aggregation of call records and counters into intervals.

No asyncio, no clock reads, no locks: the proxy's event loop calls :meth:`MetricsRecorder.record_call`,
:meth:`~MetricsRecorder.incr` and :meth:`~MetricsRecorder.set_gauge` on the call path (each O(1), a
few dictionary updates), and the publisher calls :meth:`~MetricsRecorder.close_interval` on the same
loop once an interval. Memory is bounded: latencies are quantised (:func:`quantize_ms`), so a
histogram never holds more than a few thousand distinct values whatever the call rate.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

from proxy_runtime.metrics import names, stir
from proxy_runtime.metrics.names import MetricSpec
from proxy_runtime.metrics.privacy import mask_digits
from proxy_runtime.metrics.records import CallRecord, Distribution, GaugeStats, Interval, quantize_ms

CALL_LOGGER = "clearip.calls"
"""Logger of the per-call JSON line (one a finished call, at INFO)."""

_call_log = logging.getLogger(CALL_LOGGER)
_log = logging.getLogger(__name__)

DISTRIBUTION_METRICS: tuple[MetricSpec, ...] = (
    names.CLEARIP_LATENCY,
    names.POST_DIAL_DELAY,
    names.CARRIER_ATTEMPTS,
    names.ROUTE_ADVANCES,
)
"""Per-call figures published as Values/Counts histograms (percentiles work on them)."""

GAUGE_METRICS: tuple[MetricSpec, ...] = (names.CLEARIP_CONNECTED, names.IN_FLIGHT, names.CLEARIP_BREAKER_OPEN)
"""Published as statistic sets: Minimum, Maximum and Average of the samples within the interval."""

COUNTER_METRICS: tuple[MetricSpec, ...] = tuple(
    m for m in names.ALL_METRICS if m not in DISTRIBUTION_METRICS and m not in GAUGE_METRICS
)
"""Published every interval as one summed value, zeros included (Heartbeat is always 1)."""

_DISTRIBUTION_NAMES = frozenset(m.name for m in DISTRIBUTION_METRICS)
_GAUGE_NAMES = frozenset(m.name for m in GAUGE_METRICS)
_OUTCOME_NAMES = {o: m.name for o, m in names.CLEARIP_OUTCOME_METRICS.items()}

# Names looked up once, not per call.
_CALLS = names.CALLS.name
_ANSWERED = names.CALLS_ANSWERED.name
_EMERGENCY = names.EMERGENCY_BYPASS.name
_PROXY_FAILED = names.PROXY_FAILED_CALLS.name
_CARRIERS_FAILED = names.CARRIERS_FAILED_CALLS.name
_OVERLOAD = names.OVERLOAD_REJECTED.name
_LATENCY = names.CLEARIP_LATENCY.name
_PDD = names.POST_DIAL_DELAY.name
_ATTEMPTS = names.CARRIER_ATTEMPTS.name
_ADVANCES = names.ROUTE_ADVANCES.name
_ATTEST = {stir.Attestation(k): m.name for k, m in names.STIR_ATTESTATION_METRICS.items()}
_VERSTAT = {stir.Verstat(k): m.name for k, m in names.STIR_VERSTAT_METRICS.items()}
_BLOCKED = {stir.Block(k): m.name for k, m in names.BLOCKED_METRICS.items()}
_DIV = names.STIR_DIV_CALLS.name
_UNDECODABLE = names.STIR_UNDECODABLE.name


_js = json.encoder.encode_basestring  # JSON string literal (C implementation)


def _jnum(value: float | None) -> str:
    if value is None:
        return "null"
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)  # what json.dumps gives a finite float, without its machinery
    return json.dumps(value)


def _jbool(value: bool) -> str:
    return "true" if value else "false"


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _jstr(value: str | None) -> str:
    return "null" if not value else _js(value)


class MetricsRecorder:
    """Folds call records, counters and gauges into the current interval."""

    __slots__ = (
        "_counts",
        "_gauges",
        "_histograms",
        "_log_numbers",
        "_proxy_id",
        "_read_stir",
        "_specs",
        "_stir_errors",
    )

    def __init__(
        self,
        *,
        proxy_id: str,
        log_numbers: bool = False,
        read_stir: Callable[[tuple[str, ...], tuple[str, ...]], stir.StirOutcome] | None = None,
    ) -> None:
        """``read_stir`` replaces :func:`stir.read_stir` (only the test of the guard around it does:
        a compiled module's functions cannot be patched from outside; None keeps the direct call)."""
        self._proxy_id = proxy_id
        self._read_stir = read_stir
        self._log_numbers = log_numbers
        self._specs: dict[str, MetricSpec] = {m.name: m for m in names.ALL_METRICS}
        self._counts: dict[str, int] = dict.fromkeys((m.name for m in COUNTER_METRICS), 0)
        self._histograms: dict[str, dict[float, int]] = {m.name: {} for m in DISTRIBUTION_METRICS}
        # name -> [min, max, last, sum, count]. Gauges start at 0 (not connected, nothing in
        # flight), so they are published from the first interval and an alarm never lacks data.
        self._gauges: dict[str, list[float]] = {m.name: [0.0, 0.0, 0.0, 0.0, 1.0] for m in GAUGE_METRICS}
        self._stir_errors = 0

    @property
    def proxy_id(self) -> str:
        return self._proxy_id

    # ---- the call path -----------------------------------------------------------------------
    @property
    def log_numbers(self) -> bool:
        """Whether per-call log lines carry phone numbers (settable on reload)."""
        return self._log_numbers

    @log_numbers.setter
    def log_numbers(self, value: bool) -> None:
        self._log_numbers = value

    def record_call(self, rec: CallRecord, *, log_line: bool = True) -> None:
        """Fold one finished call into the interval and log its JSON line on ``clearip.calls``
        (``log_line=False``: counted only — overload refusals, summarised once a second instead,
        as a line per refusal would cost as much as the refusal itself)."""
        counts = self._counts
        counts[_CALLS] += 1
        if 200 <= rec.final_status < 300:
            counts[_ANSWERED] += 1
        if rec.emergency:
            counts[_EMERGENCY] += 1
        if rec.proxy_failed:
            counts[_PROXY_FAILED] += 1
        if rec.overload_rejected:
            counts[_OVERLOAD] += 1
        if rec.clearip_outcome is not None:
            counts[_OUTCOME_NAMES[rec.clearip_outcome]] += 1
        hist = self._histograms
        if rec.clearip_latency_ms is not None and math.isfinite(rec.clearip_latency_ms):
            h = hist[_LATENCY]
            v = quantize_ms(rec.clearip_latency_ms)
            h[v] = h.get(v, 0) + 1
        if rec.post_dial_delay_ms is not None and math.isfinite(rec.post_dial_delay_ms):
            h = hist[_PDD]
            v = quantize_ms(rec.post_dial_delay_ms)
            h[v] = h.get(v, 0) + 1
        if rec.carrier_attempts > 0 or rec.route_advances > 0:
            status = rec.final_status
            if status == 408 or 500 <= status < 600:  # the fork ran out: no carrier could take it
                counts[_CARRIERS_FAILED] += 1
            # Over routed calls only: Average reads "attempts per routed call".
            h = hist[_ATTEMPTS]
            a = float(max(0, rec.carrier_attempts))
            h[a] = h.get(a, 0) + 1
            h = hist[_ADVANCES]
            a = float(max(0, rec.route_advances))
            h[a] = h.get(a, 0) + 1
        st = self._stir(rec)
        block = stir.blocked(rec.final_status, rec.final_reason)
        if block is not None:
            counts[_BLOCKED[block]] += 1
        if st is not stir.NOTHING:
            if st.attestation is not None:
                counts[_ATTEST[st.attestation]] += 1
            if st.div:
                counts[_DIV] += 1
            if st.undecodable:
                counts[_UNDECODABLE] += st.undecodable
            if st.verstat is not None:
                counts[_VERSTAT[st.verstat]] += 1
        if log_line and _call_log.isEnabledFor(logging.INFO):
            _call_log.info(self.call_line(rec, st, block))

    def _stir(self, rec: CallRecord) -> stir.StirOutcome:
        """The call's STIR/SHAKEN outcome. ``read_stir`` catches what header content can cause; this
        guard is for the unforeseen: reading the headers must never cost a call its final."""
        if not rec.identity and not rec.pai:
            return stir.NOTHING
        try:
            reader = self._read_stir
            return stir.read_stir(rec.identity, rec.pai) if reader is None else reader(rec.identity, rec.pai)
        except Exception:  # never fail a call over a metric
            self._stir_errors += 1
            if self._stir_errors == 1 or self._stir_errors % 10_000 == 0:
                _log.exception("reading STIR/SHAKEN headers failed (%d time(s))", self._stir_errors)
            return stir.NOTHING

    def call_line(
        self,
        rec: CallRecord,
        st: stir.StirOutcome | None = None,
        block: stir.Block | None = None,
    ) -> str:
        """The per-call JSON line. Phone numbers are masked as SIP traces mask them (all but the
        last four digits) unless ``log_numbers``.

        Formatted directly (one per call, on the call path): the same JSON ``json.dumps`` would
        give for these fixed keys, at a fraction of its cost."""
        if st is None:
            st = self._stir(rec)
            block = stir.blocked(rec.final_status, rec.final_reason)
        outcome = "null" if rec.clearip_outcome is None else f'"{rec.clearip_outcome.value}"'
        caller, callee = rec.caller, rec.callee
        if not self._log_numbers:
            caller, callee = mask_digits(caller), mask_digits(callee)
        attest = "null" if st.attestation is None else f'"{st.attestation.value}"'
        return (
            f'{{"event":"call","proxy":{_js(self._proxy_id)},"call_id":{_js(rec.call_id)},'
            f'"outcome":{outcome},"clearip_ms":{_jnum(_ms(rec.clearip_latency_ms))},'
            f'"attempts":{int(rec.carrier_attempts)},"advances":{int(rec.route_advances)},'
            f'"carrier":{_jstr(rec.carrier)},'
            f'"status":{int(rec.final_status)},"pdd_ms":{_jnum(_ms(rec.post_dial_delay_ms))},'
            f'"attest":{attest},"div":{st.div},"identity_bad":{st.undecodable},'
            f'"verstat":{_jstr(st.verstat_raw)},"blocked":{_jstr(block.value if block else None)},'
            f'"emergency":{_jbool(rec.emergency)},"proxy_failed":{_jbool(rec.proxy_failed)},'
            f'"overload":{_jbool(rec.overload_rejected)},"reason":{_js(rec.reason)},'
            f'"caller":{_js(caller)},"callee":{_js(callee)}}}'
        )

    def incr(self, spec: MetricSpec, n: int = 1) -> None:
        """Add ``n`` to a counter (MALFORMED_MESSAGES, UNTRUSTED_DROPPED, CLEARIP_RECONNECTS, ...)."""
        name = spec.name
        if name in _DISTRIBUTION_NAMES or name in _GAUGE_NAMES:
            raise ValueError(f"{name} is not a counter")
        counts = self._counts
        if name in counts:
            counts[name] += n
        else:
            self._specs.setdefault(name, spec)
            counts[name] = n

    def set_gauge(self, spec: MetricSpec, value: float) -> None:
        """Sample a gauge (CLEARIP_CONNECTED, IN_FLIGHT); the interval keeps min, max, last, mean."""
        name = spec.name
        if name not in _GAUGE_NAMES:
            raise ValueError(f"{name} is not a gauge")
        value = float(value)
        g = self._gauges[name]
        if value < g[0]:
            g[0] = value
        if value > g[1]:
            g[1] = value
        g[2] = value
        g[3] += value
        g[4] += 1.0

    # ---- once an interval --------------------------------------------------------------------
    def close_interval(self, timestamp: float) -> Interval:
        """Return the interval's figures (Heartbeat = 1) stamped ``timestamp``; start a new one."""
        specs = self._specs
        counts = {specs[name]: n for name, n in self._counts.items()}
        counts[names.HEARTBEAT] = counts.get(names.HEARTBEAT, 0) + 1
        distributions = {
            specs[name]: Distribution.from_mapping(h) for name, h in self._histograms.items() if h
        }
        gauges = {
            specs[name]: GaugeStats(g[0], g[1], g[2], g[3], int(g[4])) for name, g in self._gauges.items()
        }
        self._counts = dict.fromkeys(self._counts, 0)
        self._histograms = {name: {} for name in self._histograms}
        # A gauge keeps its last value into the next interval, as its first sample.
        self._gauges = {name: [g[2], g[2], g[2], g[2], 1.0] for name, g in self._gauges.items()}
        return Interval(timestamp, counts, distributions, gauges)
