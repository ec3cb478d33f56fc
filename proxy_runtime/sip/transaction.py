"""RFC 3261 §17 transactions (with RFC 6026's Accepted states), sans-I/O.

Each transaction is a small state machine driven by three kinds of input, all taking ``now``:
messages (``receive_*``), the owner's sends (``send_response``) and timers (``on_timer``). It never
reads a clock and never touches a socket: it calls ``transmit(data)``, bound by its owner to the
right destination, and exposes ``deadline`` — the next time ``on_timer`` must be called, or None.
The owner keeps one timer heap for all of them (see :mod:`proxy_runtime.core.timers`).

Transitions are tables (state -> input -> next state); an input missing from a state's row is
ignored (absorbed), which is what RFC 3261 asks of retransmissions and late messages.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

Transmit = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """RFC 3261 §17 timer bases (seconds)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout_64t1(self) -> float:  # Timers B, F, H, J, L, M
        return 64 * self.t1


DEFAULT_TIMERS = TimerSettings()


class State(enum.Enum):
    CALLING = "calling"  # INVITE client
    TRYING = "trying"  # non-INVITE client and server
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"  # INVITE server, after ACK
    ACCEPTED = "accepted"  # RFC 6026: after a 2xx
    TERMINATED = "terminated"

    # Members are singletons compared by identity: hash them by identity too, in C. Enum's own
    # __hash__ is a Python function, called on every transition-table lookup.
    __hash__ = object.__hash__


class Event(enum.Enum):
    """What a transaction reports to its owner from ``on_timer`` or ``transport_error``."""

    TIMEOUT = "timeout"  # Timer B/F (client) or H (server: no ACK for the final)
    TRANSPORT_ERROR = "transport_error"


class Verdict(enum.Enum):
    """What the owner should do with a response a client transaction received."""

    PASS = "pass"  # hand it to the TU (forward it)
    ABSORB = "absorb"  # a retransmission: drop it


# Client INVITE (RFC 3261 Figure 5 + RFC 6026): state -> response class -> next state.
_ICT: dict[State, dict[str, State]] = {
    State.CALLING: {"1xx": State.PROCEEDING, "2xx": State.ACCEPTED, "final": State.COMPLETED},
    State.PROCEEDING: {"1xx": State.PROCEEDING, "2xx": State.ACCEPTED, "final": State.COMPLETED},
    State.ACCEPTED: {"2xx": State.ACCEPTED},
    State.COMPLETED: {"final": State.COMPLETED},
}
# Client non-INVITE (Figure 6).
_NICT: dict[State, dict[str, State]] = {
    State.TRYING: {"1xx": State.PROCEEDING, "2xx": State.COMPLETED, "final": State.COMPLETED},
    State.PROCEEDING: {"1xx": State.PROCEEDING, "2xx": State.COMPLETED, "final": State.COMPLETED},
}


def _klass(status: int) -> str:
    if status < 200:
        return "1xx"
    if status < 300:
        return "2xx"
    return "final"


def _discard(data: bytes) -> None:
    """A released transaction's ``transmit``: it sends nothing, and holds no destination."""


class _Transaction:
    """What client and server transactions share: their key and owner, how they send, which timers
    they run, their state, and the one deadline (the earliest timer) at which they want waking."""

    __slots__ = (
        "_interval",
        "_retransmit_at",
        "_timeout_at",
        "deadline",
        "invite",
        "key",
        "owner",
        "reliable",
        "state",
        "timers",
        "transmit",
    )

    def __init__(
        self,
        key: object,
        transmit: Transmit,
        state: State,
        *,
        invite: bool,
        reliable: bool,
        timers: TimerSettings,
    ) -> None:
        self.key = key
        self.owner: object = None  # who handles what this transaction passes up (set by the TU)
        self.transmit = transmit
        self.invite = invite
        self.reliable = reliable
        self.timers = timers
        self.state = state
        self._interval = timers.t1
        self._retransmit_at: float | None = None
        self._timeout_at: float | None = None
        self.deadline: float | None = None

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def _update_deadline(self) -> None:
        r, t = self._retransmit_at, self._timeout_at
        self.deadline = t if r is None else r if t is None else min(r, t)

    def terminate(self) -> None:
        self.state = State.TERMINATED
        self.deadline = None

    def release(self) -> None:
        """The TU dropped this (terminated) transaction: keep nothing but the key. A stale entry in
        the core's timer heap holds it strongly until its old deadline (Timer B / F: 64*T1 = 32 s,
        e.g. every ClearIP INVITE ended at once by its 302 over TCP or TLS), so it must not keep
        its bytes, its ACK, its request (``build_ack``) or its destination meanwhile."""
        self.state = State.TERMINATED
        self.deadline = None
        self._retransmit_at = None
        self._timeout_at = None
        self.owner = None
        self.transmit = _discard


