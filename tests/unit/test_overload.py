"""Overload control (core/overload.py) on a fake clock, and the core's cheap refusal path."""

from __future__ import annotations

import pytest

from proxy_runtime.core.overload import (
    OverloadControl,
    OverloadSettings,
    ack_for_refusal,
    emergency_digits,
    scan_invite,
)
from proxy_runtime.core.proxy import ProxyCore, Target
from proxy_runtime.settings import SettingsError, load
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message
from tests.unit.test_proxy_core import SWITCH, Net, invite, make_core

TICK = 0.001


def drive(c: OverloadControl, delay_at: object, start: float, end: float) -> tuple[int, int]:
    """Observe ``delay_at(now)`` every ms and ask for one new call every ms; (admitted, refused)."""
    admitted = refused = 0
    now = start
    while now < end:
        c.observe(delay_at(now), now)  # type: ignore[operator]
        if c.admit(now):
            admitted += 1
        else:
            refused += 1
        now += TICK
    return admitted, refused


def test_short_queue_refuses_nothing() -> None:
    c = OverloadControl(OverloadSettings(target_delay=0.1))
    assert drive(c, lambda now: 0.02, 0.0, 5.0) == (5000, 0)
    assert not c.shedding


def test_a_short_burst_under_the_target_costs_no_call() -> None:
    """A collection pause or a burst shorter than the target does not refuse calls."""
    c = OverloadControl(OverloadSettings(target_delay=0.1))
    assert drive(c, lambda now: 0.06 if 1.0 <= now < 1.05 else 0.0, 0.0, 3.0)[1] == 0


def test_a_growing_queue_sheds_new_calls_then_recovers_when_it_empties() -> None:
    c = OverloadControl(OverloadSettings(target_delay=0.05))
    # The queue grows 0.5 s per second (the load is 1.5x capacity).
    admitted, refused = drive(c, lambda now: 0.5 * now, 0.0, 1.0)
    assert refused > 0.5 * (admitted + refused)
    assert c.shedding and c.refuse > 0.5
    # It never refuses every call: a probe still goes through.
    assert admitted > 0
    # The load falls back: within half a second everything is admitted again.
    drive(c, lambda now: 0.0, 1.0, 1.5)
    assert not c.shedding
    assert drive(c, lambda now: 0.001, 1.5, 2.0)[1] == 0


def test_refusals_settle_where_the_queue_stays_near_the_target() -> None:
    """A closed loop: the queue grows with the admitted work and drains at capacity."""
    c = OverloadControl(OverloadSettings(target_delay=0.05))
    backlog = 0.0  # seconds of work queued
    offered_per_s, carried_cost, refused_cost = 2000, 0.001, 0.0001  # 2x capacity
    delays = []
    now = 0.0
    while now < 5.0:
        c.observe(backlog, now)
        for _ in range(offered_per_s // 1000):
            backlog += carried_cost if c.admit(now) else refused_cost
        backlog = max(0.0, backlog - TICK)
        delays.append(backlog)
        now += TICK
    late = sorted(delays[2000:])
    assert late[-1] < 0.3  # well under T1 (0.5 s): the switch does not retransmit
    assert 0.4 < 1 - c.refuse < 0.5  # about 0.44 of new calls fit at 2x with refusals at 1/10


def test_idle_intervals_count_as_an_empty_queue_but_one_long_batch_does_not() -> None:
    c = OverloadControl(OverloadSettings(target_delay=0.05))
    drive(c, lambda now: 1.0, 0.0, 0.5)
    c.observe(1.0, 0.6)
    c.observe(1.0, 0.7)  # a batch that took 0.1 s to serve: still overloaded
    assert c.shedding and c.refuse > 0.9
    # One batch takes 0.15 s to serve (the proxy is busy, nothing new is read): still shedding.
    refused = sum(not c.admit(0.7 + i * TICK) for i in range(150))
    assert refused > 140 and c.refuse > 0.9
    c.admit(0.9)  # nothing read since 0.7: an empty interval; then idle until 10 s
    assert c.admit(10.0)
    assert not c.shedding


def test_off_when_target_is_zero() -> None:
    c = OverloadControl(OverloadSettings(target_delay=0))
    assert drive(c, lambda now: 5.0, 0.0, 1.0) == (1000, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("overload_queue_delay", 0.5), ("overload_queue_delay", -1), ("overload_retry_after", 0)],
)
def test_bad_overload_settings_name_the_setting(field: str, value: object) -> None:
    with pytest.raises(SettingsError) as info:
        load(environ={}, overrides={field: value})
    assert info.value.setting == field


# ---- the core -------------------------------------------------------------------------------


def _overloaded_core() -> tuple[ProxyCore, Net]:
    core, net = make_core(overload_queue_delay=0.05)
    now = 0.0
    while now < 0.5:  # the queue delay rises to 0.5 s
        core.note_queue_delay(now, now)
        now += TICK
    assert core.overload.shedding
    return core, net


def _new_invite(i: int) -> bytes:
    return invite(branch=f"z9hG4bKnew{i}").replace(b"call-1@", f"call-n{i}@".encode())


def test_core_refuses_new_invites_statelessly_with_retry_after() -> None:
    core, net = _overloaded_core()
    for i in range(50):
        core.receive(_new_invite(i), SWITCH, 0.5)
    out = net.take()
    refusals = [m for _, m in out if isinstance(m, SipResponse) and m.status == 503]
    carried = [m for _, m in out if isinstance(m, SipResponse) and m.status == 100]
    assert len(refusals) + len(carried) == 50
    assert len(refusals) > 40
    for r in refusals:
        assert r.get("retry-after") == "5"
        assert r.to_tag == "t35t-ovl"
    assert core.table_sizes()["server_transactions"] == len(carried)
    # Refused calls never went to ClearIP; carried ones did.
    to_clearip = [t for t, m in out if isinstance(m, SipRequest) and m.method == "INVITE"]
    assert len(to_clearip) == len(carried)


