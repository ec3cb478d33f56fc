"""Faults around the proxy, injected for real (issue 7, "Faults to survive"): ClearIP silent, reset,
down, slow; carriers silent, refusing, failing; UDP loss; overload; SIGTERM drain; memory.

Peers are the small Python UAs of :mod:`tests.integration.faultlib` (and SIPp for load); all on
127.0.0.1, all stopped by the ``lab`` fixture. The proxy runs with ``--timeout 1`` so a ClearIP or
carrier timeout costs one second.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.faultlib import (
    ClearIpStub,
    LossyUdpRelay,
    UdpUa,
    closed_port,
    invite_bytes,
    peer,
    reason_of,
    simple_request,
    start_proxy,
    stub,
)
from tests.integration.harness import HOST, REPO, Lab, SipMessage, split_stream

TIMEOUT = 1.0
# Wall-clock limits here must hold on a loaded 2-core machine (other engineers' tests, a CPU burn),
# where any one process may be kept off the CPU for a second or more. Each limit is the behaviour's
# own time plus LOAD_SLACK, and each test is set up so that the wrong behaviour (waiting for a
# timeout, a backoff, a ring timeout) takes clearly longer than that; the comments say by how much.
LOAD_SLACK = 2.0
# Where a test proves "at once, not after the timeout", the proxy's timeout is this long, so that
# half of it is both generous to a loaded machine and far from what a waiting proxy would take.
LONG_TIMEOUT = 5.0
NUMBER = "+15555550100"


def clearip_uri(stub: ClearIpStub) -> str:
    return f"sip:{HOST}:{stub.port};transport=tcp"


def contact(ua: UdpUa | int, q: float, *, tcp: bool = False) -> str:
    port = ua if isinstance(ua, int) else ua.port
    tp = ";transport=tcp" if tcp else ""
    return f"<sip:{NUMBER}@{HOST}:{port}{tp}>;q={q:g}"


# ---------------------------------------------------------------------------------------------
# 1. ClearIP silent
# ---------------------------------------------------------------------------------------------


def test_clearip_silent_every_waiting_caller_gets_503_within_timeout(lab: Lab) -> None:
    clearip = stub(lab, mode="silent")
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=TIMEOUT, wait_port=clearip.port)
    switch = peer(lab, "switch")
    calls = [switch.call(proxy.port) for _ in range(8)]
    assert switch.wait_final(calls, TIMEOUT + LOAD_SLACK + 1)
    assert clearip.wait_invites(8, 1 + LOAD_SLACK)
    for c in calls:
        assert c.final is not None and c.final.status == 503, c.final
        # The 503 is the timeout's (not sooner); without it the caller would wait for its own
        # Timer B (32 s). Load may delay the timer's firing, never advance it.
        assert TIMEOUT - 0.1 <= c.final_after <= TIMEOUT + LOAD_SLACK, c.final_after
        assert "ClearIP" in reason_of(c.final)
    assert all(n == 1 for n in clearip.invites.values())


# ---------------------------------------------------------------------------------------------
# 2. ClearIP reset mid-load; ClearIP down at start-up
# ---------------------------------------------------------------------------------------------


def _first_success(switch: UdpUa, proxy_port: int, within: float) -> float | None:
    """Place a call every 0.1 s until one is answered 200; seconds it took, or None."""
    t0 = time.monotonic()
    pending = []
    while time.monotonic() - t0 < within:
        pending.append(switch.call(proxy_port, complete_dialog=False))
        time.sleep(0.1)
        for c in pending:
            if c.final is not None and c.final.status == 200:
                return c.finals[0][0] - t0
    switch.wait_final(pending, 1.0)
    for c in pending:
        if c.final is not None and c.final.status == 200:
            return c.finals[0][0] - t0
    return None


def test_clearip_reset_mid_load_fails_waiting_calls_at_once_and_recovers(lab: Lab) -> None:
    carrier = peer(lab, "carrier", "answer")
    clearip = stub(lab, mode="silent", contacts=contact(carrier, 0.9))
    # A 10 s timeout: a proxy that let the callers wait for it after the reset would answer them
    # >= 8 s after the reset, far beyond the LOAD_SLACK allowed for "at once".
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=2 * LONG_TIMEOUT, wait_port=clearip.port)
    switch = peer(lab, "switch")
    calls = [switch.call(proxy.port) for _ in range(6)]
    assert clearip.wait_invites(6, 2 + LOAD_SLACK)
    t_reset = time.monotonic()
    assert clearip.reset_connections() == 1
    assert switch.wait_final(calls, LOAD_SLACK), "waiting callers were not answered at once"
    for c in calls:
        assert c.final is not None and c.final.status == 503
        assert c.finals[0][0] - t_reset < LOAD_SLACK, c.finals[0][0] - t_reset
        assert "connection lost" in reason_of(c.final)
    # ClearIP answers again: the proxy reconnects at once (the stub still listens) and calls go
    # through; 2 s is the design's figure, LOAD_SLACK what a loaded machine adds to it.
    clearip.mode = "answer"
    took = _first_success(switch, proxy.port, 2.0 + LOAD_SLACK + 1)
    assert took is not None and took <= 2.0 + LOAD_SLACK, took
    assert proxy.proc is not None and proxy.proc.poll() is None


def test_clearip_down_at_start_calls_get_503_at_once_then_succeed_within_2s_of_return(lab: Lab) -> None:
    carrier = peer(lab, "carrier", "answer")
    clearip = stub(lab, contacts=contact(carrier, 0.9), listen=False)
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=LONG_TIMEOUT)
    switch = peer(lab, "switch")
    # Down for 8 s: the reconnect backoff (0.5, 1, 2, 4, 8 s, +-20 %) is then in its 8 s step, so
    # a proxy that slept it out would first succeed >= 6 s after ClearIP's return.
    deadline = time.monotonic() + 8.0
    down_calls = []
    while time.monotonic() < deadline:
        down_calls.append(switch.call(proxy.port, complete_dialog=False))
        time.sleep(0.5)
    assert switch.wait_final(down_calls, LOAD_SLACK)
    for c in down_calls:
        assert c.final is not None and c.final.status == 503
        # At once: a proxy that waited for its 5 s timeout would take >= 5 s.
        assert c.final_after < LONG_TIMEOUT / 2, c.final_after
        assert "unreachable" in reason_of(c.final)
    clearip.start_listening()
    took = _first_success(switch, proxy.port, 2.0 + LOAD_SLACK + 1)
    # The design's 2 s (a call pokes the reconnect), plus what load adds; the backoff alone: >= 6 s.
    assert took is not None and took <= 2.0 + LOAD_SLACK, f"first success {took} s after ClearIP returned"


def test_no_call_is_left_without_a_final_response_across_a_reset(lab: Lab) -> None:
    """Calls arriving before, during and after a reset all get exactly one final response."""
    carrier = peer(lab, "carrier", "answer")
    clearip = stub(lab, contacts=contact(carrier, 0.9), delay=0.3)
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=TIMEOUT, wait_port=clearip.port)
    switch = peer(lab, "switch")
    calls = []
    for i in range(30):
        calls.append(switch.call(proxy.port))
        if i == 10:
            clearip.reset_connections()
        time.sleep(0.03)
    assert switch.wait_done(calls, TIMEOUT + 4)
    statuses = [c.final.status for c in calls if c.final is not None]
    assert len(statuses) == 30
    assert set(statuses) <= {200, 503}
    assert 200 in statuses and 503 in statuses
    # Exactly one final per call (retransmissions of the same final aside).
    for c in calls:
        assert len({m.status for _, m in c.finals}) == 1


def _read_messages(sock: socket.socket, want: int, timeout: float) -> list[SipMessage]:
    """Read until ``want`` messages, EOF or ``timeout`` (bounded)."""
    buf = b""
    out: list[SipMessage] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        buf += chunk
        msgs, buf = split_stream(buf)
        out.extend(SipMessage(m) for m in msgs)
    return out


def _ack_and_bye(inv: SipMessage, ok: SipMessage, port: int) -> bytes:
    m = re.search(r"<([^>]+)>", ok.get("contact") or "")
    assert m, ok.raw
    routes = "".join(f"Route: {r}\r\n" for r in ok.all("record-route"))
    out = b""
    for method, seq in (("ACK", 1), ("BYE", 2)):
        out += (
            f"{method} {m.group(1)} SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP {HOST}:{port};branch=z9hG4bK{uuid.uuid4().hex}\r\nMax-Forwards: 70\r\n"
            f"From: {inv.get('from')}\r\nTo: {ok.get('to')}\r\nCall-ID: {inv.call_id}\r\n"
            f"CSeq: {seq} {method}\r\n{routes}Content-Length: 0\r\n\r\n"
        ).encode()
    return out


@pytest.mark.parametrize("closed_by", ["switch", "proxy_framing_error"])
def test_calls_survive_the_switch_tcp_connection_closing_mid_call(lab: Lab, closed_by: str) -> None:
    """A TCP switch's connection closes while 3 calls wait on ClearIP (the switch drops it, or the
    proxy closes it after a message with a bad Content-Length). RFC 3261 §18.2.2: the finals go on a
    new connection to the source address at the Via's sent-by port (they used to be sent to the
    switch's old ephemeral port: refused, and every call was left without a final response)."""
    carrier = peer(lab, "carrier", "answer")
    clearip = stub(lab, contacts=contact(carrier, 0.9), delay=0.5)
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=3.0, wait_port=clearip.port)
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(4)
    lab.add_closer(listener)
    via_port = listener.getsockname()[1]  # the switch listens where its Via says
    conn = socket.create_connection((HOST, proxy.port), timeout=2)
    lab.add_closer(conn)
    invites = [
        invite_bytes(
            call_id=f"tcp-{i}-{uuid.uuid4().hex[:8]}", local_port=via_port, proxy_port=0, transport="TCP"
        )
        for i in range(3)
    ]
    conn.sendall(b"".join(invites))
    assert [m.status for m in _read_messages(conn, 3, 2)] == [100, 100, 100]
    if closed_by == "switch":
        conn.close()
    else:
        conn.sendall(
            f"OPTIONS sip:{HOST} SIP/2.0\r\nVia: SIP/2.0/TCP {HOST}:{via_port};branch=z9hG4bKbadcl\r\n"
            "Content-Length: many\r\n\r\n".encode()
        )
        assert [m.status for m in _read_messages(conn, 2, 2)] == [400]  # then EOF: closed
    listener.settimeout(3)
    back, _ = listener.accept()
    lab.add_closer(back)
    finals = {m.call_id: m for m in _read_messages(back, 3, 3) if m.cseq[1] == "INVITE" and m.status >= 200}
    by_id = {SipMessage(i).call_id: SipMessage(i) for i in invites}
    assert set(finals) == set(by_id), finals
    assert {m.status for m in finals.values()} == {200}
    back.sendall(b"".join(_ack_and_bye(by_id[cid], ok, via_port) for cid, ok in finals.items()))
    byes = [m for m in _read_messages(back, 20, 3) if m.cseq[1] == "BYE"]
    assert sorted(m.call_id for m in byes) == sorted(finals)
    assert {m.status for m in byes} == {200}


