"""Shared call set-ups for the integration tests: ClearIP's 302 values and the standard topologies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.integration.harness import HOST, Lab, ProxyProcess, SipMessage, Sipp, contact_list, make_identity

CALLED = "+15555550100"
PARTITION_HOST = "acme.sip.clearip.com"

# What ClearIP puts in its 302: realistic sizes, bare and quoted ppt, one after diversion.
IDENTITY_1 = make_identity("clearip-shaken-1", size=900)
IDENTITY_2 = make_identity("clearip-shaken-2", quoted_ppt=True, size=920)
IDENTITY_DIV = make_identity("clearip-div-1", ppt="div", quoted_ppt=True, size=880)
PAI_OUTBOUND = "<sip:+12025550100@clearip.example;user=phone>"
PAI_VERSTAT = '"[V] Alice Caller" <sip:+12025550100@clearip.example;user=phone;verstat=TN-Validation-Passed>'

CLEARIP_KEYS = {
    "identity1": IDENTITY_1,
    "identity2": IDENTITY_2,
    "identity3": IDENTITY_DIV,
    "pai": PAI_OUTBOUND,
}


@dataclass
class Call:
    proxy: ProxyProcess
    clearip: Sipp
    carriers: list[Sipp]
    switch: Sipp
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def carrier(self) -> Sipp:
        return self.carriers[0]

    def switch_final(self) -> SipMessage:
        finals = self.switch.final_responses()
        assert finals, "the switch received no final response to its INVITE"
        return finals[0]


def routed_call(
    lab: Lab,
    *,
    switch_transport: str = "udp",
    switch_scenario: str = "uac_call.xml",
    carriers: Sequence[tuple[str, str, float]] = (("carrier_answer.xml", "udp", 0.9),),
    clearip_scenario: str = "clearip_302.xml",
    clearip_keys: dict[str, str] | None = None,
    contacts_order: Sequence[int] | None = None,
    proxy_kw: dict[str, Any] | None = None,
    switch_kw: dict[str, Any] | None = None,
    settle: float = 5.0,
) -> Call:
    """Carriers (SIPp UASes) → ClearIP answering with them as Contacts → proxy → the switch's call.

    ``carriers`` are (scenario, transport, q); ``contacts_order`` lists their indexes in the order the
    Contact header names them (default: as given), so tests can check q-ordering against list order.
    Waits (bounded) for ClearIP and carriers to finish, then returns every peer for assertions.
    """
    peers = [lab.carrier(f"carrier{i + 1}", sc, tp) for i, (sc, tp, _) in enumerate(carriers)]
    order = list(contacts_order) if contacts_order is not None else list(range(len(peers)))
    contacts = contact_list([(CALLED, peers[i], carriers[i][2]) for i in order])
    keys = dict(CLEARIP_KEYS, contacts=contacts)
    keys.update(clearip_keys or {})
    clearip = lab.clearip(clearip_scenario, keys)
    proxy = lab.proxy(clearip.port, **(proxy_kw or {}))
    switch = lab.switch(switch_scenario, proxy, switch_transport, **(switch_kw or {}))
    lab.settle(clearip, *peers, timeout=settle)
    return Call(proxy, clearip, peers, switch, {"contacts": contacts})


def direct_to_proxy(
    lab: Lab,
    switch_scenario: str,
    *,
    switch_transport: str = "udp",
    clearip_scenario: str = "clearip_302.xml",
    with_carrier: bool = True,
    proxy_kw: dict[str, Any] | None = None,
    switch_kw: dict[str, Any] | None = None,
) -> Call:
    """ClearIP (and a carrier it would route to) are up, but the test expects neither to be asked."""
    carrier = lab.carrier("carrier1", "carrier_answer.xml", "udp") if with_carrier else None
    keys = dict(
        CLEARIP_KEYS, contacts=contact_list([(CALLED, carrier, 0.9)]) if carrier else f"<sip:{HOST}:9>"
    )
    clearip = lab.clearip(clearip_scenario, keys)
    proxy = lab.proxy(clearip.port, **(proxy_kw or {}))
    switch = lab.switch(switch_scenario, proxy, switch_transport, **(switch_kw or {}))
    for p in [clearip, carrier]:
        if p is not None:
            p.stop()
    return Call(proxy, clearip, [carrier] if carrier else [], switch)


def first_invite(peer: Sipp) -> SipMessage:
    invites = peer.received("INVITE")
    assert invites, f"{peer.name} received no INVITE"
    return invites[0]


def elapsed_to_final(switch: Sipp) -> float:
    """Seconds from the switch's first INVITE to the first final response it received (trace times)."""
    sent = switch.sent("INVITE")
    assert sent, "the switch sent no INVITE"
    finals = switch.final_responses()
    assert finals, "the switch received no final response"
    return finals[0].time - sent[0].time


def acked(peer: Sipp, status_msg: SipMessage) -> bool:
    """Whether ``peer`` received an ACK for the final response ``status_msg`` it sent (same Call-ID/CSeq)."""
    num, _ = status_msg.cseq
    return any(a.call_id == status_msg.call_id and a.cseq == (num, "ACK") for a in peer.received("ACK"))
