"""Hostile and random traffic into :class:`ProxyCore` on a fake clock (issue 7).

- Hypothesis drives random sequences of switch requests (INVITE, retransmissions, CANCEL, ACK),
  ClearIP and carrier responses (and their retransmissions), transport errors, ClearIP up/down,
  garbage and clock jumps. Properties: no exception escapes; every INVITE the core accepted gets
  exactly one final response (retransmissions of it aside; a 2xx is never followed by a non-2xx);
  after the timers run out every table is empty (no leaked transaction, call or timer).
- Core-level hostile cases: unknown CANCEL/ACK, BYE without dialog, Max-Forwards 0, forged Via,
  malformed requests and responses, untrusted sources (counted, never answered).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy_runtime.core.proxy import CLEARIP, ProxyCore, Target
from proxy_runtime.metrics.names import MALFORMED_MESSAGES, UNTRUSTED_DROPPED
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.settings import load
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message

SWITCH = Target("udp", "10.0.0.5", 5060)
SWITCH_TCP = Target("tcp", "10.0.0.5", 40000, 7)
CIP = Target(CLEARIP, "127.0.0.1", 5061, 1)
CARRIER_A = ("192.0.2.10", 5060)
CARRIER_B = ("198.51.100.20", 5080)
STRANGER = Target("udp", "203.0.113.99", 5060)


class Net:
    def __init__(self) -> None:
        self.sent: list[tuple[Target, bytes, object]] = []

    def __call__(self, target: Target, data: bytes, key: object) -> None:
        self.sent.append((target, data, key))

    def take(self) -> list[tuple[Target, SipRequest | SipResponse, object]]:
        out = [(t, parse_message(d, datagram=False), k) for t, d, k in self.sent]
        self.sent.clear()
        return out  # type: ignore[return-value]


def make_core(recorder: MetricsRecorder | None = None, **overrides: object) -> tuple[ProxyCore, Net]:
    s = load(
        environ={},
        overrides={
            "allow": ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24"],
            "timeout": 5,
            "ring_timeout": 20,
        },
    )
    if overrides:
        s = replace(s, **overrides)  # type: ignore[arg-type]
    net = Net()
    core = ProxyCore(
        s, net, advertise="203.0.113.7", ports={"udp": 5060, "tcp": 5060}, instance="f422", recorder=recorder
    )
    core.set_clearip_up(True, 0.0)
    return core, net


def invite(i: int, *, transport: str = "UDP", port: int = 5060, mf: int = 70, extra: str = "") -> bytes:
    head = (
        f"INVITE sip:+1555123{i:04d}@acme.sip.clearip.com SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 10.0.0.5:{port};branch=z9hG4bKsw{i}\r\n"
        f"Max-Forwards: {mf}\r\n"
        f"From: <sip:+12125550100@10.0.0.5>;tag=f{i}\r\n"
        f"To: <sip:+1555123{i:04d}@acme.sip.clearip.com>\r\n"
        f"Call-ID: call-{i}@10.0.0.5\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:sw@10.0.0.5:5060>\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    )
    return head.encode()


def request(
    method: str, i: int, *, to_tag: str = "", branch: str | None = None, ruri: str = "", mf: int = 70
) -> bytes:
    ruri = ruri or f"sip:+1555123{i:04d}@acme.sip.clearip.com"
    tt = f";tag={to_tag}" if to_tag else ""
    seq = 1 if method in ("CANCEL", "ACK") else 2
    return (
        f"{method} {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.5:5060;branch={branch or f'z9hG4bKsw{i}'}\r\n"
        f"Max-Forwards: {mf}\r\n"
        f"From: <sip:+12125550100@10.0.0.5>;tag=f{i}\r\n"
        f"To: <sip:+1555123{i:04d}@acme.sip.clearip.com>{tt}\r\n"
        f"Call-ID: call-{i}@10.0.0.5\r\n"
        f"CSeq: {seq} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def response_to(req: SipRequest, status: int, extra: str = "", to_tag: str = "far") -> bytes:
    vias = "".join(f"Via: {v}\r\n" for v in req.values("via"))
    to = req.get("to") or ""
    if status > 100 and ";tag=" not in to:
        to += f";tag={to_tag}"
    return (
        f"SIP/2.0 {status} Whatever\r\n{vias}From: {req.get('from')}\r\nTo: {to}\r\n"
        f"Call-ID: {req.call_id}\r\nCSeq: {req.get('cseq')}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


CONTACTS = (
    f"Contact: <sip:+15551234567@{CARRIER_A[0]}>;q=0.5, "
    f"<sip:+15551234567@{CARRIER_B[0]}:{CARRIER_B[1]};transport=tcp>;q=0.9\r\n"
)


def finals_to_switch(sent: list[tuple[Target, SipRequest | SipResponse, object]]) -> list[SipResponse]:
    return [
        m
        for t, m, _ in sent
        if isinstance(m, SipResponse) and t.host == "10.0.0.5" and m.status >= 200 and m.cseq[1] == "INVITE"
    ]


# =============================================================================================
# The fuzz
# =============================================================================================

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "invite",
                "invite",
                "retransmit",
                "cancel",
                "ack",
                "clearip",
                "clearip",
                "carrier",
                "carrier",
                "carrier_retransmit",
                "transport_error",
                "clearip_down",
                "clearip_up",
                "garbage",
                "bye",
                "tick",
                "tick",
            ]
        ),
        st.integers(0, 1000),
        st.sampled_from([100, 180, 183, 200, 302, 403, 404, 408, 480, 486, 500, 503, 603]),
        st.floats(0.0, 8.0),
    ),
    max_size=60,
)


class World:
    """The fuzz's view of the network: what the core sent, what it is waiting for."""

    def __init__(self) -> None:
        self.core, self.net = make_core()
        self.now = 0.0
        self.invites: list[int] = []
        self.accepted: set[str] = set()  # Call-IDs the core answered 100 Trying
        self.tryings: dict[str, int] = {}  # 100 Trying sent per Call-ID (>= transactions accepted)
        self.finals: dict[str, list[SipResponse]] = {}
        self.to_clearip: list[SipRequest] = []  # INVITEs sent to ClearIP
        self.to_carrier: list[tuple[SipRequest, Target]] = []
        self.responses: list[tuple[bytes, Target]] = []  # every response injected (to retransmit)
        self.keys: list[object] = []

    def collect(self) -> None:
        for target, msg, key in self.net.take():
            if key is not None:
                self.keys.append(key)
            if isinstance(msg, SipResponse):
                if target.host == "10.0.0.5" and msg.cseq[1] == "INVITE":
                    if msg.status == 100:
                        self.accepted.add(msg.call_id)
                        self.tryings[msg.call_id] = self.tryings.get(msg.call_id, 0) + 1
                    elif msg.status >= 200:
                        self.finals.setdefault(msg.call_id, []).append(msg)
                continue
            if msg.method != "INVITE":
                continue
            if target.transport == CLEARIP:
                self.to_clearip.append(msg)
            else:
                self.to_carrier.append((msg, target))

    def step(self, action: str, n: int, status: int, dt: float) -> None:
        core = self.core
        if action == "invite":
            i = len(self.invites)
            self.invites.append(i)
            tcp = n % 3 == 0
            core.receive(
                invite(i, transport="TCP" if tcp else "UDP"), SWITCH_TCP if tcp else SWITCH, self.now
            )
        elif action == "retransmit" and self.invites:
            i = self.invites[n % len(self.invites)]
            core.receive(invite(i), SWITCH, self.now)
        elif action == "cancel" and self.invites:
            core.receive(request("CANCEL", self.invites[n % len(self.invites)]), SWITCH, self.now)
        elif action == "ack" and self.invites:
            core.receive(request("ACK", self.invites[n % len(self.invites)], to_tag="f422"), SWITCH, self.now)
        elif action == "bye" and self.invites:
            i = self.invites[n % len(self.invites)]
            core.receive(request("BYE", i, to_tag="far", branch=f"z9hG4bKbye{n}"), SWITCH, self.now)
        elif action == "clearip" and self.to_clearip:
            req = self.to_clearip[n % len(self.to_clearip)]
            data = response_to(req, status, CONTACTS if status == 302 else "", to_tag="cip")
            self.responses.append((data, CIP))
            core.receive(data, CIP, self.now)
        elif action == "carrier" and self.to_carrier:
            req, target = self.to_carrier[n % len(self.to_carrier)]
            status = 302 if status == 302 else status
            extra = "Contact: <sip:callee@192.0.2.10>\r\n" if 200 <= status < 300 else ""
            data = response_to(req, status, extra)
            src = Target(target.transport, target.host, target.port, 3 if target.reliable else 0)
            self.responses.append((data, src))
            core.receive(data, src, self.now)
        elif action == "carrier_retransmit" and self.responses:
            data, src = self.responses[n % len(self.responses)]
            core.receive(data, src, self.now)
        elif action == "transport_error" and self.keys:
            core.transport_error(self.keys[n % len(self.keys)], self.now)
        elif action == "clearip_down":
            core.set_clearip_up(False, self.now)
        elif action == "clearip_up":
            core.set_clearip_up(True, self.now)
        elif action == "garbage":
            junk = [
                b"\x00\xff" * (n % 50),
                b"SIP/2.0 200 OK\r\n\r\n",
                b"INVITE x SIP/2.0\r\nVia: nonsense\r\n\r\n",
            ]
            core.receive(junk[n % 3], SWITCH, self.now)
        elif action == "tick":
            self.now += dt
            core.handle_timer(self.now)
        self.collect()

    def finish(self) -> None:
        """Let every timer run out (ring timeout, Timer C/B/H/J/K...)."""
        self.core.set_clearip_up(True, self.now)
        for _ in range(200_000):
            d = self.core.next_deadline()
            if d is None:
                break
            self.now = max(self.now, d)
            self.core.handle_timer(self.now)
            self.collect()