# ---------------------------------------------------------------------------------------------
# 3. ClearIP slow
# ---------------------------------------------------------------------------------------------


def test_clearip_slow_at_80_percent_of_timeout_calls_still_complete(lab: Lab) -> None:
    carrier = peer(lab, "carrier", "answer")
    clearip = stub(lab, contacts=contact(carrier, 0.9), delay=0.8 * TIMEOUT)
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=TIMEOUT, wait_port=clearip.port)
    switch = peer(lab, "switch")
    calls = [switch.call(proxy.port) for _ in range(6)]
    assert switch.wait_done(calls, TIMEOUT + 3)
    for c in calls:
        assert c.final is not None and c.final.status == 200, c.final
        assert c.bye_done
    assert len(carrier.invites_seen) == 6


# ---------------------------------------------------------------------------------------------
# 4. Carriers that never answer, refuse the connection, answer 503
# ---------------------------------------------------------------------------------------------


def test_carrier_failures_advance_to_the_next_contact_within_timeout(lab: Lab) -> None:
    silent = peer(lab, "silent", "silent")
    failing = peer(lab, "failing", "503")
    good = peer(lab, "good", "answer")
    refused = closed_port()
    contacts = ", ".join(
        [contact(silent, 0.9), contact(refused, 0.8, tcp=True), contact(failing, 0.7), contact(good, 0.6)]
    )
    clearip = stub(lab, contacts=contacts)
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=LONG_TIMEOUT, wait_port=clearip.port)
    switch = peer(lab, "switch")
    c = switch.call(proxy.port)
    assert switch.wait_done([c], LONG_TIMEOUT + 2 * LOAD_SLACK + 3)
    assert c.final is not None and c.final.status == 200
    assert silent.invite_times and failing.invite_times and good.invite_times
    # Silent: after its 5 s timeout (never sooner) the next Contact, refused at once, then the one
    # after. Waiting a second timeout on the refused Contact would make this >= 10 s.
    gap = failing.invite_times[0] - silent.invite_times[0]
    assert LONG_TIMEOUT - 0.1 <= gap <= LONG_TIMEOUT + LOAD_SLACK, gap
    # A 503 moves on at once; waiting for the timeout instead would take >= 5 s.
    assert good.invite_times[0] - failing.invite_times[0] <= LONG_TIMEOUT / 2
    # One INVITE transaction per carrier (retransmissions share the branch).
    for ua in (silent, failing, good):
        assert all(len(b) == 1 for b in ua.invites_seen.values())


