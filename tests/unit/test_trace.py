"""The Tracer: text and pcap output, masking of phone numbers, size rotation, time limit."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

from proxy_runtime.operations.trace import (
    LINKTYPE_RAW,
    PCAP_MAGIC,
    TraceOptions,
    Tracer,
    mask_digits,
    mask_message,
)
from tests.conftest import require_tool


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


PASSPORT = (
    _b64({"alg": "ES256", "ppt": "shaken", "typ": "passport"})
    + "."
    + _b64({"attest": "A", "dest": {"tn": ["15555550100"]}, "orig": {"tn": "12025550123"}, "iat": 1})
    + ".c2lnbmF0dXJl"
)

INVITE = (
    "INVITE sip:+15555550100@acme.sip.clearip.com;user=phone SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds\r\n"
    'From: "+1 202 555 0123" <sip:+12025550123@10.0.0.1>;tag=1928301774\r\n'
    "To: <tel:+15555550100>\r\n"
    "Call-ID: a84b4c76e66710@10.0.0.1\r\n"
    "CSeq: 314159 INVITE\r\n"
    "P-Asserted-Identity: <sip:12025550123@10.0.0.1;user=phone>\r\n"
    f"Identity: {PASSPORT};info=<https://cert.example/c.pem>;alg=ES256;ppt=shaken\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: 22\r\n"
    "\r\n"
    "v=0\r\no=- 15555550100 1\r\n"
).encode()


# --- masking ----------------------------------------------------------------------------------


def test_mask_digits_keeps_the_last_digits_and_short_codes() -> None:
    assert mask_digits("+15555550100") == "+xxxxxxx0100"
    assert mask_digits("5550123") == "xxxxx23"
    assert mask_digits("911") == "911"
    assert mask_digits("1-202-555-0123") == "x-xxx-xxx-0123"


def test_mask_message_masks_uris_display_names_and_passport_claims() -> None:
    out = mask_message(INVITE).decode()
    for number in ("15555550100", "12025550123", "202 555 0123"):
        head = out.split("\r\n\r\n")[0]
        assert number not in head, head
    assert out.startswith("INVITE sip:+xxxxxxx0100@acme.sip.clearip.com;user=phone SIP/2.0\r\n")
    assert 'From: "+x xxx xxx 0123" <sip:+xxxxxxx0123@10.0.0.1>;tag=1928301774' in out
    assert "To: <tel:+xxxxxxx0100>" in out
    assert "P-Asserted-Identity: <sip:xxxxxxx0123@10.0.0.1;user=phone>" in out
    # Everything else byte for byte: Via, Call-ID, CSeq, tags, the body.
    for keep in (
        "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds",
        "Call-ID: a84b4c76e66710@10.0.0.1",
    ):
        assert keep in out
    assert out.endswith("\r\n\r\nv=0\r\no=- 15555550100 1\r\n")
    ident = next(line for line in out.split("\r\n") if line.startswith("Identity:"))
    payload = ident.split(":", 1)[1].strip().split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["orig"]["tn"] == "xxxxxxx0123" and claims["dest"]["tn"] == ["xxxxxxx0100"]
    assert claims["attest"] == "A"
    assert ident.endswith(";info=<https://cert.example/c.pem>;alg=ES256;ppt=shaken")


def test_mask_message_leaves_responses_status_line_and_garbage_alone() -> None:
    resp = b"SIP/2.0 302 Moved Temporarily\r\nContact: <sip:+15555550100@192.0.2.10>;q=0.9\r\n\r\n"
    assert (
        mask_message(resp)
        == b"SIP/2.0 302 Moved Temporarily\r\nContact: <sip:+xxxxxxx0100@192.0.2.10>;q=0.9\r\n\r\n"
    )
    assert mask_message(b"\xff\xfe garbage") == b"\xff\xfe garbage"


# --- text trace -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _tracer(tmp_path: Path, clock: FakeClock, name: str = "trace.txt", **kw: object) -> Tracer:
    opts = TraceOptions(output=str(tmp_path / name), **kw)  # type: ignore[arg-type]
    return Tracer(opts, local_host="10.0.0.5", ports={"udp": 5060, "tcp": 5060}, clock=clock, monotonic=clock)


def test_text_trace_is_readable_and_masked(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _tracer(tmp_path, clock)
    t.record("in", "udp", ("10.0.0.1", 5060), INVITE)
    t.record("out", "clearip", ("198.51.100.7", 5061), INVITE)
    t.stop()
    text = (tmp_path / "trace.txt").read_text()
    assert "==== 2023-11-14T22:13:20.000000Z <<< in  from UDP 10.0.0.1:5060" in text
    assert ">>> out to   CLEARIP 198.51.100.7:5061" in text
    assert "INVITE sip:+xxxxxxx0100@acme.sip.clearip.com;user=phone SIP/2.0\n" in text
    assert "12025550123" not in text
    assert t.status()["messages"] == 2 and not t.status()["active"]


def test_log_numbers_keeps_the_numbers(tmp_path: Path) -> None:
    t = _tracer(tmp_path, FakeClock(), log_numbers=True)
    t.record("in", "tcp", ("10.0.0.1", 40000), INVITE)
    t.stop()
    assert "sip:+12025550123@10.0.0.1" in (tmp_path / "trace.txt").read_text()


def test_rotation_keeps_at_most_max_files_of_at_most_max_bytes(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _tracer(tmp_path, clock, max_bytes=4096, max_files=3)
    for i in range(40):
        clock.now += 0.01
        t.record("in", "udp", ("10.0.0.1", 5060), INVITE.replace(b"314159", str(i).encode()))
    t.stop()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["trace.txt", "trace.txt.1", "trace.txt.2"]
    for name in files:
        assert 0 < (tmp_path / name).stat().st_size <= 4096
    # The newest file holds the last message; the oldest ones were deleted.
    assert "CSeq: 39 INVITE" in (tmp_path / "trace.txt").read_text()
    assert "CSeq: 0 INVITE" not in "".join((tmp_path / n).read_text() for n in files)
    st = t.status()
    assert st["messages"] == 40 and st["rotations"] > 2 and st["files_deleted"] == st["rotations"] - 2
    assert st["files"] == [str(tmp_path / n) for n in files]


def test_time_limit_stops_and_detaches(tmp_path: Path) -> None:
    clock = FakeClock()
    stopped: list[Tracer] = []
    opts = TraceOptions(output=str(tmp_path / "t.txt"), seconds=5)
    t = Tracer(opts, on_stop=stopped.append, clock=clock, monotonic=clock)
    t.record("in", "udp", ("10.0.0.1", 5060), INVITE)
    clock.now += 5.0
    t.record("in", "udp", ("10.0.0.1", 5060), INVITE)
    assert stopped == [t] and not t.active and t.stop_reason == "time limit reached"
    assert t.messages == 1
    t.stop()  # idempotent
    assert stopped == [t]


@pytest.mark.parametrize(
    "kw",
    [{"format": "xml"}, {"seconds": 0}, {"max_bytes": 100}, {"max_files": 0}, {"output": ""}],
)
def test_bad_options_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TraceOptions(**{"output": "/tmp/x", **kw}).validate()  # type: ignore[arg-type]


# --- pcap -------------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum, written here independently of the tracer's own routine: the
    ones' complement of the ones' complement sum of 16-bit words; 0 over a correct header."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _tcpdump(path: Path) -> list[str]:
    """Each packet as tcpdump reads it (-vv verifies the IPv4 header, UDP and TCP checksums; -tt
    prints epoch timestamps): one line per packet, its header and transport lines joined."""
    tcpdump = require_tool("tcpdump", "Debian package tcpdump")
    proc = subprocess.run(
        [tcpdump, "-r", str(path), "-nn", "-vv", "-tt", "-q"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "link-type RAW" in proc.stderr, proc.stderr
    packets: list[str] = []
    for line in proc.stdout.splitlines():
        if re.match(r"\d+\.\d{6} ", line):
            packets.append(line)
        else:
            assert packets, proc.stdout
            packets[-1] += " " + line.strip()
    for pkt in packets:
        for bad in ("bad", "incorrect", "[|", "truncated", "invalid"):
            assert bad not in pkt, pkt
    return packets


def _read_pcap(path: Path) -> list[tuple[float, bytes]]:
    data = path.read_bytes()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack("<IHHiIII", data[:24])
    assert (magic, major, minor, linktype) == (PCAP_MAGIC, 2, 4, LINKTYPE_RAW) and snaplen >= 65535
    out = []
    off = 24
    while off < len(data):
        sec, usec, incl, orig = struct.unpack("<IIII", data[off : off + 16])
        assert incl == orig
        out.append((sec + usec / 1e6, data[off + 16 : off + 16 + incl]))
        off += 16 + incl
    assert off == len(data)
    return out


def _decode(pkt: bytes) -> tuple[str, tuple[str, int], tuple[str, int], bytes, int]:
    """(proto, src, dst, payload, tcp seq) with every length and checksum verified."""
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0xF) * 4
        total, proto = struct.unpack("!H", pkt[2:4])[0], pkt[9]
        assert total == len(pkt) and _checksum(pkt[:ihl]) == 0
        src, dst = str(ipaddress.ip_address(pkt[12:16])), str(ipaddress.ip_address(pkt[16:20]))
        seg = pkt[ihl:]
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, proto, len(seg))
    else:
        assert version == 6
        plen, proto = struct.unpack("!H", pkt[4:6])[0], pkt[6]
        assert plen == len(pkt) - 40
        src, dst = str(ipaddress.ip_address(pkt[8:24])), str(ipaddress.ip_address(pkt[24:40]))
        seg = pkt[40:]
        pseudo = pkt[8:40] + struct.pack("!I3xB", len(seg), proto)
    assert _checksum(pseudo + seg) == 0, "bad transport checksum"
    sport, dport = struct.unpack("!HH", seg[:4])
    if proto == 17:
        assert struct.unpack("!H", seg[4:6])[0] == len(seg)
        return "udp", (src, sport), (dst, dport), seg[8:], 0
    assert proto == 6
    off = (seg[12] >> 4) * 4
    return "tcp", (src, sport), (dst, dport), seg[off:], struct.unpack("!I", seg[4:8])[0]


def test_pcap_has_consistent_ip_udp_tcp_headers(tmp_path: Path) -> None:
    clock = FakeClock()
    t = _tracer(tmp_path, clock, name="t.pcap", format="pcap", log_numbers=True)
    t.record("in", "udp", ("10.0.0.1", 5062), INVITE)
    clock.now += 0.25
    t.record("out", "clearip", ("198.51.100.7", 5061), INVITE)
    t.record("out", "clearip", ("198.51.100.7", 5061), b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n")
    t.record("in", "tls", ("2001:db8::1", 40001), INVITE)
    big = INVITE + b"a" * 70000  # larger than one IPv4 packet: split in TCP segments
    t.record("out", "udp", ("10.0.0.9", 5060), big)
    t.stop()
    # tcpdump, an independent reader: six packets, every checksum verified, as written.
    seen = _tcpdump(tmp_path / "t.pcap")
    assert len(seen) == 6, seen
    assert seen[0].startswith("1700000000.000000 IP ") and seen[1].startswith("1700000000.250000 IP ")
    assert "10.0.0.1.5062 > 10.0.0.5.5060: [udp sum ok] UDP, length 675" in seen[0], seen[0]
    assert "10.0.0.5.5060 > 198.51.100.7.5061: tcp 675" in seen[1], seen[1]
    assert "IP6 " in seen[3] and "2001:db8::1.40001 > ::1.5060: tcp 675" in seen[3], seen[3]
    assert [re.findall(r"tcp (\d+)", p) for p in seen[4:]] == [["65000"], [str(len(big) - 65000)]], seen[4:]
    pkts = [(_t, _decode(p)) for _t, p in _read_pcap(tmp_path / "t.pcap")]
    (t0, first), (t1, second), (_, third), (_, fourth) = pkts[:4]
    assert first[:4] == ("udp", ("10.0.0.1", 5062), ("10.0.0.5", 5060), INVITE)
    assert abs(t0 - 1_700_000_000.0) < 1e-6 and abs(t1 - t0 - 0.25) < 1e-5
    # ClearIP over TLS appears as TCP from our port 5060 (so Wireshark dissects SIP, not TLS).
    assert second[:4] == ("tcp", ("10.0.0.5", 5060), ("198.51.100.7", 5061), INVITE)
    assert third[4] == second[4] + len(INVITE)  # one flow: sequence numbers continue
    assert fourth[:4] == ("tcp", ("2001:db8::1", 40001), ("::1", 5060), INVITE)
    rest = [p for _, p in pkts[4:]]
    assert len(rest) == 2 and all(p[0] == "tcp" for p in rest)
    assert b"".join(p[3] for p in rest) == big
    assert rest[1][4] == rest[0][4] + len(rest[0][3])


def test_pcap_rotation_starts_each_file_with_a_header(tmp_path: Path) -> None:
    t = _tracer(tmp_path, FakeClock(), name="t.pcap", format="pcap", max_bytes=4096, max_files=2)
    for _ in range(10):
        t.record("in", "udp", ("10.0.0.1", 5062), INVITE)
    t.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.pcap", "t.pcap.1"]
    for name in ("t.pcap", "t.pcap.1"):
        assert all(_decode(p)[3] == mask_message(INVITE) for _, p in _read_pcap(tmp_path / name))
        assert len(_tcpdump(tmp_path / name)) == len(_read_pcap(tmp_path / name)) > 0


def test_hostile_messages_never_raise_into_the_proxy(tmp_path: Path) -> None:
    deep = b"[" * 100_000
    ident = b"Identity: a." + base64.urlsafe_b64encode(deep).rstrip(b"=") + b".c\r\n"
    msg = b"INVITE sip:1@x SIP/2.0\r\n" + ident + b"From: <sip:+15555550100@x>\r\n\r\n"
    for fmt in ("text", "pcap"):
        t = _tracer(tmp_path, FakeClock(), name=f"h.{fmt}", format=fmt)
        t.record("in", "udp", ("not-an-ip", 99999), msg)
        t.record("in", "udp", ("10.0.0.1", 5060), b"\x00\xff" * 10)
        t.stop()
        assert t.messages + t.skipped == 2
