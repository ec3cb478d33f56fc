"""A simulated carrier for the demo and the tests: :class:`SimulatedCarrier`, a UAS that answers
INVITEs by behaviour (answer, busy, unavailable, silent, ring forever, reject with any status) and
records every request it receives. Sockets are :class:`~proxy_runtime.tools.endpoint.SipEndpoint`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.tools.endpoint import (
    T1,
    Addr,
    Peer,
    ReceivedRequest,
    SipEndpoint,
    Source,
    Transport,
    cancel_tasks,
    new_tag,
    sdp_body,
    uri_user,
    via_with_rport,
)

CarrierBehaviour = str  # "answer" | "busy" | "unavailable" | "silent" | "ring" | "reject:<status>"
_BEHAVIOURS = ("answer", "busy", "unavailable", "silent", "ring")


def check_behaviour(b: str) -> str:
    if b in _BEHAVIOURS:
        return b
    if b.startswith("reject:") and b[7:].isdigit() and 300 <= int(b[7:]) <= 699:
        return b
    raise ValueError(f"unknown carrier behaviour {b!r} (one of {', '.join(_BEHAVIOURS)}, reject:NNN)")


@dataclass(slots=True)
class _UasInvite:
    request: SipRequest
    source: Source
    to_tag: str
    last: bytes = b""
    final: int = 0
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class SimulatedCarrier(Peer):
    """A carrier's SIP endpoint: answers INVITEs by behaviour, per called number or by default.

    ``numbers`` maps a called number (R-URI user, with or without ``+``) to a behaviour; other numbers
    get ``behaviour``. Every request received is kept in :attr:`received`; every status sent in
    :attr:`sent` (per Call-ID)."""

    def __init__(
        self,
        name: str = "carrier",
        *,
        behaviour: CarrierBehaviour = "answer",
        numbers: Mapping[str, CarrierBehaviour] | None = None,
        host: str = "127.0.0.1",
        ring_delay: float = 0.05,
        t1: float = T1,
    ) -> None:
        self.name = name
        self.behaviour = check_behaviour(behaviour)
        self.numbers = {k.lstrip("+"): check_behaviour(v) for k, v in (numbers or {}).items()}
        self.host = host
        self.ring_delay = ring_delay
        self.t1 = t1
        self.endpoint = SipEndpoint(self._on_message, name=name)
        self.received: list[ReceivedRequest] = []
        self.sent: dict[str, list[tuple[str, int]]] = {}  # Call-ID -> (CSeq method, status) sent
        self._invites: dict[str, _UasInvite] = {}  # by INVITE branch
        self._by_call: dict[str, _UasInvite] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, *, udp: bool = True, tcp: bool = True, port: int = 0) -> None:
        if udp:
            await self.endpoint.listen_udp(self.host, port)
        if tcp:
            await self.endpoint.listen_stream(self.host, port if not udp else 0)

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        await self.endpoint.close()

    def address(self, transport: Transport = "udp") -> Addr:
        return self.endpoint.local_addr(transport)

    def uri(self, number: str = "{user}", transport: Transport = "udp") -> str:
        """A Contact URI for this carrier, e.g. for a simulator rule (``{user}`` kept as a template)."""
        host, port = self.address(transport)
        tp = "" if transport == "udp" else f";transport={transport}"
        return f"sip:{number}@{host}:{port}{tp}"

    def invites(self, call_id: str | None = None) -> list[SipRequest]:
        return [
            r.request
            for r in self.received
            if r.method == "INVITE" and (call_id is None or r.request.call_id == call_id)
        ]

    def requests(self, call_id: str | None = None) -> list[ReceivedRequest]:
        return [r for r in self.received if call_id is None or r.request.call_id == call_id]

    def invite_finals(self, call_id: str) -> list[int]:
        """Final statuses this carrier sent to INVITEs of that call."""
        return [st for m, st in self.sent.get(call_id, []) if m == "INVITE" and st >= 200]

    def behaviour_for(self, number: str) -> str:
        return self.numbers.get(number.lstrip("+"), self.behaviour)

    # --- protocol ----------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, inv: _UasInvite | None, src: Source, resp: SipResponse) -> bytes:
        via_with_rport(resp, src)
        data = resp.serialize()
        self.endpoint.reply(src, data)
        self.sent.setdefault(resp.call_id, []).append((resp.cseq[1], resp.status))
        if inv is not None:
            inv.last = data
            if resp.status >= 200:
                inv.final = resp.status
        return data

    def _on_message(self, msg: SipMessage, src: Source) -> None:
        if not isinstance(msg, SipRequest):
            return  # a UAS that sends no requests expects no responses
        self.received.append(ReceivedRequest(msg, src, time.monotonic()))
        method = msg.method
        if method == "INVITE":
            self._on_invite(msg, src)
        elif method == "ACK":
            inv = self._invites.get(msg.top_via.branch) or self._by_call.get(msg.call_id)
            if inv is not None:
                inv.acked.set()
        elif method == "CANCEL":
            inv = self._invites.get(msg.top_via.branch)
            if inv is None:
                self._send(None, src, make_response(msg, 481))
                return
            self._send(None, src, make_response(msg, 200))
            if not inv.final:
                if inv.task is not None:
                    inv.task.cancel()
                self._final(inv, 487)
        elif method == "BYE":
            known = msg.call_id in self._by_call
            self._send(None, src, make_response(msg, 200 if known else 481))
        elif method in ("OPTIONS", "INFO", "UPDATE", "NOTIFY", "PRACK"):
            self._send(None, src, make_response(msg, 200))
        else:
            self._send(
                None, src, make_response(msg, 405, extra=[("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS")])
            )

    def _on_invite(self, req: SipRequest, src: Source) -> None:
        branch = req.top_via.branch
        inv = self._invites.get(branch)
        if inv is not None:  # retransmission: the last response again
            if inv.last:
                self.endpoint.reply(src, inv.last)
            return
        if req.to_tag:  # re-INVITE in a dialog: accept with the same SDP
            dlg = self._by_call.get(req.call_id)
            inv = _UasInvite(req, src, dlg.to_tag if dlg else new_tag())
            self._invites[branch] = inv
            self._final(inv, 200)
            return
        inv = _UasInvite(req, src, new_tag())
        self._invites[branch] = inv
        self._by_call[req.call_id] = inv
        behaviour = self.behaviour_for(uri_user(req.uri))
        self._send(inv, src, make_response(req, 100))
        if behaviour == "silent":
            return
        inv.task = asyncio.get_running_loop().create_task(self._answer(inv, behaviour))
        self._tasks.add(inv.task)
        inv.task.add_done_callback(self._tasks.discard)

    async def _answer(self, inv: _UasInvite, behaviour: str) -> None:
        if behaviour in ("answer", "ring"):
            self._send(inv, inv.source, make_response(inv.request, 180, to_tag=inv.to_tag))
            if behaviour == "ring":
                return  # rings until CANCEL
            await asyncio.sleep(self.ring_delay)
            self._final(inv, 200)
        elif behaviour == "busy":
            self._final(inv, 486, "Busy Here")
        elif behaviour == "unavailable":
            self._final(inv, 503)
        else:
            status = int(behaviour.split(":", 1)[1])
            self._final(inv, status, "Temporarily Unavailable" if status == 480 else None)

    def _final(self, inv: _UasInvite, status: int, reason: str | None = None) -> None:
        extra: list[tuple[str, str]] = []
        body = b""
        if status == 200:
            t = inv.source.transport
            host, port = self.endpoint.local_addr(t)
            tp = "" if t == "udp" else f";transport={t}"
            extra = [("Contact", f"<sip:{self.name}@{host}:{port}{tp}>"), ("Content-Type", "application/sdp")]
            rr = inv.request.get_all("record-route")
            extra = [("Record-Route", v) for v in rr] + extra
            body = sdp_body(host, 40000, self.name)
        resp = make_response(inv.request, status, reason, to_tag=inv.to_tag, extra=extra, body=body)
        data = self._send(inv, inv.source, resp)
        if inv.source.transport == "udp":
            self._spawn(self.endpoint.resend_until_acked(inv.source, data, inv.acked, self.t1))