class ClientTransaction(_Transaction):
    """INVITE (``invite=True``) or non-INVITE client transaction.

    ``build_ack(response) -> bytes`` is called for non-2xx finals of an INVITE (the transaction
    ACKs them itself, RFC 3261 §17.1.1.3).
    """

    __slots__ = ("_ack", "_build_ack", "_data")

    def __init__(
        self,
        key: object,
        data: bytes,
        transmit: Transmit,
        *,
        invite: bool,
        reliable: bool,
        now: float,
        timers: TimerSettings = DEFAULT_TIMERS,
        build_ack: Callable[[object], bytes] | None = None,
    ) -> None:
        state = State.CALLING if invite else State.TRYING
        super().__init__(key, transmit, state, invite=invite, reliable=reliable, timers=timers)
        self._data = data
        self._build_ack = build_ack
        self._ack: bytes | None = None
        self._retransmit_at = None if reliable else now + timers.t1  # Timer A / E
        self._timeout_at = now + timers.timeout_64t1  # Timer B / F
        self._update_deadline()
        transmit(data)

    def release(self) -> None:
        super().release()
        self._data = b""
        self._ack = None
        self._build_ack = None

    def receive_response(self, response: object, status: int, now: float) -> Verdict:
        table = _ICT if self.invite else _NICT
        row = table.get(self.state)
        klass = _klass(status)
        if row is None or klass not in row:
            return Verdict.ABSORB
        prev = self.state
        nxt = row[klass]
        self.state = nxt
        if self.invite:
            if klass == "1xx":
                self._retransmit_at = None  # Timer A stops; Timer B only runs in Calling
                self._timeout_at = None
                self._data = b""  # never retransmitted again: free it (memory per ringing call)
            elif klass == "2xx":
                self._build_ack = None  # the TU ACKs a 2xx end to end
                self._data = b""
                self._retransmit_at = None
                self._timeout_at = now + self.timers.timeout_64t1  # Timer M
                self._update_deadline()
                return Verdict.PASS  # every 2xx is forwarded (RFC 6026)
            else:
                if prev is State.COMPLETED:
                    if self._ack is not None:
                        self.transmit(self._ack)  # retransmitted final: ACK again, absorb
                    return Verdict.ABSORB
                if self._build_ack is not None:
                    self._ack = self._build_ack(response)
                    self._build_ack = None  # it holds the request: free it once used
                    self.transmit(self._ack)
                self._retransmit_at = None
                self._timeout_at = now if self.reliable else now + self.timers.timeout_64t1  # Timer D
        else:
            if klass == "1xx":
                if self._retransmit_at is not None:
                    self._retransmit_at = now + self.timers.t2  # Timer E at T2 in Proceeding
                    self._interval = self.timers.t2
            else:
                self._retransmit_at = None
                self._data = b""  # never sent again: free it for Timer K's wait
                self._timeout_at = now if self.reliable else now + self.timers.t4  # Timer K
        self._update_deadline()
        return Verdict.PASS

    def on_timer(self, now: float) -> Event | None:
        if self.state is State.TERMINATED:
            self.deadline = None
            return None
        if self._timeout_at is not None and now >= self._timeout_at:
            timed_out = self.state in (State.CALLING, State.TRYING, State.PROCEEDING)
            self.state = State.TERMINATED
            self.deadline = None
            return Event.TIMEOUT if timed_out else None
        if self._retransmit_at is not None and now >= self._retransmit_at:
            self.transmit(self._data)
            if self.invite:
                self._interval *= 2  # Timer A doubles without cap
            else:
                self._interval = min(self._interval * 2, self.timers.t2)
            self._retransmit_at = now + self._interval
        self._update_deadline()
        return None

    def transport_error(self) -> Event | None:
        if self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            self.state = State.TERMINATED
            self.deadline = None
            return Event.TRANSPORT_ERROR
        return None


