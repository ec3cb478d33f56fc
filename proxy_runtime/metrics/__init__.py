"""Per-call metrics: records folded per interval and published off the call path (docs/METRICS.md).

``names`` has no dependencies (``infra/`` imports it); the rest is imported lazily by users::

    from proxy_runtime.metrics.recorder import MetricsRecorder
    from proxy_runtime.metrics.records import CallRecord
    from proxy_runtime.metrics.publisher import MetricsPublisher, make_sink
"""
