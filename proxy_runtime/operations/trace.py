"""SIP call traces without a packet capture: every message the proxy receives or sends, decrypted.

A :class:`Tracer` is attached to the running :class:`~proxy_runtime.transport.server.ProxyServer` (its
``tracer`` attribute) and receives ``record(direction, transport, peer, data)`` for each message.
It writes either a readable text trace or a pcap file that Wireshark decodes as SIP, and enforces
its limits itself: at most ``max_bytes`` per file, ``max_files`` files (the oldest is deleted when
a new one starts: ``trace.txt`` is the newest, ``trace.txt.1`` the one before, ...), and an end time
after which it closes and detaches. Phone numbers are masked unless ``log_numbers`` is set.

No asyncio here: the control server (:mod:`.control`) schedules the time limit with the
loop, and :meth:`Tracer.record` also checks it, so a trace never outlives its deadline by more than
one message. Writes go to a buffered file object; a trace costs a few microseconds a message.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from proxy_runtime.metrics.privacy import mask_digits

FORMATS = ("text", "pcap")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_FILES = 5
DEFAULT_SECONDS = 300.0
MAX_SECONDS = 24 * 3600.0

# ---------------------------------------------------------------------------------------------
# Masking phone numbers
# ---------------------------------------------------------------------------------------------

# Headers whose values name parties (URIs and display names). Compact forms: f, t.
_PARTY_HEADERS = frozenset(
    {
        "from",
        "f",
        "to",
        "t",
        "p-asserted-identity",
        "p-preferred-identity",
        "remote-party-id",
        "diversion",
        "history-info",
        "contact",
        "m",
        "refer-to",
        "r",
        "referred-by",
        "b",
        "p-charge-info",
        "p-called-party-id",
    }
)
_IDENTITY_HEADERS = frozenset({"identity", "y"})
# The user part of a sip:/sips:/tel: URI: everything up to '@' (sip) or to ';', '>', ',' or space.
_URI_USER = re.compile(r"(?i)\b(sips?:|tel:)([^@;>,\s\"]+)")
_DISPLAY_DIGITS = re.compile(r"\+?\d[\d\-. ()]{4,}\d")


def _mask_uri_users(value: str) -> str:
    def user(m: re.Match[str]) -> str:
        return m.group(1) + mask_digits(m.group(2))

    return _URI_USER.sub(user, value)


def _mask_party_value(value: str) -> str:
    value = _mask_uri_users(value)
    # A display name before '<' may carry the number too ("+12025550100" <sip:...>).
    lt = value.find("<")
    if lt > 0:
        name = _DISPLAY_DIGITS.sub(lambda m: mask_digits(m.group(0)), value[:lt])
        value = name + value[lt:]
    return value


def _mask_tn(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: (_mask_tn_value(v) if k in ("tn", "uri") else _mask_tn(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask_tn(v) for v in obj]
    return obj


def _mask_tn_value(v: Any) -> Any:
    if isinstance(v, str):
        return mask_digits(v)
    if isinstance(v, list):
        return [mask_digits(x) if isinstance(x, str) else x for x in v]
    return v


def _mask_identity(value: str) -> str:
    """RFC 8224 Identity: the PASSporT's claims carry the numbers (orig/dest/div ``tn``). Decode the
    JWS payload, mask them, encode again (the signature no longer matches: this is a trace)."""
    token, sep, params = value.partition(";")
    parts = token.strip().split(".")
    if len(parts) != 3:
        return value
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return value
    masked = json.dumps(_mask_tn(claims), separators=(",", ":")).encode()
    parts[1] = base64.urlsafe_b64encode(masked).rstrip(b"=").decode()
    return ".".join(parts) + sep + params


def mask_message(data: bytes) -> bytes:
    """The message with the phone numbers of its Request-URI and party headers masked; the body
    (SDP) and every other header are left byte for byte."""
    end = data.find(b"\r\n\r\n")
    head, rest = (data, b"") if end < 0 else (data[:end], data[end:])
    text = head.decode("utf-8", "surrogateescape")
    lines = text.split("\r\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        if i == 0:
            parts = line.split(" ")
            if len(parts) == 3 and not line.startswith("SIP/"):
                parts[1] = _mask_uri_users(parts[1])
                line = " ".join(parts)
            out.append(line)
            continue
        name, colon, value = line.partition(":")
        key = name.strip().lower()
        if not colon or line[:1] in (" ", "\t"):
            # A folded continuation line: mask its URIs as a party value would be.
            out.append(_mask_uri_users(line))
        elif key in _PARTY_HEADERS:
            out.append(name + colon + _mask_party_value(value))
        elif key in _IDENTITY_HEADERS:
            lead = value[: len(value) - len(value.lstrip())]
            out.append(name + colon + lead + _mask_identity(value.lstrip()))
        else:
            out.append(line)
    return "\r\n".join(out).encode("utf-8", "surrogateescape") + rest


# ---------------------------------------------------------------------------------------------
# Writers: text and pcap
# ---------------------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_RAW = 101  # raw IPv4/IPv6: no link-layer header
PCAP_SNAPLEN = 262144
_MAX_SEGMENT = 65000  # payload per fake packet: an IPv4 total length is 16 bits


class PcapEncoder:
    """Wraps SIP messages in fake but consistent IPv4/IPv6 + UDP/TCP headers (correct lengths and
    checksums, TCP sequence numbers per flow), so Wireshark dissects them as SIP."""

    def __init__(self, local_host: str, ports: dict[str, int]) -> None:
        self.local_host = local_host
        self.ports = ports
        self._seq: dict[tuple[str, int, str, int], int] = {}

    @staticmethod
    def file_header() -> bytes:
        return struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, PCAP_SNAPLEN, LINKTYPE_RAW)

    def _local(self, transport: str, version: int) -> tuple[str, int]:
        try:
            ip = ipaddress.ip_address(self.local_host)
        except ValueError:
            ip = ipaddress.ip_address("127.0.0.1")
        if ip.version != version or ip.is_unspecified:
            ip = ipaddress.ip_address("127.0.0.1" if version == 4 else "::1")
        # Decrypted TLS (switch listener or ClearIP) appears as TCP from our SIP port 5060 side, so
        # Wireshark's SIP dissector (not TLS, registered on 5061) reads it.
        return str(ip), self.ports.get(transport if transport in ("udp", "tcp") else "tcp", 5060)

    def packets(self, direction: str, transport: str, peer: tuple[str, int], data: bytes) -> list[bytes]:
        try:
            peer_ip = ipaddress.ip_address(peer[0])
        except ValueError:
            peer_ip = ipaddress.ip_address("192.0.2.1")  # unknown peer: TEST-NET-1
        if peer_ip.version == 6 and peer_ip.ipv4_mapped is not None:
            peer_ip = peer_ip.ipv4_mapped
        local_ip, local_port = self._local(transport, peer_ip.version)
        here = (local_ip, local_port)
        there = (str(peer_ip), int(peer[1]))
        src, dst = (there, here) if direction == "in" else (here, there)
        if transport == "udp" and len(data) <= _MAX_SEGMENT:
            return [self._ip(src[0], dst[0], 17, self._udp(src, dst, data))]
        out = []
        flow = (src[0], src[1], dst[0], dst[1])
        seq = self._seq.get(flow, 1)
        for i in range(0, max(len(data), 1), _MAX_SEGMENT):
            chunk = data[i : i + _MAX_SEGMENT]
            out.append(self._ip(src[0], dst[0], 6, self._tcp(src, dst, seq, chunk)))
            seq = (seq + len(chunk)) & 0xFFFFFFFF
        self._seq[flow] = seq
        return out

    @staticmethod
    def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
        s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
        if len(s) == 4:
            return s + d + struct.pack("!BBH", 0, proto, length)
        return s + d + struct.pack("!I3xB", length, proto)

    def _udp(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> bytes:
        length = 8 + len(data)
        head = struct.pack("!HHHH", src[1], dst[1], length, 0)
        csum = _checksum(self._pseudo(src[0], dst[0], 17, length) + head + data) or 0xFFFF
        return struct.pack("!HHHH", src[1], dst[1], length, csum) + data

    def _tcp(self, src: tuple[str, int], dst: tuple[str, int], seq: int, data: bytes) -> bytes:
        flags = 0x18  # PSH, ACK
        head = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, 1, 5 << 4, flags, 65535, 0, 0)
        csum = _checksum(self._pseudo(src[0], dst[0], 6, 20 + len(data)) + head + data)
        return struct.pack("!HHIIBBHHH", src[1], dst[1], seq, 1, 5 << 4, flags, 65535, csum, 0) + data

    @staticmethod
    def _ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
        s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
        if len(s) == 16:
            return struct.pack("!IHBB", 6 << 28, len(payload), proto, 64) + s + d + payload
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, s, d)
        csum = _checksum(head)
        return head[:10] + struct.pack("!H", csum) + head[12:] + payload

    @staticmethod
    def record(when: float, packet: bytes) -> bytes:
        sec = int(when)
        usec = int((when - sec) * 1_000_000)
        return struct.pack("<IIII", sec, usec, len(packet), len(packet)) + packet


def _text_record(when: float, direction: str, transport: str, peer: tuple[str, int], data: bytes) -> bytes:
    stamp = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    arrow = "<<< in  from" if direction == "in" else ">>> out to  "
    host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
    head = f"==== {stamp} {arrow} {transport.upper()} {host}:{peer[1]} ({len(data)} bytes)\n"
    body = data.replace(b"\r\n", b"\n")
    if not body.endswith(b"\n"):
        body += b"\n"
    return head.encode() + body + b"\n"


# ---------------------------------------------------------------------------------------------
# The tracer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceOptions:
    output: str
    format: str = "text"
    seconds: float = DEFAULT_SECONDS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES
    log_numbers: bool = False

    def validate(self) -> TraceOptions:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 < self.seconds <= MAX_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], got {self.seconds}")
        if self.max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {self.max_bytes}")
        if not 1 <= self.max_files <= 100:
            raise ValueError(f"max_files must be between 1 and 100, got {self.max_files}")
        if not self.output:
            raise ValueError("output is required")
        return self


class Tracer:
    """Writes the messages given to :meth:`record` until :meth:`stop` or its time limit.

    ``on_stop`` is called once when the tracer stops itself (time limit, write error), so its owner
    can detach it. ``clock`` (wall time, for timestamps) and ``monotonic`` (for the limit) are
    injectable for tests.
    """

    def __init__(
        self,
        options: TraceOptions,
        *,
        local_host: str = "127.0.0.1",
        ports: dict[str, int] | None = None,
        on_stop: Callable[[Tracer], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options.validate()
        self.path = Path(options.output)
        self.log_numbers = options.log_numbers
        self._clock = clock
        self._monotonic = monotonic
        self.started = clock()
        self.deadline = monotonic() + options.seconds
        self._on_stop = on_stop
        self._pcap = PcapEncoder(local_host, dict(ports or {})) if options.format == "pcap" else None
        self.messages = 0
        self.bytes_written = 0  # over all files
        self.rotations = 0
        self.files_deleted = 0
        self.skipped = 0  # messages that could not be encoded (never raised into the proxy)
        self.error = ""
        self.stop_reason = ""
        self.active = True
        self._file: IO[bytes] | None = None
        self._file_size = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open_new()

    # --- files ----------------------------------------------------------------------------
    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _open_new(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        self._file = os.fdopen(fd, "wb", buffering=64 * 1024)
        self._file_size = 0
        if self._pcap is not None:
            self._write_raw(PcapEncoder.file_header())

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        keep = self.options.max_files
        if keep <= 1:
            self.files_deleted += 1  # the only file starts again
        else:
            oldest = self._rotated(keep - 1)
            if oldest.exists():
                oldest.unlink()
                self.files_deleted += 1
            for n in range(keep - 2, 0, -1):
                if self._rotated(n).exists():
                    self._rotated(n).rename(self._rotated(n + 1))
            self.path.rename(self._rotated(1))
        self.rotations += 1
        self._open_new()

    def _write_raw(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file_size += len(data)
        self.bytes_written += len(data)

    @property
    def files(self) -> list[str]:
        """The trace files, newest first."""
        out = [str(self.path)] if self.path.exists() else []
        out += [str(self._rotated(n)) for n in range(1, self.options.max_files) if self._rotated(n).exists()]
        return out

    # --- the proxy's hook -----------------------------------------------------------------
    def record(self, direction: str, transport: str, peer: tuple[str, int], data: bytes) -> None:
        if not self.active:
            return
        if self._monotonic() >= self.deadline:
            self.stop("time limit reached")
            return
        when = self._clock()
        try:
            if not self.log_numbers:
                data = mask_message(data)
            if self._pcap is not None:
                chunk = b"".join(
                    PcapEncoder.record(when, p) for p in self._pcap.packets(direction, transport, peer, data)
                )
            else:
                chunk = _text_record(when, direction, transport, peer, data)
        except Exception:  # hostile input must never break the proxy's receive path
            self.skipped += 1
            return
        try:
            header = 24 if self._pcap is not None else 0
            if self._file_size > header and self._file_size + len(chunk) > self.options.max_bytes:
                self._rotate()
            self._write_raw(chunk)
        except OSError as exc:
            self.error = str(exc)
            self.stop(f"write error: {exc}")
            return
        self.messages += 1

    def stop(self, reason: str = "stopped") -> None:
        """Flush and close; idempotent."""
        if not self.active:
            return
        self.active = False
        self.stop_reason = reason
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self.error = self.error or str(exc)
            self._file = None
        if self._on_stop is not None:
            self._on_stop(self)

    def status(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "output": str(self.path),
            "format": self.options.format,
            "files": self.files,
            "messages": self.messages,
            "bytes": self.bytes_written,
            "rotations": self.rotations,
            "files_deleted": self.files_deleted,
            "skipped": self.skipped,
            "max_bytes": self.options.max_bytes,
            "max_files": self.options.max_files,
            "numbers_masked": not self.log_numbers,
            "seconds_left": max(0.0, round(self.deadline - self._monotonic(), 1)) if self.active else 0.0,
            "stop_reason": self.stop_reason,
            "error": self.error,
        }


__all__ = ["FORMATS", "PcapEncoder", "TraceOptions", "Tracer", "mask_digits", "mask_message"]
