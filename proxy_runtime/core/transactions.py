"""The proxy's transaction tables: RFC 3261 §17 transactions bound to where they send.

Owns: the server and client transaction tables (by key), creating a transaction bound to its
destination (responses per §18.2.2, requests to their next hop), sending responses through a
server transaction, the CANCELs the proxy sends (§9.1) and their Timer C guards (§16.8), the ACK
for a non-2xx final (§17.1.1.3), and the two owners that need no TU logic: :data:`CANCEL_OWNER`
and :class:`Upstream`. Ending a transaction cuts its owner link so a finished call or relay is
freed by reference counting at once.

Must not touch: what a response means to a call or relay (the dispatcher and :mod:`call` /
:mod:`relay` decide), timers' meaning (only schedules them in :class:`~.timers.Timers`), the
network (sends through the adapter's ``send``), or the clock (``now`` is an argument).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Protocol, cast

from proxy_runtime.core.stamp import SendFn, Target, response_target
from proxy_runtime.core.timers import Timers
from proxy_runtime.sip.grammar import Via, parse_via
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.transaction import ClientTransaction, Event, ServerTransaction, State, TimerSettings

log = logging.getLogger("clearip.proxy")

# A client transaction failed: (transaction, status to answer, why, now). The dispatcher tells the
# transaction's owner; the transaction is dropped from the table right after.
FailedFn = Callable[[ClientTransaction, int, str, float], None]


class ServerOwner(Protocol):
    """A call or relay that owns a server transaction: told when the transaction ends, to let go
    of the client transactions it holds (they cut the reference cycles)."""

    def server_ended(self) -> None: ...


class RingLimited:
    """The owner of a relayed INVITE client transaction whose ring limit (Timer C) ran out.

    A base class rather than a runtime-checkable Protocol: the compiled build (mypyc) checks
    ``isinstance`` against classes only."""

    __slots__ = ()

    def ring_limit(self, now: float) -> None:
        raise NotImplementedError


class SendTo:
    """A transaction's ``transmit``: ``send`` to one target, with the client transaction's key
    (None for a server transaction) for transport errors.

    A class rather than a closure: under mypyc a closure keeps every variable of its enclosing
    function that any nested function uses (the whole forwarded request, for ``build_ack``) alive
    for as long as the closure lives, i.e. for the transaction's 32 s (measured: 336 MB against
    163 MB after 40,000 calls at 1,000 calls/s in ``bench.core_micro``'s flow)."""

    __slots__ = ("key", "send", "target")

    def __init__(self, send: SendFn, target: Target, key: object) -> None:
        self.send = send
        self.target = target
        self.key = key

    def __call__(self, data: bytes) -> None:
        self.send(self.target, data, self.key)


class _CancelOwner:
    """Owner of the CANCELs (and hang-up BYEs) we send: their responses need no action."""

    __slots__ = ()


CANCEL_OWNER = _CancelOwner()


class Upstream:
    """Owner of an INVITE client transaction whose 2xx has been relayed: for the rest of its
    Accepted state (RFC 6026, 64*T1) 2xx retransmissions pass to the server transaction ``st``.

    It replaces the call (or relay) as owner the moment the 2xx is relayed, so the finished call —
    its requests with their Identity headers, its branches — is freed at once instead of being held
    for 32 s by the two transactions that must stay (measured: 13 KB per answered call before).

    Plain classes here and in :class:`InviteGuard`, not dataclasses: mypyc compiles their
    ``__init__`` (a dataclass's stays interpreted), and one of each is made per call."""

    __slots__ = ("st",)

    def __init__(self, st: ServerTransaction) -> None:
        self.st = st


class InviteGuard:
    """Timer C (RFC 3261 §16.8, §9.1) for an INVITE client transaction that may never get a final
    response: after a CANCEL, 64*T1 without a final destroys it; a relayed INVITE still without a
    final at the ring limit is CANCELled (and answered 408). Without it a peer that sends 1xx and
    then nothing leaks the transaction forever (no RFC 3261 timer runs in Proceeding)."""

    __slots__ = ("cancelled", "deadline", "key")

    def __init__(self, key: tuple[str, str], deadline: float | None, cancelled: bool) -> None:
        self.key = key
        self.deadline = deadline
        self.cancelled = cancelled


def build_ack(request: SipRequest, response: object) -> bytes:
    """ACK for a non-2xx final (RFC 3261 §17.1.1.3)."""
    assert isinstance(response, SipResponse)
    ack = SipRequest("ACK", request.uri)
    ack.headers.append(["via", "Via", request.first_value("via") or ""])
    for h in request.headers:
        if h[0] in ("from", "call-id", "route"):
            ack.headers.append(list(h))
    ack.headers.append(["to", "To", response.get("to") or request.get("to") or ""])
    ack.headers.append(["cseq", "CSeq", f"{request.cseq[0]} ACK"])
    ack.headers.append(["max-forwards", "Max-Forwards", "70"])
    return ack.serialize()


