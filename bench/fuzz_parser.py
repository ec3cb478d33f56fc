"""Fuzz the SIP parser and stream framer, and time parse/serialise on a realistic INVITE.

A seeded mutation fuzzer (atheris is not installed): every input is one of RFC 4475's torture
messages (or a realistic STIR/SHAKEN INVITE) mutated by bit flips, byte inserts and deletes, chunk
duplication, header duplication, splicing of two messages, and "interesting" values (huge numbers,
long runs of quotes, commas, '<', LWS, CRLFs). Each input goes through ``parse_message`` (datagram
and stream), ``try_parse_for_reply`` and a ``StreamFramer`` fed in random chunks. Anything raised
that is not a ``ParseError`` is a bug and is reported with the input.

    python -m bench.fuzz_parser --inputs 1000000 --seed 1
    python -m bench.fuzz_parser --bench          # µs per parse and per serialise
"""

from __future__ import annotations

import argparse
import base64
import random
import resource
import sys
import time
import timeit
import traceback
from pathlib import Path

from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.framing import StreamFramer
from proxy_runtime.sip.parse import parse_message, try_parse_for_reply

TORTURE_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "rfc4475"


def realistic_invite() -> bytes:
    """An INVITE as a switch sends it after ClearIP: two ~900-byte Identity headers, SDP."""

    def b64(n: int, size: int) -> str:
        raw = bytes((i * 7 + n) % 256 for i in range(size))
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    identities = [
        f"{b64(n, 230)}.{b64(n + 1, 190)}.{b64(n + 2, 190)};"
        f"info=<https://cert.example.org/sti/cert{n}.pem>;alg=ES256;ppt=shaken"
        for n in (1, 2)
    ]
    sdp = (
        b"v=0\r\no=- 1234567890 1234567890 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\n"
        b"t=0 0\r\nm=audio 20000 RTP/AVP 0 8 18 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
        b"a=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\na=rtpmap:101 telephone-event/8000\r\n"
        b"a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
    )
    head = (
        "INVITE sip:+12125551234@carrier.example.net:5060;user=phone SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-524287-1---a1b2c3d4e5f6;rport\r\n"
        "Via: SIP/2.0/UDP 198.51.100.10:5060;received=198.51.100.10;branch=z9hG4bK776asdhds\r\n"
        "Max-Forwards: 69\r\n"
        "Record-Route: <sip:203.0.113.5;lr;ftag=as5d6f7g>\r\n"
        'From: "ACME Corp" <sip:+13035551111@switch.example.com;user=phone>;tag=as5d6f7g\r\n'
        "To: <sip:+12125551234@carrier.example.net;user=phone>\r\n"
        "Call-ID: 7c3f8a1e-4b2d-11ee-9f3a-0242ac120002@198.51.100.10\r\n"
        "CSeq: 102 INVITE\r\n"
        "Contact: <sip:+13035551111@198.51.100.10:5060;transport=udp>\r\n"
        "P-Asserted-Identity: <sip:+13035551111@switch.example.com;user=phone>\r\n"
        f"Identity: {identities[0]}\r\n"
        f"Identity: {identities[1]}\r\n"
        "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, INFO, REFER, NOTIFY\r\n"
        "Supported: replaces, timer, 100rel\r\n"
        "Session-Expires: 1800;refresher=uac\r\n"
        "User-Agent: ACME-Switch/4.2\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n"
    )
    return head.encode() + sdp


def seeds() -> list[bytes]:
    out = [p.read_bytes() for p in sorted(TORTURE_DIR.glob("*.dat"))]
    if not out:
        raise SystemExit(f"no seed corpus: {TORTURE_DIR} holds no .dat files (the RFC 4475 messages)")
    out.append(realistic_invite())
    return out


