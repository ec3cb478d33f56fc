"""A simulated switch for the demo and the tests: :class:`SimulatedSwitch`, a UAC that places a call
through a proxy (INVITE with SDP, ACK, BYE over the route set, CANCEL), retransmitting over UDP per
RFC 3261 timers A/B/E/F, and returns a :class:`CallResult`. Sockets are
:class:`~proxy_runtime.tools.endpoint.SipEndpoint`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import parse_name_addr
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.sip.uri import UriError, parse_uri
from proxy_runtime.tools.endpoint import (
    T1,
    T2,
    Addr,
    Peer,
    ReceivedRequest,
    SipEndpoint,
    Source,
    Transport,
    new_branch,
    new_tag,
    sdp_body,
    uri_target,
    via_with_rport,
)

log = logging.getLogger(__name__)


def _is_loose(route: str) -> bool:
    try:
        return parse_uri(parse_name_addr(route).uri).is_lr
    except (UriError, ParseError):
        return True


@dataclass(slots=True)
class CallResult:
    """What happened to one call placed by :meth:`SimulatedSwitch.call`."""

    number: str
    call_id: str
    status: int | None = None  # final status; None when none came
    reason: str = ""
    final: SipResponse | None = None
    provisionals: list[int] = field(default_factory=list)
    elapsed: float = 0.0  # seconds from the INVITE to the final response (or to giving up)
    answered: bool = False
    torn_down: bool = False  # BYE sent through the route set and answered 200
    bye_status: int | None = None
    cancelled: bool = False
    cancel_status: int | None = None
    error: str = ""

    @property
    def headers(self) -> list[tuple[str, str]]:
        return list(self.final.iter_headers()) if self.final is not None else []

    def header(self, name: str) -> str | None:
        return self.final.get(name) if self.final is not None else None

    @property
    def clean(self) -> bool:
        """Answered and torn down cleanly, or ended by a final failure response."""
        return (self.answered and self.torn_down) or (self.status is not None and self.status >= 300)


class _ClientTx:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[SipResponse] = asyncio.Queue()


class SimulatedSwitch(Peer):
    """A carrier switch placing calls: ``await switch.call("+12125551234", proxy_addr, "udp")``."""

    _counter = itertools.count(1)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        from_number: str = "+13035550100",
        t1: float = T1,
        name: str = "switch",
    ) -> None:
        self.host = host
        self.from_number = from_number
        self.t1 = t1
        self.name = name
        self.endpoint = SipEndpoint(self._on_message, name=name)
        self.received: list[ReceivedRequest] = []
        self._txs: dict[tuple[str, str], _ClientTx] = {}
        self._acks: dict[str, tuple[bytes, Transport, Addr]] = {}  # INVITE branch -> ACK to resend

    async def start(self, *, udp: bool = True, tcp: bool = True) -> None:
        if udp:
            await self.endpoint.listen_udp(self.host, 0)
        if tcp:
            await self.endpoint.listen_stream(self.host, 0)

    async def stop(self) -> None:
        await self.endpoint.close()

    # --- receiving ---------------------------------------------------------------------------
    def _on_message(self, msg: SipMessage, src: Source) -> None:
        if isinstance(msg, SipResponse):
            try:
                key = (msg.top_via.branch, msg.cseq[1])
            except ParseError:
                return
            tx = self._txs.get(key)
            if tx is not None:
                tx.queue.put_nowait(msg)
            elif msg.cseq[1] == "INVITE" and msg.status >= 200 and key[0] in self._acks:
                data, transport, addr = self._acks[key[0]]  # a retransmitted final: ACK again
                asyncio.get_running_loop().create_task(self._send_quiet(data, transport, addr))
            return
        assert isinstance(msg, SipRequest)
        self.received.append(ReceivedRequest(msg, src, time.monotonic()))
        if msg.method == "ACK":
            return
        if msg.method in ("BYE", "OPTIONS", "INFO", "UPDATE", "NOTIFY"):
            resp = make_response(msg, 200)
        else:
            resp = make_response(msg, 405, extra=[("Allow", "ACK, BYE, OPTIONS")])
        via_with_rport(resp, src)
        self.endpoint.reply(src, resp)

    async def _send_quiet(self, data: bytes, transport: Transport, addr: Addr) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            await self.endpoint.send(data, transport, addr)

    # --- building requests -------------------------------------------------------------------
    def _via(self, transport: Transport, branch: str) -> str:
        host, port = self.endpoint.local_addr(transport)
        return f"SIP/2.0/{transport.upper()} {host}:{port};branch={branch};rport"

    def _contact(self, transport: Transport) -> str:
        host, port = self.endpoint.local_addr(transport)
        tp = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{self.name}@{host}:{port}{tp}>"

    def _request(
        self,
        method: str,
        uri: str,
        transport: Transport,
        branch: str,
        *,
        from_: str,
        to: str,
        call_id: str,
        cseq: int,
        routes: Sequence[str] = (),
        extra: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> SipRequest:
        req = SipRequest(method, uri)
        req.add("Via", self._via(transport, branch))
        req.add("Max-Forwards", "70")
        for r in routes:
            req.add("Route", r)
        req.add("From", from_)
        req.add("To", to)
        req.add("Call-ID", call_id)
        req.add("CSeq", f"{cseq} {method}")
        if method in ("INVITE",):
            req.add("Contact", self._contact(transport))
            req.add("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS")
        req.add("User-Agent", "clearip-proxy-simulated-switch")
        for name, value in extra:
            req.add(name, value)
        if body:
            req.add("Content-Type", "application/sdp")
        req.add("Content-Length", str(len(body)))
        req.body = body
        return req

    # --- transactions ------------------------------------------------------------------------
    async def _non_invite(
        self, req: SipRequest, transport: Transport, addr: Addr, time_limit: float
    ) -> SipResponse | None:
        """A non-INVITE client transaction (timers E and F); the final response or None."""
        key = (req.top_via.branch, req.method)
        tx = self._txs[key] = _ClientTx()
        data = req.serialize()
        try:
            await self.endpoint.send(data, transport, addr)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(time_limit, 64 * self.t1)
            interval = self.t1
            next_retx = loop.time() + interval
            while True:
                now = loop.time()
                if now >= deadline:
                    return None
                wait = min(deadline, next_retx) - now if transport == "udp" else deadline - now
                try:
                    resp = await asyncio.wait_for(tx.queue.get(), max(wait, 0.0))
                except TimeoutError:
                    if transport == "udp" and loop.time() >= next_retx:
                        await self.endpoint.send(data, transport, addr)
                        interval = min(interval * 2, T2)
                        next_retx = loop.time() + interval
                    continue
                if resp.status >= 200:
                    return resp
                interval = T2  # a provisional: keep retransmitting at T2
        except (OSError, ConnectionError) as exc:
            log.info("%s: %s failed: %s", self.name, req.method, exc)
            return None
        finally:
            self._txs.pop(key, None)

    async def options(
        self, target: Addr, transport: Transport = "udp", time_limit: float = 5.0
    ) -> SipResponse | None:
        host, port = target
        uri = f"sip:{host}:{port}" + ("" if transport == "udp" else f";transport={transport}")
        req = self._request(
            "OPTIONS",
            uri,
            transport,
            new_branch(),
            from_=f"<sip:{self.name}@{self.host}>;tag={new_tag()}",
            to=f"<{uri}>",
            call_id=f"{secrets.token_hex(8)}@{self.host}",
            cseq=1,
        )
        return await self._non_invite(req, transport, target, time_limit)

    async def call(
        self,
        to_number: str,
        proxy: Addr,
        transport: Transport = "udp",
        *,
        domain: str | None = None,
        from_number: str | None = None,
        extra_headers: Iterable[tuple[str, str]] = (),
        cancel_after: float | None = None,
        hold: float = 0.05,
        time_limit: float = 40.0,
        bye: bool = True,
    ) -> CallResult:
        """Place a call to ``to_number`` through ``proxy`` and, when answered, hang it up.

        ``domain`` is the Request-URI host (default: the proxy's address). ``cancel_after`` sends a
        CANCEL when no final came within that many seconds. ``time_limit`` bounds the wait for the
        final response (Timer B is 64*T1 over UDP; over TCP only ``time_limit`` applies).
        """
        loop = asyncio.get_running_loop()
        host, port = proxy
        dom = domain or f"{host}:{port}"
        ruri = f"sip:{to_number}@{dom}"
        from_num = from_number or self.from_number
        seq = next(self._counter)
        call_id = f"{secrets.token_hex(10)}-{seq}@{self.host}"
        from_hdr = f'"Switch" <sip:{from_num}@{self.host}>;tag={new_tag()}'
        to_hdr = f"<sip:{to_number}@{dom}>"
        result = CallResult(to_number, call_id)
        if transport != "udp":
            try:  # connect first: without a listener of that kind, Via names the connection's address
                await self.endpoint.connect(transport, proxy)
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                result.error = f"connect failed: {exc}"
                return result
        branch = new_branch()
        try:
            sdp_host = self.endpoint.local_addr(transport)[0]
        except ConnectionError:
            sdp_host = self.host

        def in_transaction(
            method: str, extra: Iterable[tuple[str, str]] = (), body: bytes = b""
        ) -> SipRequest:
            """The INVITE, or the CANCEL that must match it (RFC 3261 §9.1: same branch, CSeq number)."""
            return self._request(
                method,
                ruri,
                transport,
                branch,
                from_=from_hdr,
                to=to_hdr,
                call_id=call_id,
                cseq=1,
                extra=extra,
                body=body,
            )

        invite = in_transaction("INVITE", extra_headers, sdp_body(sdp_host, 30000, "switch"))
        key = (branch, "INVITE")
        tx = self._txs[key] = _ClientTx()
        data = invite.serialize()
        start = loop.time()
        final: SipResponse | None = None
        try:
            try:
                await self.endpoint.send(data, transport, proxy)
            except (OSError, ConnectionError) as exc:
                result.error = f"send failed: {exc}"
                result.elapsed = loop.time() - start
                return result
            interval = self.t1
            next_retx: float | None = start + interval if transport == "udp" else None
            deadline = start + (min(time_limit, 64 * self.t1) if transport == "udp" else time_limit)
            cancel_at = start + cancel_after if cancel_after is not None else None
            cancel_task: asyncio.Task[SipResponse | None] | None = None
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                wake = min(t for t in (deadline, next_retx, cancel_at) if t is not None)
                try:
                    resp = await asyncio.wait_for(tx.queue.get(), max(wake - now, 0.0))
                except TimeoutError:
                    now = loop.time()
                    if next_retx is not None and now >= next_retx:
                        await self._send_quiet(data, transport, proxy)
                        interval *= 2
                        next_retx = now + interval
                    if cancel_at is not None and now >= cancel_at:
                        cancel_at = None
                        result.cancelled = True
                        cancel = in_transaction("CANCEL")
                        cancel.headers = [h for h in cancel.headers if h[0] != "user-agent"]
                        cancel_task = loop.create_task(
                            self._non_invite(cancel, transport, proxy, 32 * self.t1)
                        )
                        deadline = max(deadline, now + 64 * self.t1)
                    continue
                if resp.status < 200:
                    result.provisionals.append(resp.status)
                    next_retx = None  # Timer A stops on a provisional
                    continue
                final = resp
                break
            result.elapsed = loop.time() - start
            if cancel_task is not None:
                cresp = await cancel_task
                result.cancel_status = cresp.status if cresp else None
            if final is None:
                result.error = "no final response"
                return result
            result.status, result.reason, result.final = final.status, final.reason, final
            if final.status >= 300:
                # ACK for a non-2xx final: same branch, To with the response's tag (RFC 3261 §17.1.1.3).
                ack = self._request(
                    "ACK",
                    ruri,
                    transport,
                    branch,
                    from_=from_hdr,
                    to=final.get("to") or to_hdr,
                    call_id=call_id,
                    cseq=1,
                )
                ack_data = ack.serialize()
                self._remember_ack(branch, ack_data, transport, proxy)
                await self._send_quiet(ack_data, transport, proxy)
                return result
            if 200 <= final.status < 300:
                result.answered = True
                await self._dialog(result, final, invite, transport, proxy, from_hdr, hold, bye)
            return result
        finally:
            self._txs.pop(key, None)

    def _remember_ack(self, branch: str, data: bytes, transport: Transport, addr: Addr) -> None:
        if transport != "udp":
            return
        self._acks[branch] = (data, transport, addr)
        asyncio.get_running_loop().call_later(64 * self.t1, self._acks.pop, branch, None)

    async def _dialog(
        self,
        result: CallResult,
        ok: SipResponse,
        invite: SipRequest,
        transport: Transport,
        proxy: Addr,
        from_hdr: str,
        hold: float,
        bye: bool,
    ) -> None:
        """ACK the 2xx (new branch, through the route set), then BYE after ``hold`` seconds."""
        routes = list(reversed(ok.values("record-route")))
        contact = ok.first_value("contact")
        remote_target = parse_name_addr(contact).uri if contact else invite.uri
        to_hdr = ok.get("to") or ""
        if routes and _is_loose(routes[0]):
            ruri, route_hdrs = remote_target, routes
            next_hop = parse_name_addr(routes[0]).uri
        elif routes:  # strict router (RFC 3261 §12.2.1.1)
            ruri = parse_name_addr(routes[0]).uri
            route_hdrs = [*routes[1:], f"<{remote_target}>"]
            next_hop = ruri
        else:
            ruri, route_hdrs, next_hop = remote_target, [], remote_target
        try:
            hop_transport, hop_addr = uri_target(next_hop, transport)
        except UriError:
            hop_transport, hop_addr = transport, proxy

        def in_dialog(method: str, cseq: int) -> SipRequest:
            return self._request(
                method,
                ruri,
                hop_transport,
                new_branch(),
                from_=from_hdr,
                to=to_hdr,
                call_id=invite.call_id,
                cseq=cseq,
                routes=route_hdrs,
            )

        ack_data = in_dialog("ACK", 1).serialize()
        self._remember_ack(invite.top_via.branch, ack_data, hop_transport, hop_addr)
        try:
            await self.endpoint.send(ack_data, hop_transport, hop_addr)
        except (OSError, ConnectionError) as exc:
            result.error = f"ACK failed: {exc}"
            return
        if not bye:
            return
        await asyncio.sleep(hold)
        resp = await self._non_invite(in_dialog("BYE", 2), hop_transport, hop_addr, 64 * self.t1)
        result.bye_status = resp.status if resp else None
        result.torn_down = resp is not None and resp.status == 200
        if resp is None:
            result.error = "BYE not answered"
