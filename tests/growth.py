"""Growth of a cost with input size: how "linear time" is tested without a wall-clock bound.

A bound like "parses 64 KB in under 0.5 s" fails on a loaded machine and passes for a quadratic
algorithm on a fast one. What separates linear from quadratic is the *ratio* of costs at n and at
8n: about 8 for linear work, about 64 for quadratic. :func:`growth` measures that ratio with CPU
time of this process (``time.process_time``: time spent descheduled on a busy machine does not
count), best of a few runs at each size so a GC pause or a cold cache is not taken for growth.
"""

from __future__ import annotations

import time
from collections.abc import Callable

FACTOR = 8
# Linear work measures ~8 (less when a fixed cost dominates the small run); quadratic ~64. 20 sits
# between them with room on both sides (their geometric midpoint is 22.6).
LINEAR_BOUND = 20.0
# Below this CPU time at the large size, the run is too short to tell growth from noise, and too
# cheap to matter as a denial of service whatever its shape.
FLOOR_S = 0.002


def cost(work: Callable[[], object], repeats: int = 3) -> float:
    """The smallest CPU time (s) of ``repeats`` runs of ``work``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def growth(make: Callable[[int], Callable[[], object]], n: int, repeats: int = 3) -> tuple[float, float]:
    """(cost at FACTOR*n / cost at n, cost at FACTOR*n). ``make(size)`` returns the work to time
    (building the input is not timed)."""
    small = cost(make(n), repeats)
    large = cost(make(FACTOR * n), repeats)
    return large / max(small, 1e-6), large


def confirmed_growth(
    make: Callable[[int], Callable[[], object]], n: int, bound: float = LINEAR_BOUND
) -> tuple[float, float]:
    """:func:`growth`, measured a second time when the first ratio exceeds ``bound``: a quadratic
    cost exceeds it again, a burst of cache misses on a busy machine seldom does. The smaller."""
    ratio, large = growth(make, n)
    if ratio > bound:
        ratio, large = min((ratio, large), growth(make, n))
    return ratio, large


def assert_linear(
    make: Callable[[int], Callable[[], object]], n: int, what: str = "", bound: float = LINEAR_BOUND
) -> None:
    ratio, large = confirmed_growth(make, n, bound)
    if large < FLOOR_S:
        return
    assert ratio <= bound, (
        f"{what}: cost grew {ratio:.1f}x for {FACTOR}x the input ({large * 1000:.1f} ms at {FACTOR}n): "
        "quadratic, not linear"
    )
