"""Requests relayed along their route set: in-dialog requests and pre-routed requests (loose routing).

Owns: one :class:`Relay` per relayed request (its server transaction, the forwarded copy and its
client transaction), what each response to it does upstream, CANCEL of a relayed INVITE (held
until downstream sent a provisional, §9.1; the final comes from downstream, §16.10), the ring
limit of a relayed INVITE (Timer C, RFC 3261 §16.8), and the stateless forwarding of ACKs for 2xx
(:func:`forward_ack`, §16.11). No dialog state: the Route headers carry the path.

Must not touch: calls (initial INVITEs), the transaction tables beyond the
:class:`~.transactions.Transactions` methods, timers, the network or the clock.
"""

from __future__ import annotations

import zlib

from proxy_runtime.core.routing import drop_server_retry_after
from proxy_runtime.core.stamp import SendFn, Stamper, Target, loop_hash, next_hop, strip_own_via
from proxy_runtime.core.transactions import RingLimited, Transactions, Upstream
from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import Via
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.transaction import ClientTransaction, ServerTransaction
from proxy_runtime.sip.uri import UriError


class Relay(RingLimited):
    """A request forwarded along the route set: server transaction in, client transaction out."""

    __slots__ = ("_cancel_held", "_provisional", "_to_tag", "_txns", "ct", "request", "st", "target")

    def __init__(
        self, txns: Transactions, st: ServerTransaction, request: SipRequest, target: Target, to_tag: str
    ) -> None:
        self._txns = txns
        self._to_tag = to_tag  # ours, on the responses we make (408, 487)
        self.st = st
        self.request = request  # the forwarded copy (our Via on top)
        self.target = target
        self.ct: ClientTransaction | None = None
        self._provisional = False  # downstream sent a 1xx: a CANCEL may go (RFC 3261 §9.1)
        self._cancel_held = False  # a CANCEL waits for that 1xx

    @classmethod
    def start(
        cls,
        txns: Transactions,
        stamper: Stamper,
        req: SipRequest,
        st: ServerTransaction,
        target: Target,
        now: float,
        *,
        ring_timeout: float,
    ) -> Relay:
        """Forward ``req`` (received on ``st``) to ``target``: 100 Trying first for an INVITE,
        whose ring limit is then guarded."""
        if req.method == "INVITE":
            txns.respond(st, make_response(req, 100), now)
        branch = stamper.new_branch(req)
        out = stamper.prepare_forward(req, target, branch)
        ckey = (branch, req.method)
        relay = cls(txns, st, out, target, stamper.instance)
        st.owner = relay
        relay.ct = txns.start_client(out, target, ckey, relay, now)
        if req.method == "INVITE" and not relay.ct.terminated:
            txns.guard(ckey, now + ring_timeout, cancelled=False)
        return relay

    # --- events ------------------------------------------------------------------------------
    def on_response(self, ct: ClientTransaction, resp: SipResponse, method: str, now: float) -> None:
        """A response the client transaction passed up: relay it (a 2xx to an INVITE through the
        server transaction's Accepted state, RFC 6026). A 100 is hop by hop: never relayed (for
        an INVITE our own 100 Trying already went; RFC 3261 §16.7 step 5). The first provisional
        to an INVITE releases a held CANCEL (§9.1)."""
        st = self.st
        status = resp.status
        if status < 200 and method == "INVITE" and not self._provisional:
            self._provisional = True
            if self._cancel_held:
                self._cancel_held = False
                self._txns.send_cancel(self.request, self.target, now)
        if 200 <= status < 300 and method == "INVITE":
            self._txns.pass_upstream(st, resp, now)  # also when it crossed the caller's CANCEL
            st.owner = None
            ct.owner = Upstream(st)  # the relay (its forwarded request) is freed
        elif status > 100:
            # A 503's Retry-After would tell the caller to keep away from the proxy itself (see
            # routing.drop_server_retry_after), where one callee or carrier said so of itself.
            self._txns.respond(st, drop_server_retry_after(strip_own_via(resp)), now)
            if status >= 200:
                st.owner = None  # answered: the relay is no longer needed

    def cancel(self, now: float) -> None:
        """The caller CANCELled the relayed INVITE (the dispatcher answered the CANCEL 200): CANCEL
        downstream. The INVITE's final is downstream's, relayed (its 487, or a 2xx that crossed
        the CANCEL, which must reach the caller: RFC 3261 §16.10, §16.7 step 10)."""
        if self.st.has_final:
            return
        self._cancel_downstream(now)

    def client_failed(self, status: int, now: float) -> None:
        """The client transaction timed out or could not be sent: answer ``status`` ourselves. Not
        for a non-INVITE: a timeout gets no answer (RFC 4320 §4.2: never 408; the caller's own
        transaction times out), a transport error 500 (§16.9: as if downstream answered 503, which
        §16.7 step 6 turns into a 500)."""
        if self.request.method == "INVITE":
            self._answer(status, now)
        elif status == 408:
            self._txns.drop_server(self.st)  # nothing more to send: free it now
        else:
            self._answer(500, now)

    def ring_limit(self, now: float) -> None:
        """Timer C fired on the relayed INVITE (RFC 3261 §16.8). After a provisional: CANCEL it and
        let downstream's final through, its 487 or a 2xx that crossed the CANCEL (which must reach
        the caller); the CANCEL's own guard answers 408 if none comes within 64*T1. Before any
        provisional: as if downstream had answered 408, with the CANCEL held until it rings."""
        self._cancel_downstream(now)
        if not self._provisional:
            self.client_failed(408, now)

    def _cancel_downstream(self, now: float) -> None:
        """CANCEL the forwarded INVITE now if downstream sent a provisional, else once it does
        (RFC 3261 §9.1: a CANCEL before a provisional MUST NOT be sent). A final first: none."""
        if self._provisional:
            self._txns.send_cancel(self.request, self.target, now)
        else:
            self._cancel_held = True

    def server_ended(self) -> None:
        self.ct = None

    def _answer(self, status: int, now: float) -> None:
        """Answer the caller ourselves (once): built from the forwarded copy, so our Via comes off."""
        if self.st.has_final:
            return
        r = make_response(self.request, status, to_tag=self._to_tag)
        r.pop_first_value("via")
        self._txns.respond(self.st, r, now)


def forward_ack(stamper: Stamper, send: SendFn, req: SipRequest, via: Via) -> None:
    """An ACK for a 2xx: end to end along the route set, statelessly (RFC 3261 §16.11). ACKs
    that have nowhere to go (Max-Forwards spent, a loop, addressed to us, bad URI) are dropped."""
    mf = req.get("max-forwards")
    if mf is not None and int(mf) <= 0:
        return
    stamper.pop_own_routes(req)
    try:
        if stamper.is_loop(req):
            return
        if not req.has("route") and stamper.uri_is_me(req):
            return
        target = next_hop(req)
        # Stateless: the same ACK retransmitted gets the same branch (RFC 3261 §16.11); the loop
        # hash in it lets is_loop catch the ACK if it comes back unchanged (§16.3 step 4).
        crc = zlib.crc32(via.branch.encode() + req.call_id.encode())
        branch = f"{stamper.branch_prefix}{loop_hash(req)}a{crc:08x}"
    except (UriError, ParseError):
        return
    out = stamper.prepare_forward(req, target, branch)
    send(target, out.serialize(), None)
