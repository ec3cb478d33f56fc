"""The garbage-collector policy: young collections examine a bounded number of objects whatever the
heap holds (their pause is proportional to it), no automatic full collection, and the periodic
check runs a full collection only when resident memory has grown."""

from __future__ import annotations

import asyncio
import gc

import pytest

from proxy_runtime.transport import gcpolicy
from proxy_runtime.transport.gcpolicy import FullCollectionPolicy
from tests.child import run_json

MiB = 1024 * 1024

# Run in a child: apply() freezes the heap and changes the thresholds of the whole process. The
# child holds 300,000 live objects (like 32 s of finished transactions under load) and records,
# at the start of every collection, how many objects that collection is about to examine.
_CHILD = """
import gc, json
from proxy_runtime.transport import gcpolicy
gcpolicy.apply()
seen = []
def cb(phase, info):
    if phase == "start":
        g = info["generation"]
        seen.append((g, sum(len(gc.get_objects(generation=i)) for i in range(g + 1))))
gc.callbacks.append(cb)
held = []
for i in range(300_000):
    held.append([i])
gc.callbacks.remove(cb)
print(json.dumps({"seen": seen, "threshold": gc.get_threshold()}))
"""


def test_young_collections_examine_a_bounded_number_of_objects_and_none_is_full() -> None:
    got = run_json(_CHILD)
    seen = [(g, n) for g, n in got["seen"]]
    generations = {g for g, _ in seen}
    assert generations == {0, 1}, generations  # young collections ran; never an automatic full one
    # Each collection examines what survived since the last of its generation: about the threshold
    # for generation 0, ten times that for generation 1 (with 10,000 as before: up to 100,000).
    bound = int(1.2 * gcpolicy.YOUNG_THRESHOLD * (gcpolicy.MIDDLE_THRESHOLD + 1))
    assert max(n for _, n in seen) <= bound, max(n for _, n in seen)
    assert bound <= 20_000  # the pause at 0.3-0.5 µs an object stays under 10 ms


def test_full_collection_is_due_only_when_memory_grew_by_half_and_64_mib() -> None:
    p = FullCollectionPolicy(100 * MiB)
    assert not p.due(100 * MiB)
    assert not p.due(149 * MiB)  # grew by 49 %
    assert p.due(164 * MiB)  # grew by 64 %, 64 MiB
    small = FullCollectionPolicy(40 * MiB)
    assert not small.due(100 * MiB)  # 2.5x, but only 60 MiB more
    assert small.due(104 * MiB)
    small.collected(104 * MiB)  # the new baseline
    assert not small.due(120 * MiB)
    assert small.due(168 * MiB)


def test_full_collection_is_always_due_when_memory_cannot_be_read() -> None:
    assert FullCollectionPolicy(None).due(50 * MiB)
    assert FullCollectionPolicy(50 * MiB).due(None)


def test_bad_policy_values_are_refused() -> None:
    with pytest.raises(ValueError, match="growth"):
        FullCollectionPolicy(1, growth=0.5)
    with pytest.raises(ValueError, match="growth"):
        FullCollectionPolicy(1, growth_min=-1)


def test_the_periodic_check_collects_only_when_memory_grew(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real loop with a short interval: flat memory, no collection; grown memory, one, then the
    baseline moves and flat memory again means none."""
    collections: list[int] = []

    def collect(generation: int = 2) -> int:
        collections.append(generation)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    readings = iter([100 * MiB] * 4 + [200 * MiB, 160 * MiB] + [170 * MiB] * 100)
    checks: list[int | None] = []
    enough = asyncio.Event()

    def rss() -> int | None:
        value = next(readings)
        checks.append(value)
        if len(checks) >= 10:
            enough.set()
        return value

    async def run() -> None:
        task = asyncio.ensure_future(gcpolicy.collect_periodically(0.001, rss=rss))
        await asyncio.wait_for(enough.wait(), 10)
        task.cancel()

    asyncio.run(run())
    # 100 (the start), 100, 100, 100: nothing; 200: due (2x, +100 MiB) -> collect, after it 160:
    # the new baseline, and 170 is not 1.5x that.
    assert collections == [2]
