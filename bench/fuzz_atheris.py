"""Coverage-guided fuzzing of the SIP parser and stream framer with atheris (libFuzzer).

    make fuzz                     # = python -m bench.fuzz_atheris -runs=1000000 (seeds: RFC 4475)

Each input goes through ``parse_message`` (datagram and stream modes; a parsed message must
serialise and parse again), ``try_parse_for_reply`` and a ``StreamFramer`` fed in two chunks.
Any exception other than ParseError is a crash; libFuzzer's -timeout and -rss_limit_mb catch hangs
and unbounded memory. The corpus starts from the RFC 4475 messages kept in the repository,
tests/data/rfc4475/*.dat. atheris is pinned in requirements-fuzz.txt (not needed by the proxy or
the test suite).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from proxy_runtime.sip.errors import ParseError
    from proxy_runtime.sip.framing import StreamFramer
    from proxy_runtime.sip.parse import parse_message, try_parse_for_reply

SEEDS = Path(__file__).resolve().parents[1] / "tests" / "data" / "rfc4475"


def one_input(data: bytes) -> None:
    for datagram in (True, False):
        try:
            msg = parse_message(data, datagram=datagram)
        except ParseError:
            continue
        again = parse_message(msg.serialize(), datagram=False)
        if again.start_line() != msg.start_line() or again.body != msg.body:
            raise AssertionError("serialise -> parse changed the message")
    try_parse_for_reply(data)
    framer = StreamFramer(65535)
    cut = len(data) // 2
    try:
        for chunk in (data[:cut], data[cut:]):
            framer.feed(chunk)
            while (frame := framer.next_frame()) is not None:
                try:
                    parse_message(frame, datagram=False)
                except ParseError:
                    pass
    except ParseError:
        pass  # FramingError: the connection would be closed


def main() -> None:
    args = list(sys.argv)
    corpus = tempfile.mkdtemp(prefix="sip-corpus-")
    seeds = sorted(SEEDS.glob("*.dat"))
    if not seeds:
        sys.exit(f"no seed corpus: {SEEDS} holds no .dat files (the RFC 4475 messages)")
    for seed in seeds:
        shutil.copy(seed, corpus)
    if not any(a.startswith("-timeout") for a in args):
        args.append("-timeout=5")
    if not any(a.startswith("-rss_limit_mb") for a in args):
        args.append("-rss_limit_mb=1024")
    args.append(corpus)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
