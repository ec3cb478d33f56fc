"""What the multi-core design of docs/SCALING.md would add per message: the dispatcher's hop.

``python -m bench.dispatch_micro --messages 200000`` measures, on real sockets on loopback, the CPU
of each step a message arriving at 5060 would take in that design, against what the single
process does for it today:

- *today*: the proxy's UDP socket receives the datagram (``recvfrom``);
- *dispatcher*: the same receive, a byte scan for the top Via's branch and sent-by, a hash to
  pick the worker, and a ``sendmsg`` of the datagram with its source address over a Unix
  datagram socket;
- *worker*: the ``recvmsg`` of that message on the worker's Unix socket (it replaces the
  worker's own ``recvfrom``, so only the difference is new work).

It prints microseconds of CPU per message for each, the design's added CPU per call for the
benchmark's flow (3 of the proxy's 12 received messages arrive at 5060) and what that predicts
for N workers. It measures the hop only: the workers themselves are today's proxy.
"""

from __future__ import annotations

import argparse
import socket
import struct
import tempfile
import time
import zlib
from pathlib import Path

INVITE = (
    b"INVITE sip:+15550100100@acme.sip.clearip.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK-%07d;rport\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:+12125550100@127.0.0.2>;tag=a1\r\n"
    b"To: <sip:+15550100100@acme.sip.clearip.com>\r\nCall-ID: %07d@bench\r\nCSeq: 1 INVITE\r\n"
    b"Contact: <sip:sw@127.0.0.2:5060>\r\nContent-Type: application/sdp\r\n"
    + b"Identity: "
    + b"e" * 800
    + b";info=<https://cert.example/c.pem>;alg=ES256;ppt=shaken\r\n"
    + b"Content-Length: 129\r\n\r\n"
    + b"v=0\r\n" * 25
    + b"x" * 4
)
# Datagrams in flight per round: at most net.unix.max_dgram_qlen (10 by default) may wait on one
# Unix datagram socket before sendmsg blocks (a real dispatcher raises it, or drops with a count).
BATCH = 8
_ADDR = struct.Struct("!4sH")


def worker_of(data: bytes, workers: int) -> int:
    """The dispatcher's choice: a hash of the top Via header's value (sent-by and branch), found by
    a byte scan. Retransmissions repeat it, and a CANCEL or a non-2xx ACK carries its INVITE's top
    Via (RFC 3261 §9.1, §17.1.1.3), so they all reach the worker holding the transaction."""
    start = data.find(b"\nVia:")
    if start < 0:
        start = data.find(b"\nv:")
    return zlib.crc32(data[start : data.find(b"\r\n", start + 1)]) % workers


def _cpu() -> float:
    return time.process_time()


def measure(messages: int, workers: int) -> dict[str, float]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    dest = rx.getsockname()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(tmp) / f"w{i}") for i in range(workers)]
        inboxes = []
        for p in paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind(p)
            inboxes.append(s)
        out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        datagrams = [INVITE % (i, i) for i in range(BATCH)]
        t_recv = t_disp = t_work = 0.0
        done = 0
        while done < messages:
            for d in datagrams:
                tx.sendto(d, dest)
            # today: the proxy's receive
            t0 = _cpu()
            got = [rx.recvfrom(65535) for _ in datagrams]
            t_recv += _cpu() - t0
            # the dispatcher: scan, hash, pass on with the source address
            t0 = _cpu()
            for data, (host, port) in got:
                w = worker_of(data, workers)
                out.sendmsg([_ADDR.pack(socket.inet_aton(host), port), data], [], 0, paths[w])
            t_disp += _cpu() - t0
            # the workers: receive from their Unix socket
            t0 = _cpu()
            for s in inboxes:
                s.setblocking(False)
                while True:
                    try:
                        s.recv(65535)
                    except BlockingIOError:
                        break
            t_work += _cpu() - t0
            done += len(datagrams)
        for s in (*inboxes, out, rx, tx):
            s.close()
    us = 1e6 / done
    return {"recv": t_recv * us, "dispatch": t_disp * us, "worker_recv": t_work * us}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--call-us", type=float, default=1000.0, help="CPU per call in one worker today (µs)")
    args = ap.parse_args(argv)
    best: dict[str, float] = {}
    for _ in range(3):
        for k, v in measure(args.messages // 3, args.workers).items():
            best[k] = min(v, best.get(k, v))
    added_per_msg = best["dispatch"] + best["worker_recv"] - best["recv"]
    per_call = 3 * (best["recv"] + best["dispatch"])  # the dispatcher's own CPU per call
    worker_extra = 3 * (best["worker_recv"] - best["recv"])
    n = args.messages // 3
    print(f"{args.workers} workers, best of 3 x {n} messages of {len(INVITE)} B:")
    print(f"  today, recvfrom on the UDP socket:         {best['recv']:6.1f} µs CPU per message")
    print(f"  dispatcher: scan + hash + sendmsg (Unix):  {best['dispatch']:6.1f} µs CPU per message")
    print(f"  worker: recv from its Unix socket:         {best['worker_recv']:6.1f} µs CPU per message")
    print(f"  added per message reaching 5060:           {added_per_msg:6.1f} µs")
    print(
        f"  per call (3 messages at 5060): dispatcher {per_call:.0f} µs, worker {worker_extra:+.0f} µs "
        f"against {args.call_us:.0f} µs per call today"
    )
    for n in (2, 4):
        # n workers on n cores, the dispatcher sharing them: calls/s per core-second
        rate = n * 1e6 / (args.call_us + worker_extra + per_call)
        print(f"  predicted for {n} cores, nothing else running: {rate / (1e6 / args.call_us):.2f}x one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