def check(world: World) -> None:
    """Every accepted INVITE got a final; no transaction got two different finals.

    An INVITE with the same branch arriving after its transaction ended (e.g. over TCP, where
    Timer I is 0, or after an ACK) is a new transaction and may get a final of its own: so the
    number of changes of final status per Call-ID is bounded by the transactions the core
    accepted (each sends 100 Trying), and a 2xx is never followed by a non-2xx in one transaction.
    """
    core = world.core
    for call_id in world.accepted:
        finals = world.finals.get(call_id, [])
        assert finals, f"{call_id}: accepted but never answered"
        statuses = [m.status for m in finals]
        changes = 1 + sum(1 for a, b in itertools.pairwise(statuses) if a != b)
        assert changes <= world.tryings[call_id], (
            f"{call_id}: finals {statuses}, {world.tryings[call_id]} accepted"
        )
        if world.tryings[call_id] == 1:
            non2xx = {st for st in statuses if st >= 300}
            assert len(non2xx) <= 1, f"{call_id}: several different final responses {statuses}"
            if 200 <= statuses[0] < 300:
                assert not non2xx, f"{call_id}: a non-2xx final after a 2xx: {statuses}"
    assert core.in_flight == 0
    sizes = core.table_sizes()
    assert sizes == {"calls": 0, "server_transactions": 0, "client_transactions": 0, "timers": 0}, sizes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS)
