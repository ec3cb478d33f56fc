"""Stream framing by Content-Length (RFC 3261 §18.3) and RFC 5626 keep-alives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_runtime.core import build_kind
from proxy_runtime.sip import framing
from proxy_runtime.sip.framing import PING, PONG, FramingError, StreamFramer
from proxy_runtime.sip.parse import find_head_end, parse_message
from tests import growth


def msg(n: int, body: bytes = b"", cl_name: str = "Content-Length") -> bytes:
    head = (
        f"OPTIONS sip:x@example.com SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK{n}\r\n"
        f"From: <sip:a@b>;tag={n}\r\nTo: <sip:x@example.com>\r\nCall-ID: {n}\r\nCSeq: {n} OPTIONS\r\n"
        f"{cl_name}: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


MESSAGES = [
    msg(1),
    msg(2, b"v=0\r\n\r\n\r\nbody with blank lines"),
    msg(3, b"x" * 300, "l"),
    msg(4, b"\r\n\r\n"),
]


def frames(framer: StreamFramer) -> list[bytes]:
    out = []
    while (f := framer.next_frame()) is not None:
        out.append(f)
    return out


def test_whole_messages() -> None:
    framer = StreamFramer()
    framer.feed(b"".join(MESSAGES))
    assert frames(framer) == MESSAGES
    assert framer.buffered == 0
    for m in MESSAGES:
        parse_message(m, datagram=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(b"".join(MESSAGES))), max_size=40))
def test_any_chunking_yields_exactly_the_messages(cuts: list[int]) -> None:
    data = b"".join(MESSAGES)
    points = sorted(set(cuts))
    framer = StreamFramer()
    out: list[bytes] = []
    prev = 0
    for p in [*points, len(data)]:
        framer.feed(data[prev:p])
        prev = p
        out.extend(frames(framer))
    assert out == MESSAGES


def test_byte_at_a_time() -> None:
    framer = StreamFramer()
    out = []
    for b in b"".join(MESSAGES):
        framer.feed(bytes([b]))
        out.extend(frames(framer))
    assert out == MESSAGES


def test_keepalive_ping_and_pong() -> None:
    framer = StreamFramer()
    framer.feed(PING)
    assert framer.next_frame() == PING
    framer.feed(PONG + MESSAGES[0])  # a pong before a message is skipped
    assert framer.next_frame() == MESSAGES[0]
    framer.feed(b"\r")
    assert framer.next_frame() is None
    framer.feed(b"\n\r")
    assert framer.next_frame() is None
    framer.feed(b"\n")
    assert framer.next_frame() == PING
    framer.feed(PING + PING + MESSAGES[1])
    assert frames(framer) == [PING, PING, MESSAGES[1]]


def test_oversize_head_and_body_are_513() -> None:
    framer = StreamFramer(max_size=2000)
    framer.feed(b"INVITE sip:x SIP/2.0\r\nX: " + b"a" * 2100)
    with pytest.raises(FramingError) as err:
        framer.next_frame()
    assert err.value.status_hint == 513
    framer = StreamFramer(max_size=2000)
    framer.feed(msg(1, b"b" * 1900))
    with pytest.raises(FramingError) as err:
        framer.next_frame()
    assert err.value.status_hint == 513
    assert err.value.head.startswith(b"OPTIONS ")


@pytest.mark.parametrize(
    "cl_lines",
    [
        b"Content-Length: 5\r\nl: 6\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: x\r\n",
        b"l: 1234567890\r\n",
    ],
)
def test_bad_or_conflicting_content_length(cl_lines: bytes) -> None:
    framer = StreamFramer()
    framer.feed(msg(1).replace(b"Content-Length: 0\r\n", cl_lines))
    with pytest.raises(FramingError) as err:
        framer.next_frame()
    assert err.value.status_hint == 400
    assert err.value.head


def test_equal_duplicate_content_length_and_folding() -> None:
    framer = StreamFramer()
    framer.feed(
        msg(1, b"abc").replace(b"Content-Length: 3\r\n", b"Content-Length: 3\r\nl:\r\n 3\r\n") + b"NEXT"
    )
    frame = framer.next_frame()
    assert frame is not None and frame.endswith(b"abc")
    assert parse_message(frame, datagram=False).body == b"abc"


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
@pytest.mark.parametrize("name", [b"Content-Length", b"content-LENGTH", b"l", b"L"])
def test_content_length_in_any_header_position_case_and_line_ending(name: bytes, eol: bytes) -> None:
    """First header, last header, any case, compact form, bare LF: the body is framed by it, and a
    header merely ending in "l" or a value mentioning content-length is not taken for it."""
    body = b"0123456789"
    first = b"INVITE sip:x@example.com SIP/2.0" + eol + name + b" : 10" + eol + b"Call-ID: 1" + eol
    last = (
        b"SIP/2.0 302 Moved"
        + eol
        + b"Subject: content-length: 99"
        + eol
        + b"Xl: 7"
        + eol
        + name
        + b": 10"
        + eol
    )
    for head in (first, last):
        framer = StreamFramer()
        framer.feed(head + eol + body + b"NEXT")
        frame = framer.next_frame()
        assert frame == head + eol + body


def test_no_content_length_means_no_body() -> None:
    framer = StreamFramer()
    framer.feed(msg(1).replace(b"Content-Length: 0\r\n", b"") + MESSAGES[1])
    assert len(frames(framer)) == 2


class QuadraticFramer:
    """What the framer must not be: it searches the whole buffer for the head's end on every call
    (the slow-loris trap). Used to show the growth tests below catch quadratic framing."""

    def __init__(self, max_size: int = 65535) -> None:
        self.buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_frame(self) -> bytes | None:
        if find_head_end(self.buf, 0) is None:
            return None
        raise AssertionError("the trickled head never ends")


LINE = b"X-Pad: " + b"a" * 50 + b"\r\n"


def trickle(framer: StreamFramer | QuadraticFramer, lines: int, chunk: int = 16) -> None:
    """A head of ``lines`` header lines fed ``chunk`` bytes at a time, asking for a frame each time."""
    data = b"OPTIONS sip:x SIP/2.0\r\n" + LINE * lines
    for i in range(0, len(data), chunk):
        framer.feed(data[i : i + chunk])
        assert framer.next_frame() is None


Framer = type[StreamFramer] | type[QuadraticFramer]


def scanned(monkeypatch: pytest.MonkeyPatch, make: Framer, lines: int) -> int:
    """Octets the framer asked ``find_head_end`` to search while a head trickled in."""
    total = 0
    real = find_head_end

    def counting(data: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
        nonlocal total
        total += len(data) - start
        return real(data, start)

    with monkeypatch.context() as patch:
        patch.setattr(framing, "find_head_end", counting)  # what StreamFramer calls
        patch.setattr(f"{__name__}.find_head_end", counting)  # what QuadraticFramer calls
        trickle(make(max_size=1 << 20), lines)
    return total


@pytest.mark.parametrize("make", [StreamFramer, QuadraticFramer])
def test_slow_loris_head_costs_linear_octets_scanned(monkeypatch: pytest.MonkeyPatch, make: Framer) -> None:
    """A head trickled in 16 octets at a time must not be re-scanned from its start each time:
    8 times the head, at most ~8 times the octets searched (a re-scanning framer: ~64 times)."""
    if make is StreamFramer and build_kind() == "compiled":
        # mypyc binds the call to find_head_end at compile time: nothing to count through. The
        # same source runs (and is checked here) in the pure-Python run of `make test`.
        pytest.skip("the compiled framer's calls cannot be counted by patching its module")
    small, large = scanned(monkeypatch, make, 100), scanned(monkeypatch, make, 800)
    linear = large / small <= growth.LINEAR_BOUND
    assert linear == (make is StreamFramer), f"{make.__name__}: {small} -> {large} octets scanned"


@pytest.mark.parametrize("make", [StreamFramer, QuadraticFramer])
def test_slow_loris_head_costs_linear_cpu_time(make: Framer) -> None:
    """The same in CPU time, which also catches work outside the head search (copies, re-parsing)."""
    ratio, large = growth.confirmed_growth(lambda lines: lambda: trickle(make(max_size=1 << 20), lines), 200)
    assert large >= growth.FLOOR_S, "the run is too short to measure"
    linear = ratio <= growth.LINEAR_BOUND
    assert linear == (make is StreamFramer), f"{make.__name__}: cost grew {ratio:.1f}x for 8x the head"
