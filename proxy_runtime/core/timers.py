"""The core's timer structures: one heap for transactions and guards, a queue per fixed duration.

Owns: when each timed object must next be woken. An object is timed by its ``deadline`` attribute
(a float, or None when it needs no wake-up); this module only reads it (and, for queued objects,
their ``queue`` slot), never decides it. :meth:`Timers.due` hands back what is due and the caller
acts on it.

Must not touch: what a timer means (transactions, calls and guards decide that), the clock (``now``
is always an argument) or the network. The adapter keeps one loop timer at
:meth:`Timers.next_deadline`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Protocol


class Timed(Protocol):
    """Anything with a deadline (transactions, calls, guards)."""

    @property
    def deadline(self) -> float | None: ...


class Queued(Protocol):
    """A timed object whose timer runs for a fixed duration (a call's `timeout`, ring limit):
    ``queue`` names the duration queue holding it (None: none does)."""

    deadline: float | None
    queue: float | None


class Timers:
    """A heap of (deadline, seq, object) and insertion-ordered queues, one per duration.

    An entry is live only while its object's ``deadline`` still equals the entry's time: an object
    that is rescheduled or finished (``deadline`` None: the tables set it when they drop a
    transaction) leaves a stale entry, skipped when it reaches the top and compacted away when the
    heap grows past twice its live size, so stale entries never outnumber the live ones. Entries
    hold their objects strongly (the compiled build's native classes take no weak references), so
    a dropped transaction stays until its old deadline (up to 64*T1: a ClearIP INVITE ended by its
    302 over TCP/TLS leaves its Timer B entry): the tables release it first, so it holds nothing
    but its key meanwhile.

    A call's own timers run for a fixed duration, so each duration's deadlines come in order: an
    insertion-ordered dict per duration is a queue that is cancelled in O(1) and leaves nothing
    behind. Were ``now`` to go back (a fake clock), an out-of-order deadline goes to the heap.
    """

    __slots__ = ("_compact_at", "_heap", "_queues", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, object]] = []
        self._compact_at = 1024  # compact the heap when it grows past this
        self._queues: dict[float, dict[int, Queued]] = {}
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        """Entries held (stale heap entries included, until compacted or popped)."""
        return len(self._heap) + sum(len(q) for q in self._queues.values())

    def schedule(self, obj: Timed) -> None:
        """Wake ``obj`` at its current ``deadline`` (nothing when it is None)."""
        d = obj.deadline
        if d is not None:
            heap = self._heap
            heapq.heappush(heap, (d, next(self._seq), obj))
            if len(heap) > self._compact_at:
                self._compact()

    def _compact(self) -> None:
        """Drop stale entries (their object was rescheduled or finished) before they reach the
        top of the heap, so the heap stays within twice its live entries."""
        heap = self._heap
        heap[:] = [e for e in heap if getattr(e[2], "deadline", None) == e[0]]  # in place
        heapq.heapify(heap)
        self._compact_at = max(1024, 2 * len(heap))

    def arm(self, obj: Queued, duration: float | None, now: float) -> None:
        """(Re)start ``obj``'s fixed-duration timer to fire ``duration`` from ``now``, or stop it
        (None). The old deadline is removed, not left stale: a call answered after ringing would
        otherwise leave an entry 180 s ahead (measured: up to 54,000 stale entries at 300 calls/s,
        and the memory they pinned made RSS settle only after 30,000 calls)."""
        if obj.queue is not None:
            q = self._queues.get(obj.queue)
            if q is not None:
                q.pop(id(obj), None)
            obj.queue = None
        if duration is None:
            obj.deadline = None
            return
        when = now + duration
        obj.deadline = when
        q = self._queues.setdefault(duration, {})
        if q:
            last = q[next(reversed(q))].deadline
            if last is not None and last > when:
                self.schedule(obj)
                return
        q[id(obj)] = obj
        obj.queue = duration

    def next_deadline(self) -> float | None:
        first: float | None = None
        for q in self._queues.values():
            if q:
                d = next(iter(q.values())).deadline
                if d is not None and (first is None or d < first):
                    first = d
        heap = self._heap
        while heap:
            when, _, obj = heap[0]
            if getattr(obj, "deadline", None) == when:
                return when if first is None or when < first else first
            heapq.heappop(heap)  # stale entry
        return first

    def due(self, now: float) -> Iterator[object]:
        """Yield each object whose deadline is at or before ``now``, queued ones first. Acting on
        one may arm or schedule others: what becomes due by ``now`` meanwhile is yielded too."""
        queues = self._queues
        for duration, q in list(queues.items()):
            while q:
                obj = next(iter(q.values()))
                if obj.deadline is not None and obj.deadline > now:
                    break
                del q[id(obj)]
                obj.queue = None
                if obj.deadline is not None:
                    yield obj
            if not q and queues.get(duration) is q:
                del queues[duration]  # e.g. the old `timeout` after a reload
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, entry = heapq.heappop(heap)
            if getattr(entry, "deadline", None) == when:
                yield entry