def test_fuzz_core_every_accepted_invite_ends_once_and_tables_drain(
    actions: list[tuple[str, int, int, float]],
) -> None:
    world = World()
    for action in actions:
        world.step(*action)
    world.finish()
    check(world)


def test_fuzz_world_happy_path_sanity() -> None:
    """The fuzz's own plumbing reaches the carrier and back (so the fuzz explores real flows)."""
    world = World()
    for action in [
        ("invite", 1, 0, 0.0),
        ("clearip", 0, 302, 0.0),
        ("carrier", 0, 180, 0.0),
        ("carrier", 0, 200, 0.0),
    ]:
        world.step(*action)
    assert world.to_carrier
    assert [m.status for m in world.finals["call-0@10.0.0.5"]] == [200]
    world.finish()
    check(world)


# =============================================================================================
# Tables drain after many calls (the unit half of the memory check)
# =============================================================================================


def test_two_thousand_calls_leave_empty_tables_after_the_timers() -> None:
    world = World()
    for i in range(2000):
        world.step("invite", 1, 0, 0.0)
        world.step("clearip", len(world.to_clearip) - 1, 302, 0.0)
        world.step("carrier", len(world.to_carrier) - 1, 180, 0.0)
        world.step("carrier", len(world.to_carrier) - 1, 200 if i % 4 else 486, 0.0)
        world.step("ack", i, 0, 0.0)
        world.step("bye", i, 0, 0.0)
        world.step("tick", 0, 0, 0.01)
    peak = world.core.table_sizes()
    assert peak["server_transactions"] > 1000  # they were alive (Timers J/K/H keep them 32 s)
    world.finish()
    check(world)


# =============================================================================================
# Core-level hostile cases
# =============================================================================================


def sent_statuses(net: Net) -> list[int]:
    return [m.status for _, m, _ in net.take() if isinstance(m, SipResponse)]


def test_cancel_for_unknown_transaction_gets_481() -> None:
    core, net = make_core()
    core.receive(request("CANCEL", 9), SWITCH, 0.0)
    assert sent_statuses(net) == [481]


def test_ack_for_unknown_transaction_is_dropped_silently() -> None:
    core, net = make_core()
    core.receive(request("ACK", 9, ruri="sip:203.0.113.7:5060"), SWITCH, 0.0)
    core.receive(request("ACK", 9, to_tag="x", ruri="sip:203.0.113.7:5060"), SWITCH, 0.0)
    assert net.sent == []


def test_bye_without_dialog_gets_481() -> None:
    core, net = make_core()
    core.receive(request("BYE", 9, branch="z9hG4bKb1"), SWITCH, 0.0)  # no To tag
    core.receive(request("BYE", 9, to_tag="x", branch="z9hG4bKb2", ruri="sip:203.0.113.7:5060"), SWITCH, 0.0)
    assert sent_statuses(net) == [481, 481]


