"""RFC 3261 §17 timers on a fake clock: Timer B's 32 s run in microseconds."""

from __future__ import annotations

from proxy_runtime.sip.transaction import (
    ClientTransaction,
    Event,
    ServerTransaction,
    State,
    TimerSettings,
    Verdict,
)

T = TimerSettings()


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[float, bytes]] = []
        self.now = 0.0

    def __call__(self, data: bytes) -> None:
        self.sent.append((self.now, data))


def run_until(txn: ClientTransaction | ServerTransaction, wire: Wire, until: float) -> list[Event]:
    events = []
    while txn.deadline is not None and txn.deadline <= until:
        wire.now = txn.deadline
        ev = txn.on_timer(wire.now)
        if ev is not None:
            events.append(ev)
    wire.now = until
    return events


def test_invite_client_timer_a_doubles_and_timer_b_times_out_at_64_t1() -> None:
    wire = Wire()
    ct = ClientTransaction("k", b"INVITE", wire, invite=True, reliable=False, now=0.0)
    events = run_until(ct, wire, 40.0)
    times = [t for t, _ in wire.sent]
    # Sent at 0, then Timer A at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 (intervals double: 0.5, 1, 2, 4, 8, 16)
    assert times == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert events == [Event.TIMEOUT]
    assert ct.terminated


def test_invite_client_over_tcp_sends_once_and_times_out() -> None:
    wire = Wire()
    ct = ClientTransaction("k", b"INVITE", wire, invite=True, reliable=True, now=0.0)
    assert run_until(ct, wire, 40.0) == [Event.TIMEOUT]
    assert len(wire.sent) == 1


def test_provisional_stops_timer_a_and_b() -> None:
    wire = Wire()
    ct = ClientTransaction("k", b"INVITE", wire, invite=True, reliable=False, now=0.0)
    wire.now = 0.2
    assert ct.receive_response(object(), 180, 0.2) is Verdict.PASS
    assert ct.state is State.PROCEEDING
    assert ct.deadline is None
    assert run_until(ct, wire, 100.0) == []
    assert len(wire.sent) == 1


def test_non_2xx_final_is_acked_once_and_retransmissions_absorbed() -> None:
    wire = Wire()
    ct = ClientTransaction(
        "k", b"INVITE", wire, invite=True, reliable=False, now=0.0, build_ack=lambda r: b"ACK"
    )
    assert ct.receive_response(object(), 486, 0.1) is Verdict.PASS
    assert wire.sent[-1][1] == b"ACK"
    assert ct.state is State.COMPLETED
    # A retransmitted final is ACKed again but not passed up.
    assert ct.receive_response(object(), 486, 0.6) is Verdict.ABSORB
    assert [d for _, d in wire.sent].count(b"ACK") == 2
    # Timer D (32 s over UDP) then terminated, without reporting a timeout.
    assert run_until(ct, wire, 40.0) == []
    assert ct.terminated


def test_2xx_retransmissions_pass_up_in_accepted_state() -> None:
    wire = Wire()
    ct = ClientTransaction("k", b"INVITE", wire, invite=True, reliable=False, now=0.0)
    assert ct.receive_response(object(), 200, 0.1) is Verdict.PASS
    assert ct.state is State.ACCEPTED
    assert ct.receive_response(object(), 200, 0.6) is Verdict.PASS  # RFC 6026
    assert run_until(ct, wire, 40.0) == []
    assert ct.terminated


def test_non_invite_client_timer_e_caps_at_t2_and_f_times_out() -> None:
    wire = Wire()
    ct = ClientTransaction("k", b"BYE", wire, invite=False, reliable=False, now=0.0)
    events = run_until(ct, wire, 40.0)
    intervals = [b - a for (a, _), (b, _) in zip(wire.sent, wire.sent[1:], strict=False)]
    assert intervals[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(intervals) == T.t2
    assert events == [Event.TIMEOUT]


def test_non_invite_client_timer_k() -> None:
    wire = Wire()
    ct = ClientTransaction("k", b"BYE", wire, invite=False, reliable=False, now=0.0)
    assert ct.receive_response(object(), 200, 0.1) is Verdict.PASS
    assert ct.receive_response(object(), 200, 0.2) is Verdict.ABSORB
    assert run_until(ct, wire, 5.0) == []
    assert not ct.terminated
    run_until(ct, wire, 5.2)
    assert ct.terminated


def test_transport_error_is_reported_once() -> None:
    wire = Wire()
    ct = ClientTransaction("k", b"INVITE", wire, invite=True, reliable=True, now=0.0)
    assert ct.transport_error() is Event.TRANSPORT_ERROR
    assert ct.transport_error() is None


def test_invite_server_timer_g_retransmits_final_until_ack() -> None:
    wire = Wire()
    st = ServerTransaction("k", wire, invite=True, reliable=False)
    st.send_response(b"100", 100, 0.0)
    st.send_response(b"503", 503, 0.0)
    run_until(st, wire, 4.0)
    finals = [t for t, d in wire.sent if d == b"503"]
    assert finals == [0.0, 0.5, 1.5, 3.5]  # Timer G doubles up to T2
    assert st.receive_ack(4.0)
    assert st.state is State.CONFIRMED
    n = len(wire.sent)
    run_until(st, wire, 20.0)
    assert len(wire.sent) == n  # no more retransmissions after the ACK
    assert st.terminated  # Timer I (T4)


def test_invite_server_timer_h_reports_missing_ack() -> None:
    wire = Wire()
    st = ServerTransaction("k", wire, invite=True, reliable=False)
    st.send_response(b"486", 486, 0.0)
    assert run_until(st, wire, 40.0) == [Event.TIMEOUT]
    assert st.terminated


def test_invite_server_absorbs_retransmitted_request_with_last_response() -> None:
    wire = Wire()
    st = ServerTransaction("k", wire, invite=True, reliable=False)
    st.send_response(b"100", 100, 0.0)
    st.receive_request(0.5)
    assert [d for _, d in wire.sent] == [b"100", b"100"]
    st.send_response(b"200", 200, 1.0)
    assert st.state is State.ACCEPTED
    assert st.send_response(b"200", 200, 1.5)  # 2xx retransmission passes through
    assert not st.send_response(b"486", 486, 1.6)  # no non-2xx after a 2xx
    run_until(st, wire, 40.0)
    assert st.terminated  # Timer L


def test_non_invite_server_timer_j() -> None:
    wire = Wire()
    st = ServerTransaction("k", wire, invite=False, reliable=False)
    st.send_response(b"200", 200, 0.0)
    st.receive_request(1.0)
    assert [d for _, d in wire.sent] == [b"200", b"200"]
    run_until(st, wire, 31.0)
    assert not st.terminated
    run_until(st, wire, 33.0)
    assert st.terminated


def test_reliable_server_terminates_at_once_after_ack() -> None:
    wire = Wire()
    st = ServerTransaction("k", wire, invite=True, reliable=True)
    st.send_response(b"503", 503, 0.0)
    assert st.receive_ack(0.1)
    run_until(st, wire, 0.1)
    assert st.terminated
    assert len(wire.sent) == 1
