"""What a finished call leaves behind, and the calls' own timers (sans-I/O, fake clock).

A proxy under load holds every finished INVITE for RFC 6026's 64*T1 (32 s) to absorb
retransmissions; what it holds then decides its memory. These tests pin down that only the
transactions stay (the call, its requests and Identity headers are freed at once), that they still
do their job (2xx retransmissions relayed, INVITE retransmissions absorbed), and that the call
timers (`timeout`, ring limit) leave nothing behind when stopped, also across a reload and a clock
that goes back.
"""

from __future__ import annotations

import gc
from dataclasses import replace

from proxy_runtime.core.call import Call
from proxy_runtime.core.proxy import ProxyCore, Target
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.transaction import ClientTransaction
from tests.unit.test_proxy_core import (
    CARRIER_B,
    SWITCH,
    Net,
    advance_to_carrier,
    clearip_reply,
    invite,
    make_core,
    redirect,
    response_to,
    to_clearip,
)

CARRIER = Target("udp", *CARRIER_B)


def live_calls() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Call)


def answer(core: ProxyCore, net: Net, fwd: SipRequest, now: float) -> bytes:
    core.receive(response_to(fwd, 180, "Ringing"), CARRIER, now)
    ok = response_to(fwd, 200, "OK", f"Contact: <sip:b@{CARRIER_B[0]}:{CARRIER_B[1]}>\r\n")
    core.receive(ok, CARRIER, now + 0.5)
    return ok


def test_an_answered_call_is_freed_at_once_and_its_transactions_still_work() -> None:
    core, net = make_core()
    assert live_calls() == 0
    _, fwd = advance_to_carrier(core, net)
    assert live_calls() == 1
    ok = answer(core, net, fwd, 0.1)
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [180, 200]
    # Only the transactions remain (they wait 64*T1); the call and its requests are gone.
    assert live_calls() == 0
    assert core.table_sizes()["server_transactions"] == 1
    # The carrier retransmits its 2xx (it has not seen the ACK yet): it reaches the switch, and the
    # carrier is never sent ACK + BYE as if the answer were a stray one.
    core.receive(ok, CARRIER, 1.1)
    core.receive(ok, CARRIER, 2.1)
    out = net.take()
    assert [m.status for t, m in out if t == SWITCH and isinstance(m, SipResponse)] == [200, 200]
    assert not [m for _, m in out if isinstance(m, SipRequest)]
    # The switch retransmits its INVITE: absorbed, nothing goes to ClearIP or the carrier.
    core.receive(invite(), SWITCH, 2.2)
    assert not [m for _, m in net.take() if isinstance(m, SipRequest)]
    # After 64*T1 everything is gone, including every timer entry.
    core.handle_timer(40.0)
    assert core.table_sizes() == {"calls": 0, "server_transactions": 0, "client_transactions": 0, "timers": 0}


def test_the_transactions_left_hold_none_of_the_calls_requests() -> None:
    """The transactions that wait out their timers after a call (ClearIP's, the carrier's, the
    switch's) hold bytes to retransmit, never the parsed requests with their Identity headers.
    Under the compiled build a closure as ``transmit`` kept the whole forwarded INVITE alive with
    its client transaction (mypyc closures keep their enclosing function's variables): 336 MB
    instead of 146 MB after 40,000 calls at 1,000 calls/s."""
    core, net = make_core()
    req, fwd = advance_to_carrier(core, net)
    answer(core, net, fwd, 0.1)
    net.take()
    del req, fwd
    sizes = core.table_sizes()
    assert sizes["client_transactions"] >= 1 and sizes["server_transactions"] >= 1  # still waiting
    gc.collect()
    # (the overload refusal path keeps one empty placeholder request for its whole life)
    assert [o for o in gc.get_objects() if type(o) is SipRequest and o.uri] == []