class Transactions:
    """Server and client transactions by key; each bound to its destination when created."""

    __slots__ = ("_failed", "_send", "_timer_settings", "_timers", "client", "server")

    def __init__(
        self, send: SendFn, timers: Timers, timer_settings: TimerSettings, *, failed: FailedFn
    ) -> None:
        self._send = send
        self._failed = failed
        self._timers = timers
        self._timer_settings = timer_settings
        self.server: dict[object, ServerTransaction] = {}
        self.client: dict[object, ClientTransaction] = {}

    # --- server side -------------------------------------------------------------------------
    def new_server(
        self, req: SipRequest, via: Via, source: Target, key: tuple[str, str, str]
    ) -> ServerTransaction:
        target = response_target(via, source)
        transmit = SendTo(self._send, target, None)
        invite = req.method == "INVITE"
        timers = self._timer_settings
        st = ServerTransaction(key, transmit, invite=invite, reliable=source.reliable, timers=timers)
        self.server[key] = st
        return st

    def respond(self, st: ServerTransaction, resp: SipResponse, now: float) -> None:
        st.send_response(resp.serialize(), resp.status, now)
        if st.terminated:
            self.drop_server(st)
        else:
            self._timers.schedule(st)

    def pass_upstream(self, st: ServerTransaction, resp: SipResponse, now: float) -> None:
        """A provisional or a 2xx (retransmission) through the server transaction, our Via off."""
        out = resp.copy()
        out.pop_first_value("via")
        if st.send_response(out.serialize(), out.status, now):
            self._timers.schedule(st)

    # Ownership forms reference cycles (call <-> server transaction, branch <-> client transaction,
    # call <-> branch). They are cut when a transaction ends, so a finished call is freed by
    # reference counting the moment its last timer ends, never left to the cyclic GC.
    def drop_server(self, st: ServerTransaction) -> None:
        self.server.pop(st.key, None)
        owner = st.owner
        st.release()  # never woken again (its heap entry goes stale) and holds nothing meanwhile
        if owner is not None:
            cast(ServerOwner, owner).server_ended()  # only calls and relays own server transactions

    # --- client side -------------------------------------------------------------------------
    def start_client(
        self, out: SipRequest, target: Target, key: tuple[str, str], owner: object, now: float
    ) -> ClientTransaction:
        data = out.serialize()
        invite = out.method == "INVITE"
        ct = ClientTransaction(
            key,
            data,
            SendTo(self._send, target, key),
            invite=invite,
            reliable=target.reliable,
            now=now,
            timers=self._timer_settings,
            build_ack=functools.partial(build_ack, out) if invite else None,
        )
        ct.owner = owner
        if not ct.terminated:
            self.client[key] = ct
            self._timers.schedule(ct)
        return ct

    def drop_client(self, ct: ClientTransaction) -> None:
        self.client.pop(ct.key, None)
        ct.release()  # never woken again (its heap entry goes stale) and holds nothing meanwhile

    def send_cancel(self, invite: SipRequest, target: Target, now: float) -> None:
        """CANCEL a request we forwarded (RFC 3261 §9.1): same R-URI, top Via, Call-ID, From, To,
        CSeq number and Route; then Timer C: 64*T1 for the INVITE's final."""
        cancel = SipRequest("CANCEL", invite.uri)
        top_via = invite.first_value("via") or ""
        cancel.headers.append(["via", "Via", top_via])
        for h in invite.headers:
            if h[0] in ("from", "to", "call-id", "route", "max-forwards"):
                cancel.headers.append(list(h))
        seq, _ = invite.cseq
        cancel.headers.append(["cseq", "CSeq", f"{seq} CANCEL"])
        branch = parse_via(top_via).branch
        key = (branch, "CANCEL")
        if key in self.client:
            return
        self.start_client(cancel, target, key, CANCEL_OWNER, now)
        self.guard((branch, "INVITE"), now + self._timer_settings.timeout_64t1, cancelled=True)

    def guard(self, key: tuple[str, str], when: float, *, cancelled: bool) -> None:
        """Timer C for the INVITE client transaction ``key``: the dispatcher acts at ``when``."""
        self._timers.schedule(InviteGuard(key, when, cancelled))

    # --- timers and failures -----------------------------------------------------------------
    def on_timer(self, obj: object, now: float) -> None:
        """A transaction or guard that :class:`~.timers.Timers` found due."""
        if isinstance(obj, ClientTransaction):
            if obj.on_timer(now) is Event.TIMEOUT:
                self._failed(obj, 408, "request timeout", now)
            if obj.terminated:
                self.drop_client(obj)
            else:
                self._timers.schedule(obj)
        elif isinstance(obj, ServerTransaction):
            if obj.on_timer(now) is Event.TIMEOUT:
                log.debug("no ACK for final response on %s", obj.key)
            if obj.terminated:
                self.drop_server(obj)
            else:
                self._timers.schedule(obj)
        elif isinstance(obj, InviteGuard):
            self._guard_timer(obj, now)

    def _guard_timer(self, guard: InviteGuard, now: float) -> None:
        guard.deadline = None
        ct = self.client.get(guard.key)
        if ct is None or ct.state not in (State.CALLING, State.PROCEEDING):
            return  # it got its final response (or ended) meanwhile
        owner = ct.owner
        if not guard.cancelled and isinstance(owner, RingLimited):
            owner.ring_limit(now)  # a relay: CANCEL (which guards it for 64*T1) and 408
            return
        ct.terminate()
        self._failed(ct, 408, "no final response after CANCEL", now)
        self.drop_client(ct)

    def transport_error(self, key: object, now: float) -> None:
        """Sending for the client transaction ``key`` failed (connection refused, unreachable)."""
        ct = self.client.get(key)
        if ct is None:
            return
        if ct.transport_error() is Event.TRANSPORT_ERROR:
            self._failed(ct, 503, "transport error", now)
            self.drop_client(ct)