def test_core_never_refuses_retransmissions_in_dialog_requests_or_emergency_calls() -> None:
    core, net = make_core(overload_queue_delay=0.05)
    core.receive(invite(), SWITCH, 0.0)  # admitted before the overload
    net.take()
    now = 0.0
    while now < 0.5:
        core.note_queue_delay(now, now)
        now += TICK
    for _ in range(5):
        core.receive(invite(), SWITCH, 0.5)  # retransmissions: absorbed, 100 Trying resent
    statuses = [m.status for _, m in net.take() if isinstance(m, SipResponse)]
    assert 503 not in statuses
    for i in range(10):
        core.receive(
            invite(number="911", branch=f"z9hG4bKsos{i}").replace(b"call-1@", b"sos%d@" % i), SWITCH, 0.5
        )
        reinvite = _new_invite(100 + i).replace(
            b"acme.sip.clearip.com>\r\n", b"acme.sip.clearip.com>;tag=far\r\n", 1
        )
        core.receive(reinvite, SWITCH, 0.5)
    refusals = [m for _, m in net.take() if isinstance(m, SipResponse) and m.to_tag == "t35t-ovl"]
    assert refusals == []


def test_the_ack_for_a_refusal_is_recognised_from_its_bytes() -> None:
    tag = b"t35t-ovl"
    ack = (
        b"ACK sip:x@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=t35t-ovl\r\n"
        b"To: <sip:b@h>;tag=t35t-ovl\r\nCall-ID: c\r\nCSeq: 1 ACK\r\n\r\n"
    )
    assert ack_for_refusal(ack, tag)
    assert ack_for_refusal(ack.replace(b"To: <sip:b@h>", b"t: sip:b@h"), tag)
    assert not ack_for_refusal(ack.replace(b"To: <sip:b@h>;tag=t35t-ovl", b"To: <sip:b@h>;tag=other"), tag)
    assert not ack_for_refusal(ack.replace(b"ACK ", b"BYE ", 1), tag)


def test_core_drops_the_ack_for_a_refusal_without_forwarding_it() -> None:
    core, net = _overloaded_core()
    for i in range(10):
        core.receive(_new_invite(i), SWITCH, 0.5)
    refusal = next(m for _, m in net.take() if isinstance(m, SipResponse) and m.status == 503)
    ack = (
        f"ACK sip:+15551234567@acme.sip.clearip.com SIP/2.0\r\nVia: {refusal.get('via')}\r\n"
        f"Max-Forwards: 70\r\nFrom: {refusal.get('from')}\r\nTo: {refusal.get('to')}\r\n"
        f"Call-ID: {refusal.call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    core.receive(ack, Target("udp", SWITCH.host, SWITCH.port), 0.6)
    assert net.sent == []


def test_the_byte_level_refusal_is_a_well_formed_503_like_the_parsed_one() -> None:
    data = invite(branch="z9hG4bKbytes").replace(
        b"Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKbytes\r\n",
        b"Via: SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bKbytes;rport, SIP/2.0/TCP 10.0.0.1;branch=z9hG4bKx\r\n"
        b"v: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKy\r\n",
    )
    scanned = scan_invite(data, emergency_digits(("911", "+1933")))
    assert scanned is not None
    core, net = _overloaded_core()
    source = Target("udp", "10.0.0.77", 40000)
    while not net.sent:  # until the controller refuses one (it lets about 2 % through)
        core.receive(
            data.replace(b"z9hG4bKbytes", f"z9hG4bKb{len(net.sent)}{core.overload.refused}".encode()),
            source,
            0.5,
        )
        net.sent = [s for s in net.sent if b" 503 " in s[1][:20]]
    target, raw, _ = net.sent[0]
    assert (target.host, target.port) == ("10.0.0.77", 40000)  # rport: back to the source port
    resp = parse_message(raw, datagram=True)
    assert isinstance(resp, SipResponse) and resp.status == 503
    vias = resp.values("via")
    assert len(vias) == 3
    assert "received=10.0.0.77" in vias[0] and "rport=40000" in vias[0]
    assert vias[1].startswith("SIP/2.0/TCP 10.0.0.1") and vias[2].startswith("SIP/2.0/UDP 10.0.0.2")
    assert resp.to_tag == "t35t-ovl" and resp.get("retry-after") == "5"
    assert resp.call_id == "call-1@10.0.0.5" and resp.cseq == (1, "INVITE")


@pytest.mark.parametrize(
    "change",
    [
        (
            b"To: <sip:+15551234567@acme.sip.clearip.com>",
            b"To: <sip:+15551234567@acme.sip.clearip.com>;tag=x",
        ),
        (b";branch=z9hG4bKsw1", b";branch=old-2543"),
        (b"Max-Forwards: 70\r\n", b"Max-Forwards:\r\n 70\r\n"),  # folded
        (b"INVITE sip:+15551234567@", b"INVITE sip:911@"),  # maybe an emergency call
        (b"INVITE sip:+15551234567@", b"INVITE sip:%39%31%31@"),
        (b"CSeq: 1 INVITE", b"CSeq: 1 BYE"),
    ],
)
def test_unusual_invites_are_left_to_the_parsed_path(change: tuple[bytes, bytes]) -> None:
    assert scan_invite(invite(), emergency_digits(("911",))) is not None
    assert scan_invite(invite().replace(*change), emergency_digits(("911",))) is None
