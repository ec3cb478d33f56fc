"""The core around a ClearIP outage, on a fake clock: a call held for the link (the need-link
action, bounded), and the brownout breaker wired into calls (503 at once, probes, the gauge)."""

from __future__ import annotations

from dataclasses import replace

from proxy_runtime.core.proxy import CLEARIP, ProxyCore, Target
from proxy_runtime.metrics import names
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.settings import load
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message

SWITCH = Target("udp", "10.0.0.5", 5060)
CIP = Target(CLEARIP, "127.0.0.1", 5061, 1)


class Net:
    def __init__(self) -> None:
        self.sent: list[tuple[Target, bytes]] = []

    def __call__(self, target: Target, data: bytes, key: object) -> None:
        self.sent.append((target, data))

    def take(self) -> list[tuple[Target, SipRequest | SipResponse]]:
        out = [(t, parse_message(d, datagram=False)) for t, d in self.sent]
        self.sent.clear()
        return out  # type: ignore[return-value]

    def finals(self) -> list[SipResponse]:
        return [m for t, m in self.take() if t == SWITCH and isinstance(m, SipResponse) and m.status >= 200]


class Link:
    """The adapter's side of the need-link action: counts the connects asked for."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self) -> None:
        self.asked += 1


def make_core(
    *, up: bool = True, link: Link | None = None, recorder: MetricsRecorder | None = None, **overrides: object
) -> tuple[ProxyCore, Net]:
    s = load(environ={}, overrides={"allow": ["10.0.0.0/8"], "timeout": 5})
    s = replace(s, **overrides)  # type: ignore[arg-type]
    net = Net()
    core = ProxyCore(
        s,
        net,
        advertise="203.0.113.7",
        ports={"udp": 5060},
        instance="0ut4",
        recorder=recorder,
        need_link=link,
    )
    if up:
        core.set_clearip_up(True, 0.0)
    return core, net


def invite(i: int, number: str = "+15551230000") -> bytes:
    return (
        f"INVITE sip:{number}@acme.sip.clearip.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKo{i}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:+12125550100@10.0.0.5>;tag=f{i}\r\nTo: <sip:{number}@acme.sip.clearip.com>\r\n"
        f"Call-ID: outage-{i}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def cancel(i: int) -> bytes:
    return (
        f"CANCEL sip:+15551230000@acme.sip.clearip.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKo{i}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:+12125550100@10.0.0.5>;tag=f{i}\r\nTo: <sip:+15551230000@acme.sip.clearip.com>\r\n"
        f"Call-ID: outage-{i}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def answer(req: SipRequest, status: int) -> bytes:
    vias = "".join(f"Via: {v}\r\n" for v in req.values("via"))
    return (
        f"SIP/2.0 {status} X\r\n{vias}From: {req.get('from')}\r\nTo: {req.get('to')};tag=cip\r\n"
        f"Call-ID: {req.call_id}\r\nCSeq: {req.get('cseq')}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def to_clearip(net: Net) -> list[SipRequest]:
    return [m for t, m in net.take() if t.transport == CLEARIP and isinstance(m, SipRequest)]


def reason(resp: SipResponse) -> str:
    return resp.get("reason") or ""


# ---------------------------------------------------------------------------------------------
# Held for the link
# ---------------------------------------------------------------------------------------------


def test_a_call_that_finds_the_link_down_asks_for_it_and_is_sent_when_it_comes_up() -> None:
    link = Link()
    core, net = make_core(up=False, link=link)
    core.receive(invite(1), SWITCH, 10.0)
    core.receive(invite(2), SWITCH, 10.1)
    assert [m.status for _, m in net.take() if isinstance(m, SipResponse)] == [100, 100]  # held
    assert link.asked == 2  # each call asks; the adapter makes one attempt at a time
    assert core.next_deadline() == 10.0 + core.settings.link_wait
    core.set_clearip_up(True, 10.2)
    sent = to_clearip(net)
    assert [r.call_id for r in sent] == ["outage-1", "outage-2"]
    # The ClearIP timeout runs from the moment the INVITE went, not from the call's arrival.
    core.handle_timer(10.2 + 4.9)
    assert net.finals() == []
    core.receive(answer(sent[0], 404), CIP, 15.15)
    assert [f.status for f in net.finals()] == [404]


def test_a_refused_connect_answers_the_held_calls_at_once() -> None:
    link = Link()
    core, net = make_core(up=False, link=link)
    core.receive(invite(1), SWITCH, 0.0)
    net.take()
    core.clearip_unreachable(0.001, "ConnectionRefusedError")
    finals = net.finals()
    assert [f.status for f in finals] == [503] and "ClearIP unreachable" in reason(finals[0])
    core.set_clearip_up(True, 0.002)
    assert to_clearip(net) == []  # answered calls never go to ClearIP
    assert core.table_sizes()["calls"] == 0


def test_the_wait_for_the_link_is_bounded() -> None:
    link = Link()
    core, net = make_core(up=False, link=link, clearip_connect_wait=0.4)
    core.receive(invite(1), SWITCH, 0.0)
    net.take()
    core.handle_timer(0.39)
    assert net.finals() == []
    core.handle_timer(0.4)
    finals = net.finals()
    assert [f.status for f in finals] == [503]
    assert "no connection within 0.4 s" in reason(finals[0])


def test_a_held_call_cancelled_by_the_caller_gets_487_and_never_reaches_clearip() -> None:
    core, net = make_core(up=False, link=Link())
    core.receive(invite(1), SWITCH, 0.0)
    net.take()
    core.receive(cancel(1), SWITCH, 0.1)
    statuses = sorted(m.status for t, m in net.take() if isinstance(m, SipResponse))
    assert statuses == [200, 487]
    core.set_clearip_up(True, 0.2)
    assert to_clearip(net) == []


def test_without_an_adapter_that_can_connect_the_call_gets_503_at_once() -> None:
    core, net = make_core(up=False, link=None)
    core.receive(invite(1), SWITCH, 0.0)
    finals = net.finals()
    assert [f.status for f in finals] == [503] and "unreachable" in reason(finals[0])


# ---------------------------------------------------------------------------------------------
# The breaker, wired
# ---------------------------------------------------------------------------------------------


def _breaker_core(recorder: MetricsRecorder | None = None) -> tuple[ProxyCore, Net]:
    return make_core(
        recorder=recorder,
        breaker_threshold=3,
        breaker_window=30.0,
        breaker_cool_off=10.0,
        breaker_probe_every=2,
    )


def _time_out_three(core: ProxyCore, net: Net) -> float:
    for i in range(3):
        core.receive(invite(i), SWITCH, float(i) * 0.1)
    assert len(to_clearip(net)) == 3
    core.handle_timer(5.2)  # timeout = 5 s: all three time out (the third opens the breaker)
    finals = net.finals()
    assert [f.status for f in finals] == [503] * 3
    assert all("did not answer" in reason(f) for f in finals)
    return 5.2


def _gauge_max(rec: MetricsRecorder, at: float) -> float:
    return rec.close_interval(at).gauges[names.CLEARIP_BREAKER_OPEN].maximum


def test_breaker_opens_after_timeouts_and_answers_503_at_once_without_asking_clearip() -> None:
    rec = MetricsRecorder(proxy_id="t")
    core, net = _breaker_core(rec)
    assert _gauge_max(rec, 0.0) == 0.0
    now = _time_out_three(core, net)
    core.receive(invite(10), SWITCH, now + 0.01)
    out = net.take()
    assert not [m for t, m in out if t.transport == CLEARIP]
    finals = [m for _, m in out if isinstance(m, SipResponse) and m.status >= 200]
    assert [f.status for f in finals] == [503]
    assert "breaker open" in reason(finals[0])
    iv = rec.close_interval(now + 1)
    assert iv.gauges[names.CLEARIP_BREAKER_OPEN].maximum == 1.0
    assert iv.count(names.CLEARIP_BREAKER_REJECTED) == 1


def test_breaker_probe_after_cool_off_and_the_first_answer_closes_it() -> None:
    rec = MetricsRecorder(proxy_id="t")
    core, net = _breaker_core(rec)
    now = _time_out_three(core, net)
    rec.close_interval(now)
    t = now + 10.0  # cool-off over: half-open, one call in 2 is a probe
    core.receive(invite(20), SWITCH, t)
    core.receive(invite(21), SWITCH, t + 0.01)
    out = net.take()
    probes = [m for tgt, m in out if tgt.transport == CLEARIP and isinstance(m, SipRequest)]
    assert [p.call_id for p in probes] == ["outage-20"]
    rejected = [m for _, m in out if isinstance(m, SipResponse) and m.status >= 200]
    assert [(r.call_id, r.status) for r in rejected] == [("outage-21", 503)]
    core.receive(answer(probes[0], 503), CIP, t + 0.2)  # any final is an answer: ClearIP is back
    assert [f.status for f in net.finals()] == [503]
    core.receive(invite(22), SWITCH, t + 0.3)
    assert [r.call_id for r in to_clearip(net)] == ["outage-22"]
    iv = rec.close_interval(t + 1)
    assert iv.gauges[names.CLEARIP_BREAKER_OPEN].maximum == 1.0  # open, then half-open ...
    assert iv.gauges[names.CLEARIP_BREAKER_OPEN].last == 0.0  # ... then closed
    assert _gauge_max(rec, t + 2) == 0.0


def test_breaker_probe_timeout_reopens_it() -> None:
    core, net = _breaker_core()
    now = _time_out_three(core, net)
    t = now + 10.0
    core.receive(invite(30), SWITCH, t)
    assert len(to_clearip(net)) == 1
    core.handle_timer(t + 5.0)  # the probe times out (the other 503s: retransmissions, no ACK)
    assert {(f.call_id, f.status) for f in net.finals()} == {
        ("outage-30", 503),
        *((f"outage-{i}", 503) for i in range(3)),
    }
    core.receive(invite(31), SWITCH, t + 5.1)  # reopened: rejected at once, no probe
    assert to_clearip(net) == []
    core.receive(invite(32), SWITCH, t + 15.1)  # the next cool-off is over: a probe again
    assert [r.call_id for r in to_clearip(net)] == ["outage-32"]


def test_breaker_leaves_emergency_calls_alone() -> None:
    core, net = _breaker_core()
    now = _time_out_three(core, net)
    core.receive(invite(40, number="911"), SWITCH, now + 0.1)
    finals = net.finals()
    assert [f.status for f in finals] == [503]
    assert "emergency" in reason(finals[0]) and "breaker" not in reason(finals[0])


def test_breaker_reload_turning_it_off_closes_it() -> None:
    rec = MetricsRecorder(proxy_id="t")
    core, net = _breaker_core(rec)
    now = _time_out_three(core, net)
    core.update_settings(replace(core.settings, breaker_threshold=0))
    core.receive(invite(50), SWITCH, now + 0.1)
    assert [r.call_id for r in to_clearip(net)] == ["outage-50"]
    iv = rec.close_interval(now + 1)
    assert iv.gauges[names.CLEARIP_BREAKER_OPEN].last == 0.0


def test_breaker_counts_a_silent_clearip_behind_calls_the_switch_cancels_first() -> None:
    """A switch whose own post-dial timer (4 s) is shorter than ``timeout`` (5 s) CANCELs every call
    while ClearIP is silent: each caller has its 487, but ClearIP did not answer the INVITE (no
    CANCEL went: ClearIP sent no provisional), so each still counts as a ClearIP timeout (at the
    INVITE's ``timeout``) and the breaker opens; ClearIP's final, when it does answer, counts as
    an answer."""
    core, net = _breaker_core()
    for i in range(3):
        core.receive(invite(i), SWITCH, float(i) * 0.1)
    assert len(to_clearip(net)) == 3
    for i in range(3):
        core.receive(cancel(i), SWITCH, 4.0 + i * 0.1)
    out = net.take()
    statuses = sorted(m.status for t, m in out if t == SWITCH and isinstance(m, SipResponse))
    assert statuses == [200, 200, 200, 487, 487, 487]
    # ClearIP sent no provisional: no CANCEL goes to it (RFC 3261 §9.1).
    assert [m for t, m in out if t.transport == CLEARIP and isinstance(m, SipRequest)] == []
    core.handle_timer(5.3)  # the INVITEs' `timeout` has passed without a word from ClearIP
    net.take()
    core.receive(invite(10), SWITCH, 5.4)
    out = net.take()
    assert not [m for t, m in out if t.transport == CLEARIP], "breaker should be open"
    finals = [m for _, m in out if isinstance(m, SipResponse) and m.status >= 200]
    assert [f.status for f in finals] == [503] and "breaker open" in reason(finals[0])


def test_clearip_answering_a_cancelled_call_is_an_answer_for_the_breaker() -> None:
    """Two timeouts, then ClearIP answers (487) a call the caller cancelled: the count starts again,
    so one more timeout does not open the breaker, and the answered call is not counted later."""
    core, net = _breaker_core()
    core.receive(invite(0), SWITCH, 0.0)
    core.receive(invite(1), SWITCH, 0.1)
    core.handle_timer(5.2)  # two timeouts
    core.receive(invite(2), SWITCH, 5.3)
    core.receive(invite(3), SWITCH, 5.4)
    sent = {r.call_id: r for r in to_clearip(net) if r.method == "INVITE"}
    core.receive(cancel(2), SWITCH, 6.0)
    core.receive(answer(sent["outage-2"], 487), CIP, 6.1)  # ClearIP is alive: it ended the call
    net.take()
    core.handle_timer(10.5)  # call 3 times out: one timeout since the answer
    net.take()
    core.receive(invite(4), SWITCH, 10.6)
    assert [r.call_id for r in to_clearip(net)] == ["outage-4"]