@pytest.mark.parametrize("first", ["silent", "refused", "503"])
def test_each_carrier_failure_alone_moves_the_call_on(lab: Lab, first: str) -> None:
    good = peer(lab, "good", "answer")
    if first == "refused":
        bad = contact(closed_port(), 0.9, tcp=True)
    else:
        bad = contact(peer(lab, "bad", first), 0.9)
    clearip = stub(lab, contacts=f"{bad}, {contact(good, 0.5)}")
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=LONG_TIMEOUT, wait_port=clearip.port)
    switch = peer(lab, "switch")
    c = switch.call(proxy.port)
    assert good.wait_invites(1, LONG_TIMEOUT + LOAD_SLACK + 1)
    took = good.invite_times[0] - c.sent_at
    if first == "silent":  # after the 5 s timeout, never before it
        assert LONG_TIMEOUT - 0.1 <= took <= LONG_TIMEOUT + LOAD_SLACK, took
    else:  # at once: waiting for the 5 s timeout instead would take >= 5 s
        assert took <= LONG_TIMEOUT / 2, took
    assert switch.wait_done([c], 3 + LOAD_SLACK)
    assert c.final is not None and c.final.status == 200


def test_contacts_the_proxy_cannot_send_to_fail_at_once_and_keep_the_clearip_link(lab: Lab) -> None:
    """302 Contacts the adapter cannot send to: an IPv6 address over UDP (the UDP socket is IPv4:
    uvloop's sendto raised ValueError out of the core, in the middle of the fork, while reading the
    ClearIP connection: the call never got a final response and uvloop closed the ClearIP link), and
    host names IDNA refuses (a 64-character label: UnicodeError, which escaped the resolver and the
    TCP connect). Each is a transport error now: the next Contact is tried at once."""
    good = peer(lab, "good", "answer")
    label = "a" * 64
    bad = [
        f"<sip:{NUMBER}@[::1]:5060>;q=0.9",
        f"<sip:{NUMBER}@{label}.example>;q=0.8",
        f"<sip:{NUMBER}@{label}.example;transport=tcp>;q=0.7",
    ]
    clearip = stub(lab, contacts=", ".join([*bad, contact(good, 0.5)]))
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=LONG_TIMEOUT, wait_port=clearip.port)
    switch = peer(lab, "switch")
    calls = [switch.call(proxy.port) for _ in range(3)]
    assert switch.wait_done(calls, LONG_TIMEOUT + LOAD_SLACK), [c.final for c in calls]
    assert [c.final.status for c in calls if c.final] == [200, 200, 200]
    # No Contact waited out the 5 s timeout (one that did would make this >= 5 s).
    assert max(c.final_after for c in calls) < LONG_TIMEOUT / 2
    assert clearip.accepted == 1  # the ClearIP connection was never dropped
    assert "Traceback" not in proxy.log_text()