def test_failed_and_cancelled_calls_are_freed_once_their_branches_have_a_final() -> None:
    core, net = make_core()
    _, fwd = advance_to_carrier(core, net)
    core.receive(response_to(fwd, 486, "Busy Here"), CARRIER, 0.2)  # 486: advance to the next Contact
    second = next(m for t, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
    core.receive(response_to(second, 603, "Decline"), Target("udp", second.uri.split("@")[1], 5060), 0.3)
    assert [m.status for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse)] == [603]
    assert live_calls() == 0

    # Cancelled while ringing: the call lives until the carrier's 487 ends the branch.
    core, net = make_core()
    _, fwd = advance_to_carrier(core, net)
    core.receive(response_to(fwd, 180, "Ringing"), CARRIER, 0.1)
    cancel = invite().replace(b"INVITE sip:", b"CANCEL sip:", 1).replace(b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL")
    core.receive(cancel.split(b"Content-Type")[0] + b"Content-Length: 0\r\n\r\n", SWITCH, 0.2)
    out = net.take()
    assert sorted(m.status for t, m in out if t == SWITCH and isinstance(m, SipResponse)) == [180, 200, 487]
    assert [m.method for _, m in out if isinstance(m, SipRequest)] == ["CANCEL"]
    assert live_calls() == 1  # its branch may still answer (then it is hung up)
    core.receive(response_to(fwd, 487, "Request Terminated"), CARRIER, 0.3)
    assert live_calls() == 0


def test_ringing_then_answered_calls_leave_no_ring_limit_timer_behind() -> None:
    """The ring limit (180 s) is stopped by the answer; it must not linger as a stale timer entry
    (at 300 calls/s those pinned memory for 180 s)."""
    core, net = make_core()
    for i in range(50):
        t = float(i)
        data = invite(branch=f"z9hG4bKsw{i}").replace(b"call-1@", f"c{i}@".encode())
        clearip_reply(core, redirect(to_clearip(core, net, t, data)), t + 0.01)
        fwd = next(m for t_, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
        answer(core, net, fwd, t + 0.002)
        assert [m.status for t_, m in net.take() if t_ == SWITCH and isinstance(m, SipResponse)] == [180, 200]
    assert live_calls() == 0
    core.handle_timer(83.0)  # past 64*T1 after the last answer: the transactions end
    assert core.table_sizes() == {"calls": 0, "server_transactions": 0, "client_transactions": 0, "timers": 0}


def test_ring_limit_still_fires_and_cancels_the_branch() -> None:
    core, net = make_core(ring_timeout=30.0)
    _, fwd = advance_to_carrier(core, net)
    core.receive(response_to(fwd, 180, "Ringing"), CARRIER, 0.1)
    net.take()
    assert core.next_deadline() is not None
    core.handle_timer(30.0)
    assert not [m for t, m in net.take() if t == SWITCH]  # 30.0 < 0.1 + 30
    core.handle_timer(30.2)
    out = net.take()
    assert [m.status for t, m in out if t == SWITCH and isinstance(m, SipResponse)] == [408]
    assert [m.method for t, m in out if isinstance(m, SipRequest)] == ["CANCEL"]


def test_call_timeouts_keep_their_order_across_a_reload_and_a_clock_that_goes_back() -> None:
    core, net = make_core()  # timeout 5 s
    to_clearip(core, net, 10.0, invite(branch="z9hG4bKa").replace(b"call-1@", b"a@"))  # due 15
    core.update_settings(replace(core.settings, timeout=2.0))
    to_clearip(core, net, 11.0, invite(branch="z9hG4bKb").replace(b"call-1@", b"b@"))  # due 13
    to_clearip(core, net, 4.0, invite(branch="z9hG4bKc").replace(b"call-1@", b"c@"))  # clock back: due 6
    assert core.next_deadline() == 6.0

    answered: set[str] = set()

    def finals(now: float) -> list[str]:
        core.handle_timer(now)
        got = {
            m.call_id for t, m in net.take() if t == SWITCH and isinstance(m, SipResponse) and m.status == 503
        }
        new = sorted(got - answered)  # not the 503s' retransmissions (UDP, Timer G)
        answered.update(got)
        return new

    assert finals(5.9) == []
    assert finals(6.0) == ["c@10.0.0.5"]
    assert finals(12.9) == []
    assert finals(13.0) == ["b@10.0.0.5"]
    assert finals(15.0) == ["a@10.0.0.5"]
    assert core.in_flight == 0


def test_a_clearip_transaction_ended_by_its_302_keeps_nothing_while_its_timer_b_entry_waits() -> None:
    """ClearIP is reached over TCP or TLS, so its 302 ends the INVITE client transaction at once
    (Timer D = 0) while the heap still holds its Timer B entry, strongly, for 64*T1 (32 s). The
    transaction must hold none of its bytes then: at 1,000 calls/s that is 32,000 of them."""
    core, net = make_core()
    for i in range(50):
        t = i * 0.01
        data = invite(branch=f"z9hG4bKsw{i}").replace(b"call-1@", f"c{i}@".encode())
        clearip_reply(core, redirect(to_clearip(core, net, t, data)), t + 0.005)
        core.handle_timer(t + 0.006)  # Timer D (0 over TCP): the ClearIP transaction ends
        fwd = next(m for t_, m in net.take() if isinstance(m, SipRequest) and m.method == "INVITE")
        answer(core, net, fwd, t + 0.007)
        net.take()
    gc.collect()
    in_table = {id(ct) for ct in core._txns.client.values()}
    dropped = [o for o in gc.get_objects() if type(o) is ClientTransaction and id(o) not in in_table]
    assert len(dropped) == 50  # the ClearIP legs, held by their stale Timer B entries
    # What a dropped transaction would otherwise pin: the INVITE sent to ClearIP, the ACK for its
    # 302, the request (through build_ack) and its destination (through transmit).
    assert all(o._data == b"" and o._ack is None and o._build_ack is None for o in dropped)
    assert all(o.owner is None and o.deadline is None and o.terminated for o in dropped)
    core.handle_timer(40.0)
    assert core.table_sizes() == {"calls": 0, "server_transactions": 0, "client_transactions": 0, "timers": 0}