def test_max_forwards_zero_gets_483_and_never_reaches_clearip() -> None:
    core, net = make_core()
    core.receive(invite(1, mf=0), SWITCH, 0.0)
    out = net.take()
    assert [m.status for _, m, _ in out if isinstance(m, SipResponse)] == [483]
    assert not any(t.transport == CLEARIP for t, _, _ in out)


TAIL = (
    b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: call-1@10.0.0.5\r\n"
    b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)


def test_forged_via_responses_are_dropped() -> None:
    core, net = make_core()
    core.receive(invite(1), SWITCH, 0.0)
    net.take()
    # Top Via not ours.
    core.receive(
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKevil\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKsw1\r\n" + TAIL,
        SWITCH,
        0.1,
    )
    # Ours (our branch prefix) but an unknown branch, non-2xx.
    core.receive(
        b"SIP/2.0 486 Busy\r\nVia: SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bKf422deadbeefx99\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKsw1\r\n" + TAIL,
        Target("udp", "192.0.2.10", 5060),
        0.1,
    )
    assert net.sent == []
    assert core.in_flight == 1  # the real call is untouched


def test_malformed_request_with_via_gets_400_and_malformed_response_is_dropped() -> None:
    rec = MetricsRecorder(proxy_id="t")
    core, net = make_core(rec)
    core.receive(invite(1, extra="CSeq: banana\r\n"), SWITCH, 0.0)
    assert sent_statuses(net) == [400]
    core.receive(
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 203.0.113.7;branch=z9hG4bKf422\r\nCSeq: x\r\n\r\n", SWITCH, 0.0
    )
    core.receive(b"\x16\x03\x01\x02\x00garbage", SWITCH, 0.0)
    assert net.sent == []
    assert rec._counts[MALFORMED_MESSAGES.name] >= 3
    core.receive(invite(2), SWITCH, 0.1)  # keeps serving
    assert [m.status for _, m, _ in net.take() if isinstance(m, SipResponse)] == [100]


def test_bad_rport_gets_400_at_the_source_port_instead_of_an_exception() -> None:
    """A Via ``rport`` that is not a port (RFC 3581: ``rport [= 1*DIGIT]``) used to raise ValueError
    out of receive(): no answer at all, a traceback per datagram. Now: 400 to the source address."""
    core, net = make_core()
    for i, rport in enumerate(["abc", "70000", "0", "9" * 5000], start=1):
        data = invite(i).replace(b";branch=", f";rport={rport};branch=".encode())
        assert core.receive(data, Target("udp", "10.0.0.5", 40000 + i), 0.0) is False
        sent = net.take()
        assert [(t, m.status) for t, m, _ in sent if isinstance(m, SipResponse)] == [
            (Target("udp", "10.0.0.5", 40000 + i), 400)
        ]
        assert not [t for t, _, _ in sent if t.transport == CLEARIP]
    assert core.in_flight == 0
    core.receive(invite(9).replace(b";branch=", b";rport=5099;branch="), SWITCH, 0.1)  # a good one
    assert [(t.port, m.status) for t, m, _ in net.take() if isinstance(m, SipResponse)] == [(5099, 100)]


def test_untrusted_sources_get_nothing_and_are_counted() -> None:
    rec = MetricsRecorder(proxy_id="t")
    core, net = make_core(rec)
    core.receive(invite(1), STRANGER, 0.0)
    core.receive(request("OPTIONS", 2, ruri="sip:203.0.113.7"), STRANGER, 0.0)
    core.receive(b"garbage", STRANGER, 0.0)
    assert net.sent == []
    assert core.in_flight == 0
    assert rec._counts[UNTRUSTED_DROPPED.name] == 3


def test_overload_answers_503_with_retry_after_and_keeps_calls_in_flight() -> None:
    core, net = make_core(max_in_flight=2)
    for i in range(4):
        core.receive(invite(i), SWITCH, 0.0)
    out = net.take()
    finals = finals_to_switch(out)
    assert [m.status for m in finals] == [503, 503]
    assert all(m.get("retry-after") for m in finals)
    assert sum(1 for t, _, _ in out if t.transport == CLEARIP) == 2
    assert core.in_flight == 2


def test_invite_retransmissions_are_absorbed_not_sent_to_clearip_twice() -> None:
    core, net = make_core()
    for k in range(5):
        core.receive(invite(1), SWITCH, 0.1 * k)
    out = net.take()
    assert sum(1 for t, _, _ in out if t.transport == CLEARIP) == 1