# ---------------------------------------------------------------------------------------------
# 5. UDP loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7, 2024])
def test_udp_loss_every_call_completes_and_nothing_is_forwarded_twice(lab: Lab, seed: int) -> None:
    """5 % of datagrams dropped each way between switch and proxy and between proxy and carrier."""
    carrier = peer(lab, "carrier", "answer")
    carrier_relay = LossyUdpRelay(carrier.port, loss=0.05, seed=seed)
    lab.add_closer(carrier_relay)
    carrier.contact_port = carrier_relay.port
    clearip = stub(lab, contacts=contact(carrier_relay.port, 0.9))
    proxy = start_proxy(lab, clearip_uri(clearip), timeout=3.0, wait_port=clearip.port)
    switch_relay = LossyUdpRelay(proxy.port, loss=0.05, seed=seed + 1)
    lab.add_closer(switch_relay)
    switch = peer(lab, "switch")
    calls = []
    for _ in range(40):
        calls.append(switch.call(switch_relay.port))
        time.sleep(0.03)
    assert switch.wait_done(calls, 30), [c.final for c in calls if not c.done]
    assert switch_relay.dropped + carrier_relay.dropped > 0  # the loss really happened
    for c in calls:
        assert c.final is not None and c.final.status == 200
        assert c.bye_done
        # Retransmitted INVITEs were absorbed: ClearIP saw one INVITE, the carrier one transaction.
        assert clearip.invites.get(c.call_id) == 1
        assert len(carrier.invites_seen.get(c.call_id, set())) == 1


