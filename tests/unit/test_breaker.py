"""The ClearIP brownout breaker on a fake clock: every transition, and the ones that must not happen."""

from __future__ import annotations

import pytest

from proxy_runtime.core.breaker import Admission, Breaker, BreakerSettings, BreakerState

S = BreakerSettings(threshold=3, window=10.0, cool_off=5.0, probe_every=4)


def st(b: Breaker) -> BreakerState:
    """The state as of the last event (a call, so mypy does not narrow it across events)."""
    return b.state


def tripped(at: float = 0.0, settings: BreakerSettings = S) -> Breaker:
    b = Breaker(settings)
    for i in range(settings.threshold):
        b.on_timeout(at + i * 0.1)
    assert st(b) is BreakerState.OPEN
    return b


def test_closed_sends_every_call_and_isolated_timeouts_do_not_open_it() -> None:
    b = Breaker(S)
    assert b.admit(0.0) is Admission.SEND
    b.on_timeout(1.0)
    b.on_timeout(2.0)
    b.on_answer(2.5)  # an answer in between: not consecutive
    b.on_timeout(3.0)
    b.on_timeout(4.0)
    assert st(b) is BreakerState.CLOSED and not b.tripped
    assert b.admit(4.0) is Admission.SEND


def test_threshold_consecutive_timeouts_within_the_window_open_it() -> None:
    b = Breaker(S)
    b.on_timeout(0.0)
    b.on_timeout(4.0)
    assert st(b) is BreakerState.CLOSED
    b.on_timeout(9.5)  # third, 9.5 s after the first: within the 10 s window
    assert st(b) is BreakerState.OPEN and b.tripped
    assert b.reopens_at() == 9.5 + S.cool_off


def test_consecutive_timeouts_spread_wider_than_the_window_do_not_open_it() -> None:
    b = Breaker(S)
    for t in (0.0, 6.0, 12.0, 18.0, 24.0):  # any three span 12 s > 10 s
        b.on_timeout(t)
    assert st(b) is BreakerState.CLOSED
    b.on_timeout(25.0)
    b.on_timeout(26.0)  # 24, 25, 26: within the window
    assert st(b) is BreakerState.OPEN


def test_open_rejects_every_call_until_the_cool_off_ends() -> None:
    b = tripped(0.0)
    opened = 0.2
    assert [b.admit(opened + t) for t in (0.0, 1.0, 4.9)] == [Admission.REJECT] * 3
    assert b.state_at(opened + 4.99) is BreakerState.OPEN
    assert b.state_at(opened + 5.0) is BreakerState.HALF_OPEN
    assert b.tripped  # half-open still shows as 1 on the metric


def test_half_open_lets_one_call_in_k_through_as_a_probe() -> None:
    b = tripped(0.0)
    got = [b.admit(10.0 + i * 0.01) for i in range(9)]
    assert got == [
        Admission.PROBE,
        *[Admission.REJECT] * 3,
        Admission.PROBE,
        *[Admission.REJECT] * 3,
        Admission.PROBE,
    ]


def test_probe_timeout_reopens_for_a_new_cool_off() -> None:
    b = tripped(0.0)
    assert b.admit(10.0) is Admission.PROBE
    b.on_timeout(11.0, probe=True)
    assert st(b) is BreakerState.OPEN
    assert b.reopens_at() == 11.0 + S.cool_off
    assert b.admit(15.9) is Admission.REJECT
    assert b.admit(16.0) is Admission.PROBE  # next round: the first call is the probe again


def test_timeouts_of_calls_that_were_not_probes_do_not_move_an_open_or_half_open_breaker() -> None:
    b = tripped(0.0)
    b.on_timeout(1.0)  # a call sent before it opened
    assert st(b) is BreakerState.OPEN and b.reopens_at() == 0.2 + S.cool_off
    assert b.state_at(6.0) is BreakerState.HALF_OPEN
    b.on_timeout(6.0)
    assert st(b) is BreakerState.HALF_OPEN


def test_first_answer_closes_from_half_open_and_the_count_starts_again() -> None:
    b = tripped(0.0)
    assert b.admit(10.0) is Admission.PROBE
    b.on_answer(10.3)
    assert st(b) is BreakerState.CLOSED and not b.tripped
    assert b.admit(10.4) is Admission.SEND
    b.on_timeout(11.0)
    b.on_timeout(11.1)
    assert st(b) is BreakerState.CLOSED  # two timeouts after the answer: below the threshold
    b.on_timeout(11.2)
    assert st(b) is BreakerState.OPEN


def test_a_late_answer_while_open_closes_it() -> None:
    b = tripped(0.0)
    b.on_answer(1.0)  # ClearIP answered a call sent before the breaker opened: it is alive
    assert st(b) is BreakerState.CLOSED


def test_threshold_zero_turns_it_off() -> None:
    b = Breaker(BreakerSettings(threshold=0))
    for t in range(100):
        b.on_timeout(float(t) * 0.01)
    assert st(b) is BreakerState.CLOSED and b.admit(1.0) is Admission.SEND


def test_reload_keeps_the_state_and_turning_it_off_closes_it() -> None:
    b = tripped(0.0)
    b.update(BreakerSettings(threshold=3, window=10.0, cool_off=1.0, probe_every=2))
    assert b.state_at(0.5) is BreakerState.OPEN
    assert b.state_at(1.2) is BreakerState.HALF_OPEN  # the new cool-off applies
    before = b.transitions
    b.update(BreakerSettings(threshold=0))
    assert st(b) is BreakerState.CLOSED and b.transitions == before + 1


def test_transitions_count_each_state_change_once() -> None:
    b = Breaker(S)
    assert b.transitions == 0
    b.on_timeout(0.0)
    b.on_timeout(0.1)
    b.on_timeout(0.2)  # open
    b.admit(5.3)  # half-open (cool-off passed), probe
    b.on_answer(5.4)  # closed
    b.on_answer(5.5)  # still closed: no change
    assert b.transitions == 3


@pytest.mark.parametrize("kw", [{"threshold": -1}, {"window": 0.0}, {"cool_off": -1.0}, {"probe_every": 0}])
def test_bad_settings_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(**kw)  # type: ignore[arg-type]
