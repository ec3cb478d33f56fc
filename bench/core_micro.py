"""In-process cost of one full call through the sans-I/O core (no sockets, no event loop).

``python -m bench.core_micro --calls 20000 [--profile] [--refusals]`` drives ProxyCore through the benchmark's
flow — INVITE, 100, ClearIP 302 (~900-byte Identity, two Contacts), ACK, carrier 100/180/200,
ACK for 2xx, BYE, 200 — and prints microseconds of CPU per call. It isolates the proxy's own
work from the kernel and SIPp, so optimisations of the parser and core can be measured alone.
Each finished call goes through the metrics recorder and logs its JSON line with the proxy's own
logging set-up (to /dev/null), and the garbage collector runs with the proxy's settings
(transport/gcpolicy.py), as in a running proxy; ``--bare`` leaves all three out (the figure before
2026-12-03's third pass, which counted none of them).
``--refusals`` measures instead the CPU of one new INVITE refused by overload control (503 +
Retry-After, stateless).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import time
from dataclasses import replace
from typing import TextIO

from bench.run import make_identity
from proxy_runtime.core.proxy import CLEARIP, ProxyCore, Target
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.settings import load
from proxy_runtime.sip.message import SipRequest
from proxy_runtime.sip.parse import parse_message
from proxy_runtime.transport import gcpolicy

try:
    from proxy_runtime.__main__ import setup_logging
except ImportError:  # a build from before setup_logging (--build of an older tree, for a before/after)

    def setup_logging(level: str, stream: TextIO | None = None) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=stream
        )


IDENTITY = make_identity(800)  # a SHAKEN PASSporT that decodes (attest A), as ClearIP's do
SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
SWITCH = Target("udp", "127.0.0.2", 5060)
CARRIER = Target("udp", "127.0.0.3", 5060)
CLEARIP_SRC = Target(CLEARIP, "127.0.0.4", 5061, 1)


class Sink:
    def __init__(self) -> None:
        self.last: list[bytes] = []

    def __call__(self, target: Target, data: bytes, key: object) -> None:
        self.last.append(data)


def _invite(i: int) -> bytes:
    return (
        f"INVITE sip:+1555{i:07d}@acme.sip.clearip.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK-{i}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:+12125550100@127.0.0.2>;tag=a1\r\n"
        f"To: <sip:+1555{i:07d}@acme.sip.clearip.com>\r\nCall-ID: {i}@bench\r\nCSeq: 1 INVITE\r\n"
        "Contact: <sip:sw@127.0.0.2:5060>\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n"
    ).encode() + SDP


def _reply(req: SipRequest, status: int, reason: str, extra: str = "") -> bytes:
    vias = "".join(f"Via: {v}\r\n" for v in req.values("via"))
    to = req.get("to") or ""
    if status > 100:
        to += ";tag=b2"
    return (
        f"SIP/2.0 {status} {reason}\r\n{vias}From: {req.get('from')}\r\nTo: {to}\r\n"
        f"Call-ID: {req.call_id}\r\nCSeq: {req.get('cseq')}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def one_call(core: ProxyCore, sink: Sink, i: int, now: float) -> None:
    sink.last.clear()
    core.receive(_invite(i), SWITCH, now)
    to_clearip = parse_message(sink.last[-1])
    assert isinstance(to_clearip, SipRequest)
    contacts = "Contact: <sip:+15551234567@127.0.0.3>;q=0.9, <sip:+15551234567@127.0.0.5>;q=0.8\r\n"
    sink.last.clear()
    core.receive(
        _reply(to_clearip, 302, "Moved Temporarily", f"Identity: {IDENTITY}\r\n{contacts}"), CLEARIP_SRC, now
    )
    to_carrier = parse_message(sink.last[-1])
    assert isinstance(to_carrier, SipRequest)
    for status, reason in ((100, "Trying"), (180, "Ringing")):
        core.receive(_reply(to_carrier, status, reason), CARRIER, now)
    core.receive(_reply(to_carrier, 200, "OK", "Contact: <sip:c@127.0.0.3:5060>\r\n"), CARRIER, now)
    dialog = (
        "Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK-{b}\r\nRoute: <sip:127.0.0.1:5060;lr>\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:+12125550100@127.0.0.2>;tag=a1\r\n"
        "To: <sip:+15551234567@acme.sip.clearip.com>;tag=b2\r\nCall-ID: {i}@bench\r\n"
    )
    ack = f"ACK sip:c@127.0.0.3:5060 SIP/2.0\r\n{dialog}CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    core.receive(ack.format(b=f"ack{i}", i=i).encode(), SWITCH, now)
    bye = f"BYE sip:c@127.0.0.3:5060 SIP/2.0\r\n{dialog}CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    sink.last.clear()
    core.receive(bye.format(b=f"bye{i}", i=i).encode(), SWITCH, now)
    fwd_bye = parse_message(sink.last[-1])
    assert isinstance(fwd_bye, SipRequest)
    core.receive(_reply(fwd_bye, 200, "OK"), CARRIER, now)
    core.handle_timer(now)


def refusals(n: int, prof: cProfile.Profile | None) -> float:
    """CPU per new INVITE refused by overload control (the queue delay held far past the target),
    through the same recorder a running proxy has: the cost that decides how much room refusing
    makes past capacity."""
    s = replace(load(environ={}), allow=("127.0.0.0/8",), max_in_flight=10**9, overload_queue_delay=0.05)
    core = ProxyCore(
        s,
        Sink(),
        advertise="127.0.0.1",
        ports={"udp": 5060},
        instance="bench",
        recorder=MetricsRecorder(proxy_id="bench"),
    )
    core.set_clearip_up(True, 0.0)
    now = 0.0
    while now < 0.5:  # the queue delay rises to 0.5 s: the controller refuses all but 2 %
        core.note_queue_delay(now, now)
        now += 0.001
    invites = [_invite(i) for i in range(n)]
    t0 = time.process_time()
    if prof:
        prof.enable()
    for data in invites:
        core.note_queue_delay(1.0, 0.5)
        core.receive(data, SWITCH, 0.5)
    if prof:
        prof.disable()
    total = time.process_time() - t0
    print(f"{core.overload.refused} of {n} refused")
    return total / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--refusals", action="store_true", help="CPU per INVITE refused by overload control")
    ap.add_argument("--bare", action="store_true", help="no metrics recorder and no per-call log line")
    args = ap.parse_args(argv)
    if args.refusals:
        prof = cProfile.Profile() if args.profile else None
        logging.getLogger("clearip").setLevel(logging.ERROR)  # the once-a-second summary line
        print(f"{refusals(args.calls, prof):.1f} µs CPU per refused INVITE")
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    s = replace(load(environ={}), allow=("127.0.0.0/8",), max_in_flight=10**9)
    sink = Sink()
    recorder = None
    if not args.bare:
        setup_logging("info", open(os.devnull, "w"))  # noqa: SIM115 - held until exit
        recorder = MetricsRecorder(proxy_id="bench")
        gcpolicy.apply()  # the running proxy's collector settings
    core = ProxyCore(
        s, sink, advertise="127.0.0.1", ports={"udp": 5060, "tcp": 5060}, instance="bench", recorder=recorder
    )
    core.set_clearip_up(True, 0.0)
    # The harness builds and parses peer messages too; measure that alone and subtract it.
    for i in range(200):
        one_call(core, sink, i, float(i))
    prof = cProfile.Profile() if args.profile else None
    t0 = time.process_time()
    if prof:
        prof.enable()
    for i in range(args.calls):
        one_call(core, sink, 1000 + i, 1000.0 + i * 0.001)
    if prof:
        prof.disable()
    total = time.process_time() - t0
    core.handle_timer(1e9)
    per_call = total / args.calls * 1e6
    print(f"{args.calls} calls: {per_call:.1f} µs CPU per call (including the harness's own parsing)")
    print(f"tables after timers: in_flight={core.in_flight}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