# ---------------------------------------------------------------------------------------------
# 6. Overload
# ---------------------------------------------------------------------------------------------


def test_overload_new_invites_get_503_retry_after_at_once_and_in_flight_calls_finish(lab: Lab) -> None:
    carrier = peer(lab, "carrier", "answer")
    # ClearIP holds the first 3 calls for 5 s: an INVITE queued behind them would wait >= 4 s.
    clearip = stub(lab, contacts=contact(carrier, 0.9), delay=LONG_TIMEOUT)
    proxy = start_proxy(
        lab,
        clearip_uri(clearip),
        timeout=2 * LONG_TIMEOUT,
        wait_port=clearip.port,
        extra=["--max-in-flight", "3"],
    )
    switch = peer(lab, "switch")
    first = [switch.call(proxy.port) for _ in range(3)]
    assert clearip.wait_invites(3, 1 + LOAD_SLACK)
    extra = [switch.call(proxy.port) for _ in range(4)]
    assert switch.wait_final(extra, LOAD_SLACK)
    for c in extra:
        assert c.final is not None and c.final.status == 503
        assert c.final_after < LOAD_SLACK, c.final_after  # at once, not queued
        assert c.final.get("Retry-After"), "503 for overload must carry Retry-After"
    assert clearip.total_invites() == 3  # the rejected calls never reached ClearIP
    assert switch.wait_done(first, LONG_TIMEOUT + LOAD_SLACK + 1)
    assert [c.final.status for c in first if c.final] == [200, 200, 200]
    # Load back under the limit: new calls are accepted again.
    again = switch.call(proxy.port)
    assert switch.wait_done([again], LONG_TIMEOUT + LOAD_SLACK + 1)
    assert again.final is not None and again.final.status == 200


# ---------------------------------------------------------------------------------------------
# 7. Restart: SIGTERM drains; systemd restarts
# ---------------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_0(lab: Lab) -> None:
    carrier = peer(lab, "carrier", "answer")
    clearip = stub(lab, contacts=contact(carrier, 0.9), delay=1.0)
    proxy = start_proxy(
        lab,
        clearip_uri(clearip),
        timeout=3.0,
        wait_port=clearip.port,
        env={"CLEARIP_PROXY_DRAIN_TIMEOUT": "5"},
    )
    switch = peer(lab, "switch")
    in_flight = [switch.call(proxy.port, complete_dialog=False) for _ in range(3)]
    assert clearip.wait_invites(3, 1 + LOAD_SLACK)
    assert proxy.proc is not None
    t_term = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # Draining: OPTIONS 503 (health check fails so switches move away), new INVITEs 503.
    options = simple_request("OPTIONS", local_port=switch.port, ruri=f"sip:{HOST}:{proxy.port}")
    switch.send(options, proxy.port)
    late = switch.call(proxy.port, complete_dialog=False)
    assert switch.wait_final([late], LOAD_SLACK)
    assert late.final is not None and late.final.status == 503
    deadline = time.monotonic() + LOAD_SLACK
    opt_status = None
    while time.monotonic() < deadline and opt_status is None:
        for _, m in list(switch.received):
            if not m.is_request and m.cseq[1] == "OPTIONS":
                opt_status = m.status
        time.sleep(0.02)
    assert opt_status == 503
    # The calls in flight finish normally.
    assert switch.wait_final(in_flight, 3 + LOAD_SLACK)
    assert [c.final.status for c in in_flight if c.final] == [200, 200, 200]
    # Exits 0 within the 5 s drain timeout (once its calls are done), plus what load adds; a proxy
    # that did not exit would fail proc.wait.
    code = proxy.proc.wait(5 + LOAD_SLACK)
    assert code == 0
    assert time.monotonic() - t_term < 5 + LOAD_SLACK


