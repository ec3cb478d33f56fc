"""Garbage-collector policy for the running proxy: short young collections, and a full collection
only when memory says one is needed.

A collection stops the event loop for a time proportional to the objects it examines (measured here
at 0.3-0.5 µs an object). A proxy under load holds tens of thousands of finished transactions for
RFC 6026's 32 s timers, so what a collection examines decides how long every call in flight waits:

- CPython's default, automatic full (generation 2) collections, examined all of them: at 500 calls/s
  p99 call setup went from 12 ms to 5 s. So automatic full collections are off.
- Young collections (generations 0 and 1) examine what survived since the last ones. With a
  generation-0 threshold of 10,000 (this policy until 2026-12-03) a generation-1 collection examined
  up to 100,000 objects: 27-58 ms every 5-6 s at 750 calls/s, found with ``gc.callbacks`` in the
  benchmark's proxy, and the 99th percentile of call set-up at 80 % load was those pauses. With
  1,000 the longest young pause there was 4-9 ms, for the same total (each surviving object is
  examined once in each young generation whatever the thresholds).
- A full collection every 5 minutes (this policy until 2026-12-03) found nothing at all (the core
  cuts its reference cycles when transactions end, so reference counting frees nearly everything)
  and stalled the proxy 180 ms at 750 calls/s, more at higher rates. Now the periodic check runs a
  full collection only when the process's resident memory has grown by half (and by 64 MiB) since
  the last one: that is how cyclic garbage a young collection missed would show. After the first
  ramp to a busy hour's load (one collection) the memory stays level and no more are needed.
  Where resident memory cannot be read (no ``/proc``), the full collection runs every interval as
  before.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("clearip.gc")

YOUNG_THRESHOLD = 1_000  # net allocations between generation-0 collections (CPython's default: 700)
MIDDLE_THRESHOLD = 10  # generation-0 collections between generation-1 ones (CPython's default)
FULL_INTERVAL = 300.0  # seconds between checks for a full collection
GROWTH = 1.5  # a full collection when resident memory reached this multiple of the last baseline
GROWTH_MIN = 64 * 1024 * 1024  # ... and grew at least this much (bytes): small heaps grow by steps


def apply() -> None:
    """Collect and freeze what start-up allocated; keep young collections short; no automatic
    full collections."""
    gc.collect()
    gc.freeze()  # start-up objects (modules, settings) are never scanned again
    # The third threshold counts generation-1 collections between full ones: make it unreachable.
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, 1_000_000_000)


def resident_bytes() -> int | None:
    """The process's resident memory (Linux ``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class FullCollectionPolicy:
    """Whether a periodic check should run a full collection (sans-I/O: the caller reads the memory).

    ``due(rss)`` is true when the memory is unknown, or when it has grown to ``growth`` times the
    baseline and by ``growth_min`` bytes; ``collected(rss)`` sets the baseline after a collection."""

    __slots__ = ("baseline", "growth", "growth_min")

    def __init__(self, baseline: int | None, growth: float = GROWTH, growth_min: int = GROWTH_MIN) -> None:
        if not growth >= 1.0 or growth_min < 0:
            raise ValueError("growth must be at least 1 and growth_min not negative")
        self.baseline = baseline
        self.growth = growth
        self.growth_min = growth_min

    def due(self, rss: int | None) -> bool:
        if rss is None or self.baseline is None:
            return True
        return rss >= self.baseline * self.growth and rss - self.baseline >= self.growth_min

    def collected(self, rss: int | None) -> None:
        self.baseline = rss


async def collect_periodically(
    interval: float = FULL_INTERVAL,
    *,
    policy: FullCollectionPolicy | None = None,
    rss: Callable[[], int | None] = resident_bytes,
) -> None:
    """Every ``interval`` seconds, run a full collection if ``policy`` says it is due, and log it."""
    if policy is None:
        policy = FullCollectionPolicy(rss())
    while True:
        await asyncio.sleep(interval)
        before = rss()
        if not policy.due(before):
            log.debug("full GC skipped: resident %s bytes, baseline %s", before, policy.baseline)
            continue
        t0 = time.perf_counter()
        found = gc.collect()
        ms = (time.perf_counter() - t0) * 1000.0
        after = rss()
        policy.collected(after)
        log.log(
            logging.INFO if ms > 50 or before is not None else logging.DEBUG,
            "full GC: %d unreachable, %.0f ms, resident %s -> %s MiB",
            found,
            ms,
            _mib(before),
            _mib(after),
        )


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1048576:.0f}"
