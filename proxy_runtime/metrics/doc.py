"""Render the metrics table of docs/METRICS.md from names.py: ``python -m proxy_runtime.metrics.doc``.

A test checks that the document holds exactly this table, so the two cannot drift apart.
"""

from __future__ import annotations

from proxy_runtime.metrics import names
from proxy_runtime.metrics.recorder import DISTRIBUTION_METRICS, GAUGE_METRICS

BEGIN = "<!-- metrics-table:begin (generated: python -m proxy_runtime.metrics.doc) -->"
END = "<!-- metrics-table:end -->"


def _kind(spec: names.MetricSpec) -> tuple[str, str]:
    if spec in DISTRIBUTION_METRICS:
        return "per-call histogram (Values/Counts)", "p50, p90, p99, Average, SampleCount, Sum"
    if spec in GAUGE_METRICS:
        return "gauge (statistic set)", "Minimum, Maximum, Average"
    return "counter (every interval, 0 included)", "Sum"


def metrics_table() -> str:
    rows = [
        BEGIN,
        "| Metric | Unit | Published as | Statistics | Meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in names.ALL_METRICS:
        kind, stats = _kind(spec)
        rows.append(f"| `{spec.name}` | {spec.unit.value} | {kind} | {stats} | {spec.description} |")
    rows.append(END)
    return "\n".join(rows)


if __name__ == "__main__":
    print(metrics_table())
