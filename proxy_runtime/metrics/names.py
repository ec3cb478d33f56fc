"""The one source of metric names, units and dimensions.

The runtime's publisher and the CDK monitoring construct (``infra/monitoring.py``) both import this
module, so a dashboard widget or an alarm can never point at a metric the proxy does not publish.
Nothing here may depend on anything but the standard library: the EC2 instance ships it, and the CDK
app imports it without the runtime's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

NAMESPACE = "ClearIP/Proxy"
"""CloudWatch namespace of every metric the proxy publishes (the IAM condition pins it too)."""

DIMENSION_PROXY_ID = "ProxyId"
"""The only dimension: the proxy's id (EC2 instance id, host name elsewhere). Bounded cardinality."""


class Unit(str, Enum):  # noqa: UP042 - str() stays "Unit.COUNT"; infra uses .value
    COUNT = "Count"
    MILLISECONDS = "Milliseconds"
    NONE = "None"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    unit: Unit
    description: str


# Per-call figures (one datum per finished call, aggregated per interval).
CALLS = MetricSpec("Calls", Unit.COUNT, "INVITE transactions finished (a final response sent to the caller)")
CLEARIP_LATENCY = MetricSpec("ClearIpLatency", Unit.MILLISECONDS, "INVITE sent to ClearIP until its final")
CARRIER_ATTEMPTS = MetricSpec("CarrierAttempts", Unit.COUNT, "Contacts tried for a call after a 302")
ROUTE_ADVANCES = MetricSpec("RouteAdvances", Unit.COUNT, "Advances to the next Contact after a failure")
POST_DIAL_DELAY = MetricSpec("PostDialDelay", Unit.MILLISECONDS, "INVITE received until first 18x or final")
EMERGENCY_BYPASS = MetricSpec("EmergencyBypass", Unit.COUNT, "Emergency calls answered without ClearIP")
CALLS_ANSWERED = MetricSpec("CallsAnswered", Unit.COUNT, "Calls that got a 2xx")
PROXY_FAILED_CALLS = MetricSpec(
    "ProxyFailedCalls", Unit.COUNT, "Calls the proxy itself failed (timeout, unavailable, overload, error)"
)
CARRIERS_FAILED_CALLS = MetricSpec(
    "CarriersFailedCalls",
    Unit.COUNT,
    "Routed calls that ended 408 or 5xx: every carrier tried failed (busy, not found, blocks excluded)",
)
OVERLOAD_REJECTED = MetricSpec(
    "OverloadRejected", Unit.COUNT, "INVITEs answered 503 past the in-flight limit"
)


class ClearIpOutcome(str, Enum):  # noqa: UP042 - as Unit
    """What ClearIP answered to a call's INVITE (DESIGN §2's table, plus the two failure cases)."""

    REDIRECT_302 = "302"
    REDIRECT_300 = "300"
    REDIRECT_301 = "301"
    REDIRECT_UNUSABLE = "redirect_unusable"  # a redirect without one Contact the proxy can call
    UNAVAILABLE_503 = "503"
    NOT_FOUND_404 = "404"
    BLOCKED_603 = "603"
    UNWANTED_607 = "607"
    REJECTED_608 = "608"
    FORBIDDEN_403 = "403"
    OTHER = "other"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"


CLEARIP_OUTCOME_METRICS: dict[ClearIpOutcome, MetricSpec] = {
    ClearIpOutcome.REDIRECT_302: MetricSpec("ClearIp302", Unit.COUNT, "ClearIP answered 302 (route)"),
    ClearIpOutcome.REDIRECT_300: MetricSpec("ClearIp300", Unit.COUNT, "ClearIP answered 300 (route)"),
    ClearIpOutcome.REDIRECT_301: MetricSpec("ClearIp301", Unit.COUNT, "ClearIP answered 301 (route)"),
    ClearIpOutcome.REDIRECT_UNUSABLE: MetricSpec(
        "ClearIpRedirectUnusable",
        Unit.COUNT,
        "ClearIP redirected without a usable Contact (none, *, bad URI, port or scheme): 503 to the caller",
    ),
    ClearIpOutcome.UNAVAILABLE_503: MetricSpec("ClearIp503", Unit.COUNT, "ClearIP answered 503"),
    ClearIpOutcome.NOT_FOUND_404: MetricSpec("ClearIp404", Unit.COUNT, "ClearIP answered 404"),
    ClearIpOutcome.BLOCKED_603: MetricSpec("ClearIp603", Unit.COUNT, "ClearIP blocked the call (603)"),
    ClearIpOutcome.UNWANTED_607: MetricSpec("ClearIp607", Unit.COUNT, "ClearIP blocked the call (607)"),
    ClearIpOutcome.REJECTED_608: MetricSpec("ClearIp608", Unit.COUNT, "ClearIP blocked the call (608)"),
    ClearIpOutcome.FORBIDDEN_403: MetricSpec(
        "ClearIp403", Unit.COUNT, "ClearIP refused us (not whitelisted)"
    ),
    ClearIpOutcome.OTHER: MetricSpec("ClearIpOther", Unit.COUNT, "ClearIP answered another final"),
    ClearIpOutcome.TIMEOUT: MetricSpec("ClearIpTimeout", Unit.COUNT, "No answer from ClearIP within timeout"),
    ClearIpOutcome.UNAVAILABLE: MetricSpec(
        "ClearIpUnavailable", Unit.COUNT, "No connection to ClearIP when the call came"
    ),
}

