"""CloudWatch down or failing: calls are not slowed, drops are counted, publishing resumes.

The endpoint is first a closed port, or a tiny HTTP server answering 500 / 503 / throttling; then
moto is started on that same port and must receive the backlog and the drop count.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from proxy_runtime.metrics import names
from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.metrics.publisher import MetricsPublisher, make_sink
from proxy_runtime.metrics.recorder import MetricsRecorder
from tests.metrics.helpers import call, until
from tests.metrics.moto_fixtures import free_port, metric_statistics, start_moto

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("aws_env")]


def _cbor_text(s: str) -> bytes:
    assert len(s) < 24
    return bytes([0x60 + len(s)]) + s.encode()


THROTTLING_BODY = (
    b"\xa2"
    + _cbor_text("__type")
    + _cbor_text("Throttling")
    + _cbor_text("message")
    + _cbor_text("Rate exceeded")
)

RESPONSES = {
    "http500": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "http503": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "throttling": (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/cbor\r\nsmithy-protocol: rpc-v2-cbor\r\n"
        + f"Content-Length: {len(THROTTLING_BODY)}\r\nConnection: close\r\n\r\n".encode()
        + THROTTLING_BODY
    ),
}


async def _failing_server(port: int, response: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            writer.write(response)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


class LagProbe:
    """Wakes every 10 ms and keeps the worst lateness: a stalled event loop shows as a large lag."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self.ticks = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            self.max_lag = max(self.max_lag, loop.time() - t - 0.01)
            self.ticks += 1


@pytest.mark.parametrize("failure", ["closed", "http500", "http503", "throttling"])
def test_outage_counts_drops_and_recovers(failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    proxy_id = f"outage-{failure}-{uuid.uuid4().hex[:6]}"
    rec = MetricsRecorder(proxy_id=proxy_id)
    sink = make_sink("cloudwatch", proxy_id=proxy_id)
    moto = None

    async def main() -> MetricsPublisher:
        nonlocal moto
        server = await _failing_server(port, RESPONSES[failure]) if failure != "closed" else None
        pub = MetricsPublisher(
            rec,
            sink,
            interval=0.2,
            max_queued_intervals=3,
            max_attempts=3,
            backoff_base=0.02,
            backoff_max=0.1,
            send_timeout=2.0,
        )
        probe = LagProbe()
        probe_task = asyncio.create_task(probe.run())
        await pub.start()
        # Calls keep coming while CloudWatch is unreachable: record_call is synchronous and never
        # waits for the publisher.
        outage_calls = 0
        while pub.dropped_intervals < 4:
            for _ in range(20):
                rec.record_call(call(outage_calls, clearip_outcome=ClearIpOutcome.REDIRECT_302))
                outage_calls += 1
            await asyncio.sleep(0.01)
            assert pub.queued <= 3  # bounded
        assert pub.failed_sends > pub.dropped_intervals  # retried before dropping
        assert probe.max_lag < 1.0, probe.max_lag  # the loop never stalled (generous bound)
        # CloudWatch comes back on the same port.
        if server is not None:
            server.close()
            await server.wait_closed()
        moto = await asyncio.to_thread(start_moto, port)
        sent_before = pub.sent_intervals
        await until(lambda: pub.sent_intervals > sent_before)
        for i in range(7):
            rec.record_call(call(i, clearip_outcome=ClearIpOutcome.BLOCKED_603, final_status=603))
        await pub.stop()
        probe_task.cancel()
        assert probe.max_lag < 1.0, probe.max_lag
        return pub

    try:
        pub = asyncio.run(main())
        assert moto is not None
        cw = moto.client()
        dropped = metric_statistics(cw, names.METRICS_DROPPED_INTERVALS.name, proxy_id)
        assert dropped["Sum"] == pub.dropped_intervals >= 4
        blocked = metric_statistics(
            cw, names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome.BLOCKED_603].name, proxy_id
        )
        assert blocked["Sum"] == 7
        assert metric_statistics(cw, names.HEARTBEAT.name, proxy_id)["Sum"] == pub.sent_intervals
    finally:
        if moto is not None:
            moto.server.stop()