def test_sigterm_drain_is_bounded_by_drain_timeout_and_answers_leftovers(lab: Lab) -> None:
    ringing = peer(lab, "ringing", "ring")
    clearip = stub(lab, contacts=contact(ringing, 0.9))
    proxy = start_proxy(
        lab,
        clearip_uri(clearip),
        timeout=TIMEOUT,
        ring_timeout=60,
        wait_port=clearip.port,
        env={"CLEARIP_PROXY_DRAIN_TIMEOUT": "1"},
    )
    switch = peer(lab, "switch")
    c = switch.call(proxy.port, complete_dialog=False)
    assert ringing.wait_invites(1, 2 + LOAD_SLACK)
    time.sleep(0.2)
    assert proxy.proc is not None
    t_term = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    code = proxy.proc.wait(10)
    took = time.monotonic() - t_term
    assert code == 0
    # The 1 s drain timeout bounds the exit, plus what load adds; a drain that waited for the
    # ringing call would last its 60 s ring timeout.
    assert took < 1 + LOAD_SLACK, took
    # The ringing call was not left hanging: the switch got a final response.
    assert switch.wait_final([c], LOAD_SLACK)
    assert c.final is not None and c.final.status >= 400


def test_systemd_unit_passes_systemd_analyze_and_asks_for_restart_and_sigterm(tmp_path: Path) -> None:
    """What this checks is the unit file, not a restart: that systemd parses every line of
    deploy/clearip-proxy.service without a complaint (``systemd-analyze verify`` warns and carries
    on at a misspelled value, so any output fails), that it restarts the proxy whenever it exits
    (Restart=always), and that it stops it with SIGTERM, which drains calls. Watching systemd
    restart a killed proxy needs a booted systemd, which a test container does not have; the
    install on a real host is covered by deploy/install.sh's checks in tests/infra."""
    unit = REPO / "deploy" / "clearip-proxy.service"
    text = unit.read_text()
    # The installed binary does not exist here: point ExecStart at a stub, leave every other line.
    installed = "/opt/clearip-proxy/venv/bin/clearip-proxy"
    assert installed in text
    stub = tmp_path / "clearip-proxy"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    copy = tmp_path / "clearip-proxy.service"
    copy.write_text(text.replace(installed, str(stub)))
    analyze = require_tool("systemd-analyze", "Debian package systemd")
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr + proc.stdout
    settings = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key.strip()] = value.strip()
    assert settings["Restart"] == "always"
    assert settings.get("KillSignal", "SIGTERM") == "SIGTERM", "systemd must stop the proxy with SIGTERM"
    assert settings["StartLimitIntervalSec"] == "0"  # never give up restarting


# ---------------------------------------------------------------------------------------------
# 8. Memory (scaled; the full 100,000-call run is ``python -m bench.soak``)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.sipp
def test_memory_is_reused_after_transactions_drain(tmp_path: Path) -> None:
    """1,500 full calls (SIPp switch, ClearIP 302 with Identity, carrier answers, caller hangs up),
    33 s of silence (every transaction's timers run out), 1,500 more: RSS after the second batch
    stays within 10 % of RSS after the first. A leak of calls, transactions, timers or
    connections would double it. (The core's tables draining to empty is unit-tested in
    tests/unit/test_hostile_core.py.)"""
    from bench.soak import run

    res = run(3000, 1500, 150, tmp_path, pause=33.0)
    # The RSS figures need the calls to have run. SIPp-side failures (retransmission timeouts) only
    # appear when the machine is starved: 0 when quiet, 184 of 3,000 (6 %) under a two-core CPU
    # burn (2026-12-03), where RSS still grew 4.4 %. A tenth of the calls failing still leaves
    # 2,700 calls' worth of allocations for a leak to show in.
    assert res.failed_calls <= res.calls // 10, res
    first, second = res.rss_kb
    # Measured 2026-12-02: +1.1 % (35.8 -> 36.2 MiB; +12 % before finished calls were freed at
    # once and the call timers left no stale entries). A leak of calls or transactions doubles it.
    assert second <= first * 1.10, f"RSS {first} kB after 1,500 calls, {second} kB after 3,000"
