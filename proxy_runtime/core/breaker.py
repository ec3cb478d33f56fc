"""The ClearIP brownout breaker: a small sans-I/O state machine, ``now`` injected.

When ClearIP is connected but silent, every call would wait the full ``timeout`` before its 503
(5 s of post-dial delay each). The breaker turns that into an immediate 503 once ClearIP has shown
it is not answering, and finds out cheaply when it answers again::

    CLOSED --(threshold consecutive timeouts, the first of them within `window` of the last)--> OPEN
    OPEN --(cool_off elapsed)--> HALF_OPEN
    HALF_OPEN: one call in `probe_every` goes to ClearIP (a probe); the others get 503 at once
    HALF_OPEN --(a probe times out)--> OPEN (a new cool-off)
    any state --(ClearIP answers a call: any final response)--> CLOSED

"Consecutive" means with no ClearIP answer in between: one answer proves ClearIP alive and starts
the count again. Timeouts of calls that were not probes do not move an open or half-open breaker
(they were sent before it opened). ``threshold`` 0 turns the breaker off: it stays closed.

The transition table is explicit (as h11's ``_state`` tables): a (state, event) pair that is not in
it leaves the state unchanged, and nothing else changes it.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from proxy_runtime.settings import Settings


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"

    # Members are singletons compared by identity: hash them by identity too, in C. Enum's own
    # __hash__ is a Python function, called on every transition-table lookup.
    __hash__ = object.__hash__


class Admission(enum.Enum):
    """What to do with a new call."""

    SEND = "send"  # closed: send to ClearIP
    PROBE = "probe"  # half-open: send to ClearIP as the probe of this round
    REJECT = "reject"  # open, or half-open and not this round's probe: 503 at once


class _Event(enum.Enum):
    TRIP = "trip"  # threshold consecutive timeouts within the window
    COOLED = "cooled"  # cool-off elapsed
    PROBE_TIMEOUT = "probe-timeout"
    ANSWER = "answer"

    __hash__ = object.__hash__  # as BreakerState's


_TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (BreakerState.CLOSED, _Event.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, _Event.COOLED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, _Event.PROBE_TIMEOUT): BreakerState.OPEN,
    (BreakerState.OPEN, _Event.ANSWER): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, _Event.ANSWER): BreakerState.CLOSED,
}


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    threshold: int = 5  # consecutive ClearIP timeouts that open the breaker; 0 = breaker off
    window: float = 30.0  # ... all within this many seconds
    cool_off: float = 10.0  # seconds open before probing
    probe_every: int = 10  # half-open: one call in this many is sent to ClearIP as a probe

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError("threshold must not be negative")
        if not self.window > 0 or not self.cool_off > 0:
            raise ValueError("window and cool_off must be greater than 0")
        if self.probe_every < 1:
            raise ValueError("probe_every must be at least 1")


class Breaker:
    """Feed it :meth:`admit` for each new call, :meth:`on_answer` / :meth:`on_timeout` for each
    ClearIP outcome; read :attr:`state` (or :attr:`tripped` for the metric)."""

    __slots__ = ("_admitted", "_opened_at", "_settings", "_state", "_timeouts", "transitions")

    def __init__(self, settings: BreakerSettings | None = None) -> None:
        self._settings = settings or BreakerSettings()
        self._state = BreakerState.CLOSED
        self._timeouts: deque[float] = deque(maxlen=max(1, self._settings.threshold))
        self._opened_at = 0.0
        self._admitted = 0  # calls seen while half-open, this round
        self.transitions = 0  # state changes so far (the owner publishes the state when it moves)

    # --- reading -------------------------------------------------------------------------------
    @property
    def settings(self) -> BreakerSettings:
        return self._settings

    def state_at(self, now: float) -> BreakerState:
        """The state at ``now``: an open breaker whose cool-off has passed is half-open."""
        self._cool(now)
        return self._state

    @property
    def state(self) -> BreakerState:
        """The state as of the last event (see :meth:`state_at` for the cool-off)."""
        return self._state

    @property
    def tripped(self) -> bool:
        """Open or half-open: what the ``ClearIpBreakerOpen`` metric shows as 1."""
        return self._state is not BreakerState.CLOSED

    def reopens_at(self) -> float | None:
        """When an open breaker turns half-open (None unless open)."""
        if self._state is BreakerState.OPEN:
            return self._opened_at + self._settings.cool_off
        return None

    # --- events --------------------------------------------------------------------------------
    def admit(self, now: float) -> Admission:
        """A new call that needs ClearIP: send it, send it as a probe, or reject it at once."""
        state = self.state_at(now)
        if state is BreakerState.CLOSED:
            return Admission.SEND
        if state is BreakerState.OPEN:
            return Admission.REJECT
        first_of_round = self._admitted % self._settings.probe_every == 0
        self._admitted += 1
        return Admission.PROBE if first_of_round else Admission.REJECT

    def on_answer(self, now: float) -> None:
        """ClearIP sent a final response to some call: it is alive."""
        self._timeouts.clear()
        self._move(_Event.ANSWER, now)

    def on_timeout(self, now: float, *, probe: bool = False) -> None:
        """A call sent to ClearIP got no final response within ``timeout``."""
        state = self.state_at(now)
        if state is BreakerState.HALF_OPEN:
            if probe:
                self._move(_Event.PROBE_TIMEOUT, now)
            return
        if state is not BreakerState.CLOSED or self._settings.threshold == 0:
            return
        self._timeouts.append(now)
        if (
            len(self._timeouts) >= self._settings.threshold
            and now - self._timeouts[0] <= self._settings.window
        ):
            self._move(_Event.TRIP, now)

    def update(self, settings: BreakerSettings) -> None:
        """New settings (reload). The state is kept; turning the breaker off closes it."""
        self._settings = settings
        recent = list(self._timeouts)[-max(1, settings.threshold) :]
        self._timeouts = deque(recent, maxlen=max(1, settings.threshold))
        if settings.threshold == 0 and self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            self._timeouts.clear()
            self.transitions += 1

    # --- internals -----------------------------------------------------------------------------
    def _cool(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now >= self._opened_at + self._settings.cool_off:
            self._move(_Event.COOLED, now)

    def _move(self, event: _Event, now: float) -> None:
        new = _TRANSITIONS.get((self._state, event))
        if new is None:
            return
        self._state = new
        self.transitions += 1
        if new is BreakerState.OPEN:
            self._opened_at = now
        elif new is BreakerState.HALF_OPEN:
            self._admitted = 0
        elif new is BreakerState.CLOSED:
            self._timeouts.clear()


def breaker_settings(s: Settings) -> BreakerSettings:
    """The breaker's part of the proxy's settings (validated there, named in errors)."""
    return BreakerSettings(
        threshold=s.breaker_threshold,
        window=s.breaker_window,
        cool_off=s.breaker_cool_off,
        probe_every=s.breaker_probe_every,
    )
