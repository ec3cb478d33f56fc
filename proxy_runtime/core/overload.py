"""Overload control: shed new calls before the kernel drops datagrams, sans-I/O, ``now`` injected.

Past its capacity a UDP proxy collapses unless it sheds work early: the socket's receive queue
grows, requests wait longer than SIP's T1 (500 ms), every client retransmits, the retransmissions
take the CPU that new calls needed, and the kernel drops what no longer fits (measured before this
existed: offered 1,062 calls/s, 665 completed, 5,920 failed, 54,036 retransmissions). The signal
that comes first is the *queue delay*: how long a datagram waited in the kernel before the proxy
read it (the adapter takes it from the kernel's receive timestamp, SO_TIMESTAMPNS). It rises as
soon as work arrives faster than it is done, long before the buffer overflows, and it is exactly
what decides whether clients retransmit.

The controller is PIE (RFC 8033, "Proportional Integral controller Enhanced"), the AQM built on
that signal: every ``interval`` it moves the probability of refusing a new call by
``alpha * (delay - target) + beta * (delay - previous delay)`` — the integral term settles at the
share of new calls the proxy can carry with a standing queue of ``target``; the proportional term
reacts to a rising queue before it is long. Only *new* out-of-dialog INVITEs are refused (503 with
Retry-After, answered by the caller of :meth:`OverloadControl.admit` without routing the call):
retransmissions, responses, ACK, CANCEL, BYE and every in-dialog request are always served, and
so are emergency calls, so the calls already admitted keep their share of the CPU. Refusals are
spread evenly (a credit counter rather than random draws, so tests are exact). Two of RFC 8033's
guards keep a short burst or a collection pause from costing calls: while the queue is short
(under half the target) with a small refusal share nothing is refused (§4.1), and after a quiet
spell the first ``max_burst`` (0.1 s) of a burst refuses nothing (§4.4's burst allowance).

Defaults (tuned on a model of this proxy with a refusal at a tenth of a carried call): the
control interval 20 ms; alpha 1.0 and beta 5.0 per interval for delays in seconds; the step
capped at +0.1 a interval; the refusal share capped at 0.98, so a probe of new calls always gets
through and the proxy notices the load falling back. Modelled at 2x capacity: 89 % of capacity
carried, queue delay p99 86 ms with a 50 ms target.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy_runtime.settings import Settings
from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import Via, parse_via
from proxy_runtime.sip.message import SipRequest
from proxy_runtime.sip.parse import try_parse_for_reply


@dataclass(frozen=True, slots=True)
class OverloadSettings:
    target_delay: float = 0.2  # seconds in the receive queue the controller aims at; 0 = off
    retry_after: int = 5  # the Retry-After of the 503 a refused call gets (seconds)
    interval: float = 0.02  # control period (RFC 8033's T_UPDATE)
    alpha: float = 1.0  # integral gain, per interval, for a delay error in seconds
    beta: float = 5.0  # proportional gain on the delay's change, per interval
    max_step: float = 0.1  # the refusal share rises by at most this much an interval
    max_refuse: float = 0.98  # never refuse every new call: a few still probe the load
    max_burst: float = 0.1  # RFC 8033 §4.4: a burst this long after a quiet spell refuses nothing
    idle_after: float = 0.2  # nothing read for this long: the queue is empty (the load has gone)

    def __post_init__(self) -> None:
        if self.target_delay < 0:
            raise ValueError("target_delay must not be negative (0 turns overload control off)")
        if self.retry_after < 0:
            raise ValueError("retry_after must not be negative")
        if not self.interval > 0 or not self.alpha >= 0 or not self.beta >= 0 or not self.max_step > 0:
            raise ValueError("interval and max_step must be greater than 0, the gains not negative")
        if not 0 <= self.max_refuse < 1:
            raise ValueError("max_refuse must be at least 0 and under 1")

    @property
    def enabled(self) -> bool:
        return self.target_delay > 0


class OverloadControl:
    """Feed :meth:`observe` the queue delay once per batch the adapter reads (the wait of the
    batch's oldest datagram while more are waiting, 0 once the socket is empty); ask
    :meth:`admit` for each new call."""

    __slots__ = (
        "_burst",
        "_credit",
        "_last_read",
        "_next_update",
        "_peak",
        "_previous",
        "delay",
        "refuse",
        "refused",
        "settings",
    )

    def __init__(self, settings: OverloadSettings, now: float = 0.0) -> None:
        self.settings = settings
        self.refuse = 0.0  # the share of new calls refused now (PIE's drop probability)
        self.delay = 0.0  # the queue delay the last update acted on (seconds)
        self.refused = 0  # new calls refused since start
        self._peak = 0.0  # the longest delay observed in the current interval
        self._previous = 0.0
        self._last_read = now
        self._credit = 0.0
        self._burst = settings.max_burst
        self._next_update = now + settings.interval

    def update_settings(self, settings: OverloadSettings) -> None:
        self.settings = settings
        if not settings.enabled:
            self.refuse = 0.0

    def observe(self, delay: float, now: float) -> None:
        """A datagram that waited ``delay`` seconds in the receive queue was read at ``now``."""
        if delay > self._peak:
            self._peak = delay
        self._last_read = now
        if now >= self._next_update:
            self._update(now, 0)

    @property
    def shedding(self) -> bool:
        """Whether some new calls are being refused (the adapter's cheap pre-check)."""
        return self.refuse > 0.0

    def admit(self, now: float) -> bool:
        """Whether to carry a new call now; False means answer it 503 with Retry-After."""
        if now >= self._next_update and now - self._last_read >= self.settings.idle_after:
            # Nothing read for a while (a UDP read always reports first): the queue is empty.
            # Within a long batch the last delay read still holds: the proxy is busy, not idle.
            self._update(now, int((now - self._last_read) / self.settings.interval))
        refuse = self.refuse
        if refuse <= 0.0 or self._burst > 0.0:
            return True
        if refuse < 0.2 and self.delay < self.settings.target_delay / 2:
            return True  # RFC 8033 §4.1: a short queue and a small refusal share refuse nothing
        self._credit += 1.0 - refuse
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        self.refused += 1
        return False

    def _update(self, now: float, idle: int) -> None:
        """One PIE update. ``idle``: intervals with nothing read (each an empty queue). An update
        that comes late because one batch took long counts its intervals as elapsed time: the
        integral term and the step cap scale with them (PIE's gains are per unit of time)."""
        s = self.settings
        if not s.enabled:
            self._peak = 0.0
            self._next_update = now + s.interval
            return
        elapsed = 1 if idle else 1 + int((now - self._next_update) / s.interval)
        delay, self._peak = self._peak, 0.0
        old = self._previous
        refuse = self._step(self.refuse, delay, old, elapsed)
        self._previous = delay
        for _ in range(min(idle, 100)):
            refuse = self._step(refuse, 0.0, self._previous, 1)
            self._previous = 0.0
        self.refuse = refuse
        self.delay = delay if not idle else 0.0
        half = s.target_delay / 2
        if refuse <= 0.0 and self.delay < half and old < half:
            self._credit = 0.0
            self._burst = s.max_burst  # quiet: the next burst is allowed max_burst before refusals
        else:
            self._burst = max(0.0, self._burst - s.interval * (elapsed + idle))
        self._next_update = now + s.interval

    def _step(self, refuse: float, delay: float, previous: float, elapsed: int) -> float:
        s = self.settings
        change = elapsed * s.alpha * (delay - s.target_delay) + s.beta * (delay - previous)
        refuse += min(change, elapsed * s.max_step)
        if delay == 0.0 and previous == 0.0:
            refuse *= 0.98  # RFC 8033 §4.2: decay while the queue stays empty
            if refuse < 0.001:
                refuse = 0.0
        return min(max(refuse, 0.0), s.max_refuse)


def overload_settings(settings: Settings) -> OverloadSettings:
    return OverloadSettings(
        target_delay=settings.overload_queue_delay, retry_after=settings.overload_retry_after
    )


# ---- the cheap path for a refused call ------------------------------------------------------
# A refusal must cost a small fraction of a carried call, or refusing cannot make room (at 2x
# capacity a refusal costing a fifth of a call leaves only 75 % of capacity for calls). So a refused
# INVITE is read from its bytes (scan_invite below; the reply-only parser for anything unusual:
# about a third of a full parse), answered statelessly (RFC 3261 §16.11 lets a proxy answer statelessly;
# a lost 503 is answered again when the caller retransmits), and the ACK for that 503 is
# recognised from its bytes by the To tag the refusal used, and dropped without a parse.


def refusal_candidate(data: bytes) -> tuple[SipRequest, Via] | None:
    """The minimal parse of an INVITE that may be refused: None when it is in-dialog (a To tag:
    re-INVITEs are never refused) or not readable that way (the full path answers it)."""
    req = try_parse_for_reply(data)
    if req is None or req.method != "INVITE":
        return None
    try:
        if req.to_tag is not None:
            return None
        return req, req.top_via
    except ParseError:
        return None


def refusal_tag(instance: str) -> str:
    """The To tag of stateless refusals: distinct from the stateful answers' tag (``instance``),
    whose ACKs must reach their server transaction."""
    return f"{instance}-ovl"


def refusal(req: SipRequest, retry_after: int, tag: str) -> bytes:
    extra = [("Retry-After", str(retry_after))] if retry_after else None
    return make_response(req, 503, to_tag=tag, extra=extra).serialize()


def ack_for_refusal(data: bytes, tag: bytes) -> bool:
    """Whether ``data`` is an ACK whose To tag is ``tag`` (the ACK for a stateless refusal)."""
    if not data.startswith(b"ACK ") or tag not in data:
        return False
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in (b"to", b"t"):
            return _has_tag(value, tag)
    return False


def _has_tag(value: bytes, tag: bytes) -> bool:
    _, _, params = value.rpartition(b">") if b">" in value else (b"", b"", value)
    for p in params.split(b";")[1:]:
        name, _, v = p.partition(b"=")
        if name.strip().lower() == b"tag" and v.strip() == tag:
            return True
    return False


# ---- the byte-level refusal ----------------------------------------------------------------
# Written by hand because no SIP library offers a partial read cheaper than this project's own
# reply-only parser, and the refusal's cost decides how much of capacity survives at 2x load.
# Anything unusual (folded or compact-form headers with quotes, no magic cookie, an emergency
# number anywhere in the Request-URI, a To tag) returns None and takes the parsed path above.

_WANTED = {
    b"via": b"via",
    b"v": b"via",
    b"from": b"from",
    b"f": b"from",
    b"to": b"to",
    b"t": b"to",
    b"call-id": b"call-id",
    b"i": b"call-id",
    b"cseq": b"cseq",
}


class ScannedInvite:
    """What a refusal needs from a new INVITE, read from its bytes. A plain class, not a
    dataclass: mypyc compiles its ``__init__`` (one per refusal)."""

    __slots__ = ("call_id", "cseq", "from_", "to", "via", "vias")

    def __init__(
        self, via: Via, vias: tuple[bytes, ...], from_: bytes, to: bytes, call_id: bytes, cseq: bytes
    ) -> None:
        self.via = via  # the top Via, parsed
        self.vias = vias  # every Via header line's value, in order (the first holds the top Via)
        self.from_ = from_
        self.to = to
        self.call_id = call_id
        self.cseq = cseq

    def refusal(self, top_via: Via, tag: str, retry_after: int) -> bytes:
        """The stateless 503: every Via (the top one as stamped), From, To with ``tag``, Call-ID,
        CSeq, Retry-After (RFC 3261 §8.2.6.2)."""
        first = self.vias[0]
        rest = first.split(b",", 1)[1] if b"," in first else b""
        out = [
            b"SIP/2.0 503 Service Unavailable",
            b"Via: " + str(top_via).encode() + (b"," + rest if rest else b""),
        ]
        out += [b"Via: " + v for v in self.vias[1:]]
        out += [
            b"From: " + self.from_,
            b"To: " + self.to + b";tag=" + tag.encode(),
            b"Call-ID: " + self.call_id,
            b"CSeq: " + self.cseq,
        ]
        if retry_after:
            out.append(b"Retry-After: %d" % retry_after)
        out.append(b"Content-Length: 0")
        return b"\r\n".join(out) + b"\r\n\r\n"


def emergency_digits(numbers: tuple[str, ...]) -> tuple[bytes, ...]:
    """The digits to look for in a Request-URI before refusing from the bytes: each emergency
    number without a leading + or 1 (the matcher accepts 911, 1911 and +1911 alike)."""
    out = []
    for n in numbers:
        digits = "".join(c for c in n if c.isdigit())
        if digits.startswith("1") and len(digits) > 3:
            digits = digits[1:]
        if digits:
            out.append(digits.encode())
    return tuple(out)


# Header names as written -> what _WANTED makes of them, so the usual names (the same few on every
# INVITE of a trunk) skip strip() and lower(). Bounded: names a peer invents stop being remembered.
_NAME_KEYS: dict[bytes, bytes | None] = {}
_NAME_KEYS_MAX = 256
_NAME_KEY_LEN = 64  # longer "names" (a hostile peer's) are looked up each time, never kept


def _header_key(name: bytes) -> bytes | None:
    try:
        return _NAME_KEYS[name]
    except KeyError:
        pass
    key = _WANTED.get(name.strip().lower())
    if len(name) <= _NAME_KEY_LEN and len(_NAME_KEYS) < _NAME_KEYS_MAX:
        _NAME_KEYS[name] = key
    return key


def scan_invite(data: bytes, emergency: tuple[bytes, ...]) -> ScannedInvite | None:
    """A new out-of-dialog INVITE read from its bytes, or None (take the parsed path).
    ``emergency``: :func:`emergency_digits` — an INVITE whose Request-URI holds any of them is
    left to the parsed path, which knows an emergency call for sure."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    start = lines[0]
    if not start.startswith(b"INVITE ") or not start.endswith(b" SIP/2.0"):
        return None
    ruri = start[7:-8]
    if b"%" in ruri or any(n in ruri for n in emergency):
        return None  # maybe an emergency call (escaped digits too): the parsed path decides
    vias: list[bytes] = []
    found: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if not line or line[0] in b" \t":
            return None  # a folded header: the parser handles it
        colon = line.find(b":")
        if colon < 0:
            return None
        key = _header_key(line[:colon])
        if key is None:
            continue
        value = line[colon + 1 :].strip()
        if key == b"via":
            vias.append(value)
        elif key in found:
            return None  # a repeated From/To/Call-ID/CSeq: malformed, the parser answers 400
        else:
            found[key] = value
    if not vias or len(found) != 4:
        return None
    to = found[b"to"]
    if b"tag" in to.lower() or b'"' in vias[0]:
        return None  # a To tag (in-dialog: never refused), or a quoted Via parameter
    if found[b"cseq"].split()[-1:] != [b"INVITE"]:
        return None  # a CSeq that does not match the method: the parser answers 400
    try:
        via = parse_via(vias[0].split(b",", 1)[0].decode("ascii"))
    except (ParseError, UnicodeDecodeError):
        return None
    if not via.branch.startswith("z9hG4bK"):
        return None
    return ScannedInvite(via, tuple(vias), found[b"from"], to, found[b"call-id"], found[b"cseq"])