class ServerTransaction(_Transaction):
    """INVITE (``invite=True``) or non-INVITE server transaction.

    The request that created it has been handed to the TU already; retransmissions of it go to
    :meth:`receive_request`, which resends the last response. The TU answers with
    :meth:`send_response`.
    """

    __slots__ = ("_last", "final_status")

    def __init__(
        self,
        key: object,
        transmit: Transmit,
        *,
        invite: bool,
        reliable: bool,
        timers: TimerSettings = DEFAULT_TIMERS,
    ) -> None:
        state = State.PROCEEDING if invite else State.TRYING
        super().__init__(key, transmit, state, invite=invite, reliable=reliable, timers=timers)
        self._last: bytes | None = None
        self.final_status = 0

    def release(self) -> None:
        super().release()
        self._last = None

    @property
    def has_final(self) -> bool:
        return self.final_status >= 200

    def receive_request(self, now: float) -> None:
        """A retransmission of the request: resend the last response (if any)."""
        if self._last is not None and self.state in (State.PROCEEDING, State.COMPLETED, State.TRYING):
            self.transmit(self._last)

    def receive_ack(self, now: float) -> bool:
        """ACK for a non-2xx final: stop retransmitting. Returns True when it matched (absorbed).

        An ACK in the Accepted state is for the 2xx, end to end: False, so the TU forwards it
        (RFC 6026 §7.1, §8.5: it MUST be passed to the TU, not absorbed). It matches this
        transaction when the client reused the INVITE's branch, or has no magic cookie (RFC 2543:
        the key is Call-ID, From tag and CSeq number, the same in the ACK for a 2xx)."""
        if self.invite and self.state is State.COMPLETED:
            self.state = State.CONFIRMED
            self._retransmit_at = None
            self._timeout_at = now if self.reliable else now + self.timers.t4  # Timer I
            self._update_deadline()
            return True
        return self.invite and self.state is State.CONFIRMED

    def send_response(self, data: bytes, status: int, now: float) -> bool:
        """Send a response. Returns False (nothing sent) when the transaction can't send it."""
        if self.invite:
            if self.state is State.PROCEEDING:
                self.transmit(data)
                if status < 200:
                    self._last = data
                elif status < 300:
                    self.final_status = status
                    self.state = State.ACCEPTED
                    self._last = None
                    self._timeout_at = now + self.timers.timeout_64t1  # Timer L
                else:
                    self.final_status = status
                    self.state = State.COMPLETED
                    self._last = data
                    self._timeout_at = now + self.timers.timeout_64t1  # Timer H
                    if not self.reliable:
                        self._retransmit_at = now + self.timers.t1  # Timer G
                self._update_deadline()
                return True
            if self.state is State.ACCEPTED and 200 <= status < 300:
                self.transmit(data)  # 2xx retransmissions from downstream pass through (RFC 6026)
                return True
            return False
        if self.state in (State.TRYING, State.PROCEEDING):
            self.transmit(data)
            self._last = data
            if status < 200:
                self.state = State.PROCEEDING
            else:
                self.final_status = status
                self.state = State.COMPLETED
                self._timeout_at = now if self.reliable else now + self.timers.timeout_64t1  # Timer J
            self._update_deadline()
            return True
        return False

    def on_timer(self, now: float) -> Event | None:
        if self.state is State.TERMINATED:
            self.deadline = None
            return None
        if self._timeout_at is not None and now >= self._timeout_at:
            no_ack = self.invite and self.state is State.COMPLETED
            self.state = State.TERMINATED
            self.deadline = None
            return Event.TIMEOUT if no_ack else None
        if self._retransmit_at is not None and now >= self._retransmit_at and self._last is not None:
            self.transmit(self._last)
            self._interval = min(self._interval * 2, self.timers.t2)
            self._retransmit_at = now + self._interval
        self._update_deadline()
        return None
