"""A hand-built TLS ClientHello, to ask a TLS server what it accepts.

Python's ``ssl`` (OpenSSL 3) cannot *offer* what a hardened server must refuse: TLS 1.0/1.1 need
SECLEVEL tricks that distributions disable, and RC4, DES, 3DES and EXPORT suites are not compiled
in at all. A test built on it fails on the client's own side and proves nothing about the server.
So this module writes the ClientHello record itself (RFC 5246 §7.4.1.2, RFC 8422 for the EC
extensions) with exactly the version and cipher suites under test, sends it over a plain socket,
and reads the server's first record: a ServerHello means the server accepted the offer; an alert
(or a closed connection) means it refused. Only the first flight is needed, so no library does it
better: scapy's TLS layer or tlslite would be a large dependency for ~60 lines.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

TLS1_0, TLS1_1, TLS1_2 = 0x0301, 0x0302, 0x0303

# Cipher suite code points (IANA TLS Cipher Suites registry). The ECDHE_ECDSA ones matter most: the
# servers under test hold an EC (P-256) certificate, so only ECDSA-authenticated or anonymous
# suites could ever be chosen; RSA-only suites are listed too, for completeness.
STRONG_ECDHE_ECDSA_AES128_GCM = 0xC02B  # what a TLS 1.2 server must accept (the control case)
ECDHE_ECDSA_AES128_SHA = 0xC009  # the usual TLS 1.0/1.1 suite, for the version probes
NULL_SUITES = (0x0001, 0x0002, 0x003B, 0xC006, 0xC010, 0xC015)  # eNULL: no encryption
ANON_SUITES = (0x0034, 0x00A6, 0xC018, 0xC019)  # aNULL: no authentication (ADH, AECDH)
EXPORT_SUITES = (0x0003, 0x0006, 0x0008, 0x0014, 0x0017, 0x0019)  # 40-bit export grade
RC4_DES_3DES_MD5_SUITES = (
    0x0004,  # RSA_WITH_RC4_128_MD5
    0x0005,  # RSA_WITH_RC4_128_SHA
    0xC007,  # ECDHE_ECDSA_WITH_RC4_128_SHA
    0x0009,  # RSA_WITH_DES_CBC_SHA
    0x000A,  # RSA_WITH_3DES_EDE_CBC_SHA
    0xC008,  # ECDHE_ECDSA_WITH_3DES_EDE_CBC_SHA
)

ALERT, HANDSHAKE = 0x15, 0x16
SERVER_HELLO = 2


def client_hello(version: int, suites: tuple[int, ...] | list[int], server_name: str = "localhost") -> bytes:
    """One TLS record holding a ClientHello that offers ``version`` (no supported_versions
    extension, so nothing above it) and exactly ``suites``."""

    def ext(kind: int, body: bytes) -> bytes:
        return struct.pack("!HH", kind, len(body)) + body

    name = server_name.encode()
    sni = struct.pack("!H", len(name) + 3) + b"\x00" + struct.pack("!H", len(name)) + name
    extensions = b"".join(
        (
            ext(0, sni),  # server_name
            ext(10, struct.pack("!HHH", 4, 0x0017, 0x0018)),  # supported_groups: P-256, P-384
            ext(11, b"\x01\x00"),  # ec_point_formats: uncompressed
            # signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256,
            # ecdsa_sha1, rsa_pkcs1_sha1 (the last two for TLS 1.0/1.1 offers)
            ext(13, struct.pack("!H5H", 10, 0x0403, 0x0804, 0x0401, 0x0203, 0x0201)),
            ext(0xFF01, b"\x00"),  # renegotiation_info (RFC 5746), empty
        )
    )
    body = struct.pack("!H", version) + os.urandom(32) + b"\x00"  # random, empty session id
    body += struct.pack("!H", 2 * len(suites)) + b"".join(struct.pack("!H", s) for s in suites)
    body += b"\x01\x00"  # compression: null only
    body += struct.pack("!H", len(extensions)) + extensions
    handshake = bytes([1]) + len(body).to_bytes(3, "big") + body  # client_hello
    # Record layer version: TLS 1.0 for the first record, as real clients send it.
    return struct.pack("!BHH", HANDSHAKE, TLS1_0, len(handshake)) + handshake


@dataclass(frozen=True)
class Answer:
    """The server's first record: ``accepted`` when it is a ServerHello."""

    accepted: bool
    alert: int | None  # the alert description when refused with an alert (40, 70, 71...)
    server_version: int | None  # the ServerHello's version when accepted
    suite: int | None  # the ServerHello's chosen suite when accepted

    def __str__(self) -> str:
        if self.accepted:
            return f"ServerHello version 0x{self.server_version:04x} suite 0x{self.suite:04x}"
        return f"refused (alert {self.alert})" if self.alert is not None else "refused (connection closed)"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def probe(
    host: str, port: int, version: int, suites: tuple[int, ...] | list[int], timeout: float = 5
) -> Answer:
    """Send one ClientHello and classify the server's first record."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(client_hello(version, suites))
        try:
            header = _recv_exact(sock, 5)
        except ConnectionResetError:
            return Answer(False, None, None, None)
        if len(header) < 5:
            return Answer(False, None, None, None)
        kind, _, length = struct.unpack("!BHH", header)
        payload = _recv_exact(sock, length)
    if kind == ALERT and len(payload) >= 2:
        return Answer(False, payload[1], None, None)
    if kind == HANDSHAKE and payload[:1] == bytes([SERVER_HELLO]):
        # ServerHello: type(1) length(3) version(2) random(32) session_id(1 + n) cipher_suite(2)
        server_version = struct.unpack("!H", payload[4:6])[0]
        sid_len = payload[38]
        suite = struct.unpack("!H", payload[39 + sid_len : 41 + sid_len])[0]
        return Answer(True, None, server_version, suite)
    raise AssertionError(f"unexpected first TLS record type {kind}: {payload[:16]!r}")