# Counters and gauges outside calls.
MALFORMED_MESSAGES = MetricSpec("MalformedMessages", Unit.COUNT, "SIP messages that failed to parse")
UNTRUSTED_DROPPED = MetricSpec("UntrustedDropped", Unit.COUNT, "Messages dropped: source not allow-listed")
REDIRECT_HEADERS_IGNORED = MetricSpec(
    "RedirectHeadersIgnored",
    Unit.COUNT,
    "Headers in a redirect Contact's URI never applied (Via, Call-ID, From, To, Route, CR/LF...)",
)
CLEARIP_CONNECTED = MetricSpec("ClearIpConnected", Unit.NONE, "1 while the ClearIP connection is up, else 0")
CLEARIP_RECONNECTS = MetricSpec("ClearIpReconnects", Unit.COUNT, "Reconnections to ClearIP")
CLEARIP_BREAKER_OPEN = MetricSpec(
    "ClearIpBreakerOpen",
    Unit.NONE,
    "1 while the ClearIP brownout breaker is open or half-open (calls answered 503 at once), else 0",
)
CLEARIP_BREAKER_REJECTED = MetricSpec(
    "ClearIpBreakerRejected", Unit.COUNT, "Calls answered 503 at once by the open ClearIP breaker"
)
IN_FLIGHT = MetricSpec("InFlightTransactions", Unit.COUNT, "Server INVITE transactions in progress")
HEARTBEAT = MetricSpec("Heartbeat", Unit.COUNT, "1 each interval while the proxy runs")
METRICS_DROPPED_INTERVALS = MetricSpec(
    "MetricsDroppedIntervals", Unit.COUNT, "Metric intervals dropped (CloudWatch down or throttling)"
)

# STIR/SHAKEN outcomes read from ClearIP's answer (metrics/stir.py). A fixed set: no per-number,
# per-carrier or per-certificate dimension, so the cost stays 13 metrics a proxy whatever the traffic.
STIR_ATTESTATION_METRICS: dict[str, MetricSpec] = {
    "A": MetricSpec("StirAttestationA", Unit.COUNT, "Calls signed with SHAKEN attestation A (full)"),
    "B": MetricSpec("StirAttestationB", Unit.COUNT, "Calls signed with SHAKEN attestation B (partial)"),
    "C": MetricSpec("StirAttestationC", Unit.COUNT, "Calls signed with SHAKEN attestation C (gateway)"),
}
STIR_DIV_CALLS = MetricSpec(
    "StirDivCalls", Unit.COUNT, "Calls whose answer carried diversion PASSporTs (ppt=div) besides SHAKEN"
)
STIR_UNDECODABLE = MetricSpec(
    "StirIdentityUndecodable", Unit.COUNT, "Identity values that could not be read (bad JWS, no attest)"
)
STIR_VERSTAT_METRICS: dict[str, MetricSpec] = {
    "TN-Validation-Passed": MetricSpec(
        "StirVerstatPassed", Unit.COUNT, "Calls verified: verstat=TN-Validation-Passed"
    ),
    "TN-Validation-Failed": MetricSpec(
        "StirVerstatFailed", Unit.COUNT, "Calls that failed verification: verstat=TN-Validation-Failed"
    ),
    "No-TN-Validation": MetricSpec(
        "StirVerstatNoValidation", Unit.COUNT, "Calls not verified: verstat=No-TN-Validation"
    ),
    "other": MetricSpec("StirVerstatOther", Unit.COUNT, "Calls with another verstat value"),
}
BLOCKED_METRICS: dict[str, MetricSpec] = {
    "603": MetricSpec("CallsBlocked603", Unit.COUNT, "Calls ended 603 Decline (blocked)"),
    "603+": MetricSpec(
        "CallsBlocked603Plus", Unit.COUNT, "Calls ended 603 Network Blocked (603+, robocall/fraud block)"
    ),
    "607": MetricSpec("CallsBlocked607", Unit.COUNT, "Calls ended 607 Unwanted (RFC 8688)"),
    "608": MetricSpec("CallsBlocked608", Unit.COUNT, "Calls ended 608 Rejected (RFC 8688)"),
}

ALL_METRICS: tuple[MetricSpec, ...] = (
    CALLS,
    CLEARIP_LATENCY,
    CARRIER_ATTEMPTS,
    ROUTE_ADVANCES,
    POST_DIAL_DELAY,
    EMERGENCY_BYPASS,
    CALLS_ANSWERED,
    PROXY_FAILED_CALLS,
    CARRIERS_FAILED_CALLS,
    OVERLOAD_REJECTED,
    *CLEARIP_OUTCOME_METRICS.values(),
    MALFORMED_MESSAGES,
    UNTRUSTED_DROPPED,
    REDIRECT_HEADERS_IGNORED,
    CLEARIP_CONNECTED,
    CLEARIP_RECONNECTS,
    CLEARIP_BREAKER_OPEN,
    CLEARIP_BREAKER_REJECTED,
    IN_FLIGHT,
    HEARTBEAT,
    METRICS_DROPPED_INTERVALS,
    *STIR_ATTESTATION_METRICS.values(),
    STIR_DIV_CALLS,
    STIR_UNDECODABLE,
    *STIR_VERSTAT_METRICS.values(),
    *BLOCKED_METRICS.values(),
)