_INTERESTING = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"\r\n ",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b'"',
    b"\\",
    b"<",
    b">",
    b",",
    b";",
    b":",
    b"@",
    b"[",
    b"]",
    b"%",
    b"?",
    b"=",
    b" ",
    b"\t",
    b"4294967296",
    b"99999999999999999999999999",
    b"-1",
    b"0",
    b"\xc2\xb2",  # '²': str.isdigit() says yes, int() says no
    b"SIP/2.0",
    b"sip:",
    b"sips:[::1]:5061",
    b"Via: SIP/2.0/UDP [2001:db8::1]:5060;rport;branch=z9hG4bKx\r\n",
    b"Content-Length: 10\r\n",
    b"l: 99999\r\n",
    b"Identity: a,b,c\r\n",
]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5, 8))):
        op = rng.randrange(10)
        n = len(buf)
        if op == 0 and n:  # bit flip
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # random byte insert
            buf[rng.randrange(n + 1) : 0] = bytes([rng.randrange(256)])
        elif op == 2 and n:  # delete a range
            i = rng.randrange(n)
            del buf[i : i + rng.randrange(1, 16)]
        elif op == 3:  # interesting token insert
            i = rng.randrange(n + 1)
            buf[i:i] = rng.choice(_INTERESTING)
        elif op == 4 and n:  # duplicate a chunk
            i = rng.randrange(n)
            j = min(n, i + rng.randrange(1, 64))
            buf[j:j] = buf[i:j]
        elif op == 5:  # duplicate a header line
            lines = bytes(buf).split(b"\r\n")
            if len(lines) > 2:
                k = rng.randrange(1, len(lines))
                lines.insert(k, lines[k])
                buf = bytearray(b"\r\n".join(lines))
        elif op == 6:  # splice with another seed
            other = rng.choice(pool)
            i = rng.randrange(n + 1)
            j = rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:]
        elif op == 7 and n:  # overwrite a byte with an interesting one
            i = rng.randrange(n)
            tok = rng.choice(_INTERESTING)
            buf[i : i + len(tok)] = tok
        elif op == 8:  # long run (quadratic-time bait)
            i = rng.randrange(n + 1)
            unit = rng.choice((b'"', b",", b"<", b" ", b"\r\n ", b";", b"\\", b'\\"', b"a,"))
            buf[i:i] = unit * rng.randrange(100, 4000)
        elif op == 9 and n:  # truncate
            del buf[rng.randrange(n) :]
    return bytes(buf)


def _frame_all(data: bytes, rng: random.Random) -> None:
    framer = StreamFramer(65535)
    pos = 0
    while pos < len(data):
        step = rng.randrange(1, 700)
        framer.feed(data[pos : pos + step])
        pos += step
        while True:
            frame = framer.next_frame()
            if frame is None:
                break
            if frame != b"\r\n\r\n":
                try:
                    parse_message(frame, datagram=False)
                except ParseError:
                    pass


def run_one(data: bytes, rng: random.Random) -> None:
    for datagram in (True, False):
        try:
            msg = parse_message(data, datagram=datagram)
        except ParseError:
            continue
        again = parse_message(msg.serialize(), datagram=datagram)
        if again.start_line() != msg.start_line() or again.body != msg.body:
            raise AssertionError("round trip changed the message")
    try_parse_for_reply(data)
    try:
        _frame_all(data, rng)
    except ParseError:
        pass


def fuzz(inputs: int, seed: int, report_every: int) -> int:
    rng = random.Random(seed)
    pool = seeds()
    bugs = 0
    max_dt = 0.0
    max_input = b""
    t0 = time.perf_counter()
    for n in range(1, inputs + 1):
        data = mutate(rng, rng.choice(pool), pool)
        t = time.perf_counter()
        try:
            run_one(data, rng)
        except Exception:
            bugs += 1
            if bugs <= 5:
                print(f"BUG on input {n}: {data[:300]!r}", file=sys.stderr)
                traceback.print_exc()
        dt = time.perf_counter() - t
        if dt > max_dt:
            max_dt, max_input = dt, data
        if report_every and n % report_every == 0:
            el = time.perf_counter() - t0
            print(f"{n:>9} inputs  {n / el:8.0f}/s  bugs={bugs}  max={max_dt * 1e3:.2f} ms", flush=True)
    elapsed = time.perf_counter() - t0
    # The slowest input once more, alone: tells a scheduling hiccup from a slow code path.
    retimes = []
    for _ in range(5):
        t = time.perf_counter()
        try:
            run_one(max_input, random.Random(0))
        except Exception:
            pass
        retimes.append(time.perf_counter() - t)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"inputs:              {inputs}")
    print(f"seed:                {seed}")
    print(f"elapsed:             {elapsed:.1f} s")
    print(f"inputs/s:            {inputs / elapsed:.0f}")
    print(f"non-ParseError exceptions: {bugs}")
    print(f"max time per input:  {max_dt * 1e3:.2f} ms (input of {len(max_input)} bytes)")
    print(f"that input re-run:   {min(retimes) * 1e3:.2f} ms (best of 5)")
    print(f"peak RSS:            {rss_kb / 1024:.1f} MiB")
    return bugs


def bench() -> None:
    data = realistic_invite()
    msg = parse_message(data)
    assert msg.serialize() == data
    number = 20000
    for label, fn in (("parse_message", lambda: parse_message(data)), ("serialize", msg.serialize)):
        best = min(timeit.repeat(fn, number=number, repeat=7)) / number
        print(f"{label:14} {best * 1e6:7.2f} µs  ({len(data)}-byte INVITE, best of 7 x {number})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report-every", type=int, default=100_000)
    ap.add_argument("--bench", action="store_true", help="time parse and serialise instead of fuzzing")
    args = ap.parse_args(argv)
    if args.bench:
        bench()
        return 0
    return 1 if fuzz(args.inputs, args.seed, args.report_every) else 0


if __name__ == "__main__":
    sys.exit(main())
