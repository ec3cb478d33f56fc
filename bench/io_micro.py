"""CPU of the proxy's I/O side per datagram: the real server, real UDP sockets, the event loop.

``python -m bench.io_micro [--rate 2000] [--seconds 4] [--burst 1]`` starts the real
:class:`~proxy_runtime.transport.server.ProxyServer` (uvloop, as ``proxy_runtime run`` has it) in
this process on core 0 and a peer process on core 1 that sends new INVITEs at ``--rate`` per
second, ``--burst`` at a time, and answers every 503 with its ACK, as a switch does. The
overload controller is held refusing (every INVITE takes the stateless refusal path), so the
figure is the whole cost of one overload refusal in the process: INVITE read, 503 sent, ACK read
and absorbed, the loop's wake-ups and timers, the kernel's part (system calls and the loopback
delivery they pay for). ``python -m bench.core_micro --refusals`` gives the core's share alone.

Small ``--burst`` at a modest rate is the worst case (one datagram per wake-up); a large burst
shows the batched cost.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import resource
import socket
import subprocess
import sys
import time
from dataclasses import replace

from proxy_runtime.core.overload import OverloadControl
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.settings import HostPort, load
from proxy_runtime.transport import gcpolicy
from proxy_runtime.transport.server import ProxyServer

SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def _hold_refusing(control: OverloadControl) -> None:
    """Hold the controller at "refuse every new call" (the micro measures the refusal's cost, not
    the controller's decision). Done on its state, not by subclassing: a compiled core's classes
    cannot be subclassed from Python."""
    control.refuse = 1.0
    control.delay = 1.0
    control._burst = 0.0
    control._next_update = math.inf  # no PIE update ever comes to lower it


def _invite(i: int, port: int) -> bytes:
    return (
        f"INVITE sip:+1555{i:07d}@acme.example SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-io-{i}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:+12125550100@127.0.0.1>;tag=a1\r\n"
        f"To: <sip:+1555{i:07d}@acme.example>\r\nCall-ID: {i}@io-micro\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:sw@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n"
    ).encode() + SDP


_TO = re.compile(rb"^(To|t):[^\r\n]*", re.I | re.M)


def _ack_for(reply: bytes, port: int) -> bytes:
    """The ACK a switch sends for a non-2xx final (RFC 3261 §17.1.1.3): same branch, the reply's To."""
    head = reply.split(b"\r\n\r\n", 1)[0]
    branch = re.search(rb";branch=([^;\s]+)", head)
    call_id = re.search(rb"^Call-ID:\s*([^\r\n]+)", head, re.M)
    to = _TO.search(head)
    if branch is None or call_id is None or to is None:
        return b""
    return (
        b"ACK sip:acme.example SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:%d;branch=%s\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:+12125550100@127.0.0.1>;tag=a1\r\n%s\r\n"
        b"Call-ID: %s\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    ) % (port, branch.group(1), to.group(0), call_id.group(1))


def peer(target_port: int, rate: int, seconds: float, burst: int) -> None:
    """The switch: INVITEs at ``rate`` in bursts, an ACK for every 503; prints what it saw."""
    os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    dest = ("127.0.0.1", target_port)
    n = int(rate * seconds)
    invites = [_invite(i, port) for i in range(n)]
    replies = 0
    sent = 0
    t0 = time.monotonic()
    while sent < n or time.monotonic() - t0 < seconds + 0.5:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        due = min(n, max(due, sent)) if due - sent >= burst or due == n else sent
        while sent < due:
            sock.sendto(invites[sent], dest)
            sent += 1
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            if data.startswith(b"SIP/2.0 503"):
                replies += 1
                ack = _ack_for(data, port)
                if ack:
                    sock.sendto(ack, dest)
        if sent >= n and replies >= n:
            break
        time.sleep(0.0002)
    print(f"sent {sent} replies {replies}", flush=True)


async def measure(rate: int, seconds: float, burst: int) -> tuple[float, int, int, float]:
    clearip = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    cport = clearip.sockets[0].getsockname()[1]
    s = replace(
        load(environ={}),
        udp=(HostPort("127.0.0.1", 0),),
        tcp=(),
        clearip=f"sip:127.0.0.1:{cport};transport=tcp",
        allow=("127.0.0.0/8",),
        metrics="off",
        max_in_flight=10**9,
    )
    # As `proxy_runtime run` has it: a metrics recorder (each refusal is counted) and the GC policy.
    server = ProxyServer(s, recorder=MetricsRecorder(proxy_id=s.proxy_id))
    await server.start()
    gcpolicy.apply()
    assert server.core is not None
    _hold_refusing(server.core.shed.control)
    port = server.ports["udp"]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.io_micro",
        "--peer",
        str(port),
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--burst",
        str(burst),
        stdout=subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(child.communicate(), seconds + 30)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    user = ru1.ru_utime - ru0.ru_utime
    system = ru1.ru_stime - ru0.ru_stime
    refused = server.core.shed.control.refused
    print(f"peer: {out.decode().strip()}", flush=True)
    await server.stop()
    clearip.close()
    return user + system, refused, int(ru1.ru_nvcsw - ru0.ru_nvcsw), system


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=2000, help="new INVITEs per second")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--burst", type=int, default=1, help="INVITEs sent back to back at a time")
    ap.add_argument("--peer", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.peer:
        peer(a.peer, a.rate, a.seconds, a.burst)
        return 0
    os.sched_setaffinity(0, {0})
    import uvloop

    cpu, refused, wakes, system = uvloop.run(measure(a.rate, a.seconds, a.burst))
    if not refused:
        print("nothing refused")
        return 1
    print(
        f"{refused} refused: {cpu / refused * 1e6:.1f} µs CPU per refusal (INVITE + 503 + ACK), "
        f"{100 * system / max(cpu, 1e-9):.0f}% in the kernel; {wakes} voluntary waits"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
