"""Through the real aiobotocore sink to moto in server mode, read back with boto3."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import pytest

from proxy_runtime.metrics import names
from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.metrics.publisher import MetricsPublisher, make_sink
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.metrics.sinks import METRICS_LOGGER, CloudWatchSink, LogSink, NullSink
from tests.metrics.helpers import call
from tests.metrics.moto_fixtures import MotoEndpoint, metric_statistics

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("aws_env")]


def test_seven_calls_read_back_exactly(moto_server: MotoEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    proxy_id = f"test-{uuid.uuid4().hex[:8]}"
    sink = make_sink("cloudwatch", proxy_id=proxy_id)
    assert isinstance(sink, CloudWatchSink) and sink.endpoint_url == moto_server.url
    latencies = [10.0, 12.0, 15.0, 20.0, 25.0, 40.0, 180.0]
    rec = MetricsRecorder(proxy_id=proxy_id)

    async def main() -> MetricsPublisher:
        pub = MetricsPublisher(rec, sink, interval=0.2, backoff_base=0.05)
        await pub.start()
        for i, lat in enumerate(latencies):
            advances = 2 if i == 0 else (1 if i == 1 else 0)  # 3 route advances in all
            rec.record_call(
                call(i, clearip_latency_ms=lat, carrier_attempts=1 + advances, route_advances=advances)
            )
            await asyncio.sleep(0.05)  # spread over several intervals
        rec.incr(names.MALFORMED_MESSAGES, 2)
        rec.set_gauge(names.CLEARIP_CONNECTED, 1)
        rec.set_gauge(names.IN_FLIGHT, 5)
        rec.set_gauge(names.IN_FLIGHT, 2)
        await pub.stop()
        return pub

    pub = asyncio.run(main())
    assert pub.dropped_intervals == 0 and pub.sent_intervals >= 2
    cw = moto_server.client()

    def stats(spec: names.MetricSpec) -> dict[str, float]:
        return metric_statistics(cw, spec.name, proxy_id)

    assert stats(names.CALLS)["Sum"] == 7
    assert stats(names.CALLS_ANSWERED)["Sum"] == 7
    assert stats(names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome.REDIRECT_302])["Sum"] == 7
    assert stats(names.ROUTE_ADVANCES)["Sum"] == 3
    assert stats(names.CARRIER_ATTEMPTS) == {
        "Sum": 10,
        "SampleCount": 7,
        "Minimum": 1,
        "Maximum": 3,
    }
    lat = stats(names.CLEARIP_LATENCY)
    assert lat == {"Sum": sum(latencies), "SampleCount": 7, "Minimum": 10.0, "Maximum": 180.0}
    assert stats(names.POST_DIAL_DELAY)["SampleCount"] == 7
    assert stats(names.MALFORMED_MESSAGES)["Sum"] == 2
    assert stats(names.PROXY_FAILED_CALLS)["Sum"] == 0
    assert stats(names.HEARTBEAT)["Sum"] == pub.sent_intervals
    inflight = stats(names.IN_FLIGHT)
    assert inflight["Maximum"] == 5 and inflight["Minimum"] == 0  # 0 until the first set
    connected = stats(names.CLEARIP_CONNECTED)
    assert connected["Maximum"] == 1 and connected["Minimum"] == 0
    assert inflight["SampleCount"] == pub.sent_intervals + 2
    assert stats(names.METRICS_DROPPED_INTERVALS)["Sum"] == 0


def test_auto_picks_cloudwatch_with_credentials() -> None:
    sink = make_sink("auto", proxy_id="p")
    assert isinstance(sink, CloudWatchSink)
    assert sink.region == "us-east-1" and sink.endpoint_url is None
    assert sink.dimensions == {names.DIMENSION_PROXY_ID: "p"} and sink.namespace == names.NAMESPACE


def test_auto_falls_back_to_log_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert isinstance(make_sink("auto", proxy_id="p"), LogSink)
    assert isinstance(make_sink("log", proxy_id="p"), LogSink)
    assert isinstance(make_sink("off", proxy_id="p"), NullSink)
    with pytest.raises(ValueError):
        make_sink("statsd", proxy_id="p")


def test_log_sink_one_json_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    rec = MetricsRecorder(proxy_id="p9")

    async def main() -> MetricsPublisher:
        pub = MetricsPublisher(rec, make_sink("log", proxy_id="p9"), interval=0.1)
        await pub.start()
        for i in range(3):
            rec.record_call(call(i, clearip_latency_ms=10.0 * (i + 1)))
        await pub.stop()
        return pub

    with caplog.at_level(logging.INFO, logger=METRICS_LOGGER):
        pub = asyncio.run(main())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == METRICS_LOGGER]
    assert len(lines) == pub.sent_intervals >= 1
    assert all(line["event"] == "metrics" and line["dimensions"] == {"ProxyId": "p9"} for line in lines)
    assert sum(line["counts"]["Calls"] for line in lines) == 3
    [lat] = [
        line["distributions"]["ClearIpLatency"] for line in lines if "ClearIpLatency" in line["distributions"]
    ]
    assert lat == {"count": 3, "sum": 60.0, "min": 10.0, "max": 30.0, "p50": 20.0, "p90": 30.0, "p99": 30.0}


def test_log_sink_writes_stdout_without_logging_config(capsys: pytest.CaptureFixture[str]) -> None:
    sink = make_sink("log", proxy_id="p")
    metrics_logger = logging.getLogger(METRICS_LOGGER)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        assert not metrics_logger.hasHandlers()
        [payload] = sink.encode(MetricsRecorder(proxy_id="p").close_interval(0.0))
        asyncio.run(sink.send(payload))
    finally:
        root.handlers[:] = saved
    out = capsys.readouterr().out.strip()
    assert json.loads(out)["counts"]["Heartbeat"] == 1


def test_retryable_classification() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    sink = make_sink("cloudwatch", proxy_id="p")

    def err(code: str, status: int) -> ClientError:
        body: Any = {"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(body, "PutMetricData")

    assert sink.retryable(err("Throttling", 400))
    assert sink.retryable(err("InternalServiceError", 500))
    assert sink.retryable(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert sink.retryable(TimeoutError())
    assert not sink.retryable(err("AccessDenied", 403))
    assert not sink.retryable(err("InvalidParameterValue", 400))
