"""The asyncio side: close an interval every ``interval`` seconds and send it off the call path.

Two tasks. The *ticker* closes the recorder's interval at each wall-clock multiple of ``interval``
(so with 60 s each interval is exactly one CloudWatch minute) and appends it to a bounded queue.
The *sender* takes the oldest interval, encodes it with the sink and sends its payloads one by one;
a failed send is retried with exponential backoff and jitter up to ``max_attempts``, then the
interval is dropped. When the queue is full, the oldest waiting interval is dropped. Every drop is
counted, and the count rides on the next interval sent as ``MetricsDroppedIntervals``.

Nothing here runs on the call path: the proxy only touches the recorder, whose methods are
synchronous dictionary updates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable

from proxy_runtime.metrics import names
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.metrics.records import Interval
from proxy_runtime.metrics.sinks import Sink, make_sink

__all__ = ["MetricsPublisher", "make_sink"]

log = logging.getLogger(__name__)


class MetricsPublisher:
    def __init__(
        self,
        recorder: MetricsRecorder,
        sink: Sink,
        *,
        interval: float,
        max_queued_intervals: int = 60,
        max_attempts: int = 8,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        send_timeout: float = 15.0,
        stop_timeout: float = 5.0,
        align: bool = True,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be greater than 0")
        if max_queued_intervals < 1 or max_attempts < 1:
            raise ValueError("max_queued_intervals and max_attempts must be at least 1")
        self.recorder = recorder
        self.sink = sink
        self.interval = interval
        self.max_queued_intervals = max_queued_intervals
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.send_timeout = send_timeout
        self.stop_timeout = stop_timeout
        self.align = align
        self._clock = clock
        self._jitter = jitter
        self._queue: collections.deque[Interval] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ticker: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._period_start = 0.0
        self._pending_dropped = 0  # dropped intervals not yet published
        self.dropped_intervals = 0
        """Intervals dropped since start (queue full, retries exhausted, or unsent at stop)."""
        self.sent_intervals = 0
        self.failed_sends = 0

    @property
    def queued(self) -> int:
        """Closed intervals waiting to be sent (not counting the one being sent)."""
        return len(self._queue)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._ticker is not None:
            raise RuntimeError("publisher already started")
        await self.sink.open()
        now = self._clock()
        self._period_start = math.floor(now / self.interval) * self.interval if self.align else now
        self._sender = asyncio.create_task(self._send_loop(), name="metrics-sender")
        self._ticker = asyncio.create_task(self._tick_loop(), name="metrics-ticker")

    async def stop(self) -> None:
        """Close the current interval, try for ``stop_timeout`` seconds to send the queue, stop."""
        ticker, sender = self._ticker, self._sender
        if ticker is None or sender is None:
            return
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        self._close_current()
        try:
            await asyncio.wait_for(self._idle.wait(), self.stop_timeout)
        except TimeoutError:
            pass
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        unsent = len(self._queue) + (0 if self._idle.is_set() else 1)
        if unsent:
            self.dropped_intervals += unsent
            log.warning("metrics: %d interval(s) unsent at stop", unsent)
        self._queue.clear()
        try:
            await asyncio.wait_for(self.sink.close(), self.stop_timeout)
        except Exception as exc:  # stopping anyway
            log.warning("metrics: closing the %s sink failed: %r", self.sink.kind, exc)
        self._ticker = self._sender = None

    # ---- ticker ------------------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        while True:
            end = self._period_start + self.interval
            now = self._clock()
            if end - now > self.interval:  # the wall clock stepped back: do not wait for it
                end = now + self.interval
                if self.align:
                    end = (math.floor(now / self.interval) + 1) * self.interval
            await asyncio.sleep(max(0.0, end - now))
            self._close_current()
            if self.align:
                # Skip boundaries missed (a suspended host), stamping the next interval correctly.
                end = max(end, math.floor(self._clock() / self.interval) * self.interval)
            self._period_start = end

    def _close_current(self) -> None:
        try:
            interval = self.recorder.close_interval(self._period_start)
        except Exception:  # pragma: no cover - a recorder bug must not kill the ticker
            log.exception("metrics: closing the interval failed")
            return
        if len(self._queue) >= self.max_queued_intervals:
            self._drop(self._queue.popleft(), "queue full")
        self._queue.append(interval)
        self._idle.clear()
        self._wake.set()

    # ---- sender ------------------------------------------------------------------------------
    def _drop(self, interval: Interval, why: str) -> None:
        # Carry forward a drop count the dropped interval itself was carrying.
        self._pending_dropped += 1 + interval.count(names.METRICS_DROPPED_INTERVALS)
        self.dropped_intervals += 1
        log.warning("metrics: dropped the interval of %.0f (%s)", interval.timestamp, why)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        return delay / 2.0 + self._jitter() * delay / 2.0

    async def _send_loop(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._deliver(self._queue.popleft())

    async def _deliver(self, interval: Interval) -> None:
        attached = self._pending_dropped
        outgoing = interval.with_count(names.METRICS_DROPPED_INTERVALS, attached) if attached else interval
        try:
            payloads = self.sink.encode(outgoing)
        except Exception:
            log.exception("metrics: encoding an interval failed")
            self._drop(interval, "encode error")
            return
        index = attempt = 0
        while index < len(payloads):
            try:
                await asyncio.wait_for(self.sink.send(payloads[index]), self.send_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                self.failed_sends += 1
                if attempt >= self.max_attempts or not self.sink.retryable(exc):
                    self._drop(interval, f"{attempt} attempt(s), last error {exc!r}")
                    return
                if attempt == 1:
                    log.info("metrics: sending to %s failed (%r); retrying", self.sink.kind, exc)
                await asyncio.sleep(self._backoff(attempt))
                continue
            if index == 0:
                # The first payload carries the counters, MetricsDroppedIntervals included.
                self._pending_dropped -= attached
                attached = 0
            index += 1
        self.sent_intervals += 1
