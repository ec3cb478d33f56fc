"""The publisher with in-process sinks: queueing, retries, drops, the drop counter, final flush."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy_runtime.metrics import names
from proxy_runtime.metrics.publisher import MetricsPublisher
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.metrics.records import Interval
from proxy_runtime.metrics.sinks import Sink
from tests.metrics.helpers import call, until

pytestmark = pytest.mark.timeout(30)


class FakeSink(Sink):
    """Payloads are the intervals themselves; ``fail`` decides per send whether to raise."""

    kind = "fake"

    def __init__(self, fail: Callable[[int], BaseException | None] = lambda n: None) -> None:
        self.sent: list[Interval] = []
        self.attempts = 0
        self.fail = fail
        self.hang = False
        self.opened = self.closed = False

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.closed = True

    def encode(self, interval: Interval) -> list[Any]:
        return [interval]

    async def send(self, payload: Any) -> None:
        self.attempts += 1
        if self.hang:
            await asyncio.Event().wait()
        exc = self.fail(self.attempts)
        if exc is not None:
            raise exc
        self.sent.append(payload)

    def retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, PermissionError)

    def total(self, spec: names.MetricSpec) -> int:
        return sum(i.count(spec) for i in self.sent)


def publisher(sink: Sink, recorder: MetricsRecorder | None = None, **kw: Any) -> MetricsPublisher:
    opts: dict[str, Any] = {
        "interval": 0.05,
        "max_queued_intervals": 4,
        "max_attempts": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "send_timeout": 0.5,
        "stop_timeout": 2.0,
    }
    opts.update(kw)
    return MetricsPublisher(recorder or MetricsRecorder(proxy_id="p"), sink, **opts)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_every_call_published_once_and_final_flush() -> None:
    async def main() -> None:
        sink = FakeSink()
        rec = MetricsRecorder(proxy_id="p")
        pub = publisher(sink, rec)
        await pub.start()
        assert sink.opened
        for i in range(50):
            rec.record_call(call(i))
            if i % 10 == 0:
                await asyncio.sleep(0.03)
        await until(lambda: len(sink.sent) >= 2)
        rec.record_call(call(99))  # only the final flush can carry this one
        await pub.stop()
        assert sink.closed
        assert sink.total(names.CALLS) == 51
        assert sink.total(names.HEARTBEAT) == len(sink.sent) == pub.sent_intervals
        assert pub.dropped_intervals == 0 and sink.total(names.METRICS_DROPPED_INTERVALS) == 0
        stamps = [i.timestamp for i in sink.sent]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        for s in stamps:  # aligned to multiples of the interval
            assert abs(s / 0.05 - round(s / 0.05)) < 1e-6

    run(main())


def test_failures_retried_then_dropped_and_counted() -> None:
    async def main() -> None:
        down = True
        sink = FakeSink(fail=lambda n: ConnectionError("refused") if down else None)
        rec = MetricsRecorder(proxy_id="p")
        pub = publisher(sink, rec)
        await pub.start()
        await until(lambda: pub.dropped_intervals >= 3)
        assert pub.queued <= pub.max_queued_intervals
        down = False
        await until(lambda: sink.total(names.METRICS_DROPPED_INTERVALS) > 0)
        await pub.stop()
        # Every closed interval was either sent or counted as dropped, and every drop was published.
        assert sink.total(names.METRICS_DROPPED_INTERVALS) == pub.dropped_intervals
        assert sink.total(names.HEARTBEAT) == pub.sent_intervals
        assert pub.failed_sends >= pub.dropped_intervals

    run(main())


def test_full_queue_drops_oldest() -> None:
    async def main() -> None:
        sink = FakeSink()
        sink.hang = True  # every send hangs until send_timeout
        rec = MetricsRecorder(proxy_id="p")
        pub = publisher(sink, rec, max_queued_intervals=2, max_attempts=1000, send_timeout=0.05)
        await pub.start()
        await until(lambda: pub.dropped_intervals >= 4)
        assert pub.queued <= 2
        rec.record_call(call())  # the call path does not care
        sink.hang = False
        await until(lambda: sink.total(names.METRICS_DROPPED_INTERVALS) > 0)
        await pub.stop()
        assert sink.total(names.METRICS_DROPPED_INTERVALS) == pub.dropped_intervals
        # The oldest were dropped: what was sent is the newest, in order.
        stamps = [i.timestamp for i in sink.sent]
        assert stamps == sorted(stamps)

    run(main())


def test_non_retryable_error_drops_at_once() -> None:
    async def main() -> None:
        sink = FakeSink(fail=lambda n: PermissionError("AccessDenied") if n == 1 else None)
        pub = publisher(sink, max_attempts=50)
        await pub.start()
        await until(lambda: len(sink.sent) >= 1)
        await pub.stop()
        assert pub.dropped_intervals == 1
        assert sink.total(names.METRICS_DROPPED_INTERVALS) == 1

    run(main())


def test_stop_is_bounded_when_sink_hangs() -> None:
    async def main() -> None:
        sink = FakeSink()
        sink.hang = True
        pub = publisher(sink, max_attempts=1000, send_timeout=60.0, stop_timeout=0.2)
        await pub.start()
        await asyncio.sleep(0.12)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await pub.stop()
        assert loop.time() - t0 < 5.0  # bounded by stop_timeout, not by the 60 s send timeout
        assert pub.dropped_intervals >= 1  # what could not be sent is counted
        assert sink.closed

    run(main())


def test_backoff_exponential_bounded_jittered() -> None:
    draws = collections.deque([0.0, 1.0, 0.5, 1.0])
    pub = MetricsPublisher(
        MetricsRecorder(proxy_id="p"),
        FakeSink(),
        interval=1,
        backoff_base=0.5,
        backoff_max=4.0,
        jitter=lambda: draws.popleft() if draws else 1.0,
    )
    assert pub._backoff(1) == 0.25  # half the delay at jitter 0
    assert pub._backoff(2) == 1.0  # the full delay at jitter 1
    assert pub._backoff(3) == 1.5
    assert pub._backoff(10) == 4.0  # capped


def test_off_sink_sends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """``metrics = "off"``: intervals close on time (the publisher runs) but no payload reaches the
    sink's send and nothing is logged on the metrics logger."""
    from proxy_runtime.metrics.sinks import METRICS_LOGGER, make_sink

    sink = make_sink("off", proxy_id="p")
    sent: list[Any] = []

    async def spy(payload: Any) -> None:
        sent.append(payload)

    sink.send = spy  # type: ignore[method-assign]

    async def main() -> None:
        rec = MetricsRecorder(proxy_id="p")
        pub = publisher(sink, rec)
        await pub.start()
        rec.record_call(call())
        await until(lambda: pub.sent_intervals >= 2, 5)
        await pub.stop()
        assert pub.dropped_intervals == 0

    with caplog.at_level(logging.DEBUG, logger=METRICS_LOGGER):
        run(main())
    assert sent == []
    assert [r for r in caplog.records if r.name == METRICS_LOGGER] == []


def test_wall_clock_stepping_back_does_not_stall_the_ticker() -> None:
    async def main() -> None:
        offset = 0.0
        loop = asyncio.get_running_loop()

        def clock() -> float:
            return 1_800_000_000.0 + loop.time() + offset

        sink = FakeSink()
        pub = publisher(sink, clock=clock)
        await pub.start()
        await until(lambda: len(sink.sent) >= 1)
        offset = -3600.0  # NTP steps the clock back an hour
        n = len(sink.sent)
        await until(lambda: len(sink.sent) >= n + 3, limit=5.0)
        await pub.stop()

    run(main())
