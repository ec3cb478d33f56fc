"""Integration harness: the proxy as a real process, SIPp peers, their message traces, TLS helpers.

Everything binds 127.0.0.1, every wait is bounded, and every process started here is stopped by
:meth:`Lab.close` (the ``lab`` fixture calls it even when the test fails).

Roles, as in DESIGN.md §2: the *switch* is a SIPp UAC sending to the proxy; *ClearIP* is a SIPp UAS
over TCP (or behind :class:`TlsRelay` for TLS); *carriers* are SIPp UASes over UDP or TCP whose
ports appear in ClearIP's 302 Contact list. Tests assert on what each peer received, read from the
SIPp ``-trace_msg`` files by :func:`parse_trace`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import free_port as free_port  # one implementation for the tests and the benchmark
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]


def proxy_pythonpath() -> str:
    """PYTHONPATH for a proxy (or CLI) process a test starts: the compiled build first under
    ``make test-compiled`` (CLEARIP_COMPILED_DIR, tests/conftest.py), then the repository."""
    compiled = os.environ.get("CLEARIP_COMPILED_DIR", "")
    return os.pathsep.join([*([str(Path(compiled).resolve())] if compiled else []), str(REPO)])


# (Not CLEARIP_PROXY_*: that prefix is the settings'.)
# `python -P -m proxy_runtime`: -P keeps the working directory (the repository) off the front of
# sys.path, so PYTHONPATH decides which build runs.
PROXY_MODULE = [sys.executable, "-P", "-m", "proxy_runtime"]
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
HOST = "127.0.0.1"
SIPP = shutil.which("sipp") or "/usr/bin/sipp"

PROXY_READY_TIMEOUT = 10.0
PROXY_STOP_TIMEOUT = 8.0
SIPP_DEFAULT_TIMEOUT = 15.0

# ---------------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------------


def _listening(port: int, transport: str) -> bool:
    """Whether something listens on 127.0.0.1:port (TCP LISTEN, or a bound UDP socket), via /proc."""
    table = "/proc/net/tcp" if transport in ("tcp", "tls") else "/proc/net/udp"
    want_addr = f"0100007F:{port:04X}"
    any_addr = f"00000000:{port:04X}"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return True  # cannot tell: assume yes
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or parts[1] not in (want_addr, any_addr):
            continue
        if table.endswith("tcp") and parts[3] != "0A":
            continue
        return True
    return False


def established(port: int) -> int:
    """How many ESTABLISHED TCP connections have 127.0.0.1:port as their local end (via /proc)."""
    want = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return 1
    return sum(1 for ln in lines if (p := ln.split()) and len(p) > 3 and p[1] == want and p[3] == "01")


def wait_established(port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if established(port):
            return True
        time.sleep(0.02)
    return False


def wait_listening(port: int, transport: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(port, transport):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {HOST}:{port}/{transport} after {timeout} s")


# ---------------------------------------------------------------------------------------------
# SIP messages as read from traces (and from the Python stream client)
# ---------------------------------------------------------------------------------------------

COMPACT = {
    "i": "call-id",
    "m": "contact",
    "f": "from",
    "t": "to",
    "v": "via",
    "l": "content-length",
    "c": "content-type",
    "y": "identity",
    "k": "supported",
    "e": "content-encoding",
    "s": "subject",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
}


def _canon(name: str) -> str:
    n = name.strip().lower()
    return COMPACT.get(n, n)


@dataclass
class SipMessage:
    """One SIP message exactly as a peer sent or received it."""

    raw: bytes
    direction: str = ""  # "sent" | "received" (from the point of view of the tracing peer)
    transport: str = ""  # "UDP" | "TCP" | "TLS"
    time: float = 0.0  # seconds since the epoch (trace timestamp)
    start_line: str = field(init=False)
    headers: list[tuple[str, str]] = field(init=False)  # (name as written, value as written)
    body: bytes = field(init=False)

    def __post_init__(self) -> None:
        head, sep, body = self.raw.partition(b"\r\n\r\n")
        if not sep:
            head, _, body = self.raw.partition(b"\n\n")
        lines = head.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
        self.start_line = lines[0].strip() if lines else ""
        self.headers = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and self.headers:  # folded continuation
                n, v = self.headers[-1]
                self.headers[-1] = (n, v + " " + line.strip())
                continue
            name, colon, value = line.partition(":")
            if colon:
                self.headers.append((name.strip(), value.strip()))
        self.body = body

    # --- start line ---------------------------------------------------------------------------
    @property
    def is_request(self) -> bool:
        return not self.start_line.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        return self.start_line.split(" ", 1)[0] if self.is_request else ""

    @property
    def request_uri(self) -> str:
        parts = self.start_line.split(" ")
        return parts[1] if self.is_request and len(parts) > 1 else ""

    @property
    def status(self) -> int:
        if self.is_request:
            return 0
        try:
            return int(self.start_line.split(" ")[1])
        except (IndexError, ValueError):
            return 0

    @property
    def reason_phrase(self) -> str:
        return self.start_line.split(" ", 2)[2] if not self.is_request else ""

    # --- headers ------------------------------------------------------------------------------
    def all(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive, compact forms too), in order, as written."""
        want = _canon(name)
        return [v for n, v in self.headers if _canon(n) == want]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    @property
    def call_id(self) -> str:
        return self.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        num, _, meth = (self.get("CSeq") or "0 ?").partition(" ")
        return int(num or 0), meth.strip()

    def __str__(self) -> str:
        return f"{self.direction} {self.transport} {self.start_line!r} (CSeq {self.get('CSeq')})"


_TRACE_HEAD = re.compile(
    rb"^-{20,} (\d{4}-\d\d-\d\d)[ \t](\d\d:\d\d:\d\d(?:\.\d+)?)\n"
    rb"(\w+) message (sent|received) (?:\((\d+) bytes\)|\[(\d+)\] bytes ?):\n\n",
    re.M,
)


def parse_trace(path: Path) -> list[SipMessage]:
    """The messages of a SIPp ``-trace_msg`` file, in order, each cut at its logged byte count."""
    if not path.exists():
        return []
    data = path.read_bytes()
    out: list[SipMessage] = []
    for m in _TRACE_HEAD.finditer(data):
        day, clock, transport, direction, size_sent, size_received = m.groups()
        size = size_sent or size_received
        start = m.end()
        raw = data[start : start + int(size)]
        stamp = dt.datetime.fromisoformat(f"{day.decode()} {clock.decode()}").timestamp()
        out.append(SipMessage(raw, direction.decode(), transport.decode(), stamp))
    return out


def split_stream(data: bytes) -> tuple[list[bytes], bytes]:
    """Frame SIP messages on a stream by Content-Length; returns (messages, leftover)."""
    msgs: list[bytes] = []
    while True:
        data = data.lstrip(b"\r\n")  # CRLF keep-alives
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return msgs, data
        head = data[:end].decode("utf-8", "replace")
        m = re.search(r"^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head, re.I | re.M)
        length = int(m.group(1)) if m else 0
        total = end + 4 + length
        if len(data) < total:
            return msgs, data
        msgs.append(data[:total])
        data = data[total:]


# ---------------------------------------------------------------------------------------------
# Realistic header values
# ---------------------------------------------------------------------------------------------


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_identity(seed: str, ppt: str = "shaken", quoted_ppt: bool = False, size: int = 900) -> str:
    """An RFC 8224 Identity header value (PASSporT-looking JWS + parameters), about ``size`` bytes."""
    rng = random.Random(seed)
    x5u = f"https://certificates.clearip.example/sti/{hashlib.sha1(seed.encode()).hexdigest()}.pem"
    hdr = {"alg": "ES256", "ppt": ppt, "typ": "passport", "x5u": x5u}
    payload: dict[str, object] = {
        "attest": "A",
        "dest": {"tn": ["15555550100"]},
        "iat": 1790000000 + rng.randrange(100000),
        "orig": {"tn": "12025550100"},
        "origid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
    }
    if ppt == "div":
        payload["div"] = {"tn": "12025550199"}
    params = ";info=<" + x5u + ">;alg=ES256;ppt=" + (f'"{ppt}"' if quoted_ppt else ppt)
    sig = _b64url(rng.randbytes(64))
    base = _b64url(json.dumps(hdr, separators=(",", ":")).encode())
    # Pad the payload with a realistic-looking claim until the whole value is about `size` bytes.
    while True:
        body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
        value = f"{base}.{body}.{sig}{params}"
        if len(value) >= size:
            return value
        payload.setdefault("rcd", {"nam": "ClearIP Test Caller", "jcl": ""})
        rcd = payload["rcd"]
        assert isinstance(rcd, dict)
        rcd["jcl"] = rcd["jcl"] + _b64url(rng.randbytes(24))


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def _stop_process(proc: subprocess.Popen[bytes], first: int, grace: float) -> int | None:
    """Send ``first`` then wait ``grace`` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    return proc.returncode


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return "(none)"
    return text if len(text) <= limit else "...\n" + text[-limit:]


class ProxyProcess:
    """``python -m proxy_runtime run ...`` on loopback; start waits for its ``ready`` line."""

    def __init__(
        self,
        workdir: Path,
        clearip: str,
        *,
        udp: bool = True,
        tcp: bool = True,
        tls: bool = False,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        clearip_ca: Path | None = None,
        timeout: float = 2.0,
        ring_timeout: float = 30.0,
        allow: Sequence[str] = ("127.0.0.0/8",),
        emergency_numbers: Sequence[str] = (),
        copy_headers: Sequence[str] = (),
        extra: Sequence[str] = (),
        name: str = "proxy",
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.log_path = workdir / f"{name}.log"
        args = [*PROXY_MODULE, "run"]
        if udp:
            args += ["--udp", f"{HOST}:{self.port}"]
        if tcp:
            args += ["--tcp", f"{HOST}:{self.port}"]
        if tls:
            assert tls_cert and tls_key
            args += [
                "--tls",
                f"{HOST}:{self.tls_port}",
                "--tls-cert",
                str(tls_cert),
                "--tls-key",
                str(tls_key),
            ]
        args += ["--clearip", clearip]
        if clearip_ca:
            args += ["--clearip-ca", str(clearip_ca)]
        args += ["--timeout", f"{timeout:g}", "--ring-timeout", f"{ring_timeout:g}"]
        for cidr in allow:
            args += ["--allow", cidr]
        args += ["--metrics", "off"]
        for n in emergency_numbers:
            args += ["--emergency-number", n]
        for h in copy_headers:
            args += ["--copy-header", h]
        args += list(extra)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.ready_after: float = 0.0

    def start(self, ready_timeout: float = PROXY_READY_TIMEOUT) -> ProxyProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        env["PYTHONPATH"] = proxy_pythonpath() + os.pathsep + env.get("PYTHONPATH", "")
        log = self.log_path.open("wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
        log.close()
        deadline = t0 + ready_timeout
        while time.monotonic() < deadline:
            if re.search(rb"\bready\b", self.log_path.read_bytes(), re.I):
                self.ready_after = time.monotonic() - t0
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.03)
        code = self.proc.poll()
        self.stop()
        state = f"exited with {code}" if code is not None else f"no 'ready' line within {ready_timeout} s"
        raise RuntimeError(
            f"proxy did not start ({state})\ncommand: {' '.join(self.args)}\n"
            f"--- proxy output ---\n{_tail(self.log_path)}"
        )

    def stop(self, grace: float = PROXY_STOP_TIMEOUT) -> int | None:
        if self.proc is not None and self.exit_code is None:
            self.exit_code = _stop_process(self.proc, signal.SIGTERM, grace)
        return self.exit_code

    def output(self) -> str:
        """The log's last few KB, for failure messages."""
        return _tail(self.log_path)

    def log_text(self) -> str:
        """The whole log, for assertions on what the proxy logged (``output`` is only a tail)."""
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def sip_uri(self) -> str:
        return f"sip:{HOST}:{self.port}"


class Sipp:
    """One SIPp process: a scenario file, a role, a transport, keys; traces in ``workdir``.

    UAS roles are started with :meth:`start_server` (returns once the port is bound); the UAC with
    :meth:`run` (waits for it to finish). Each SIPp also has its own global ``-timeout`` so it
    never outlives the test, and :meth:`stop` ends it (SIGUSR1 = smooth quit, then SIGKILL).
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        scenario: str,
        *,
        transport: str = "udp",
        remote: str | None = None,
        keys: dict[str, str] | None = None,
        calls: int = 1,
        rate: int = 10,
        timeout: float = SIPP_DEFAULT_TIMEOUT,
        service: str | None = None,
        extra: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.scenario = SCENARIOS / scenario
        assert self.scenario.exists(), self.scenario
        self.transport = transport
        self.port = port or free_port()
        self.trace_path = workdir / f"{name}.msg"
        self.err_path = workdir / f"{name}.err"
        self.out_path = workdir / f"{name}.out"
        # Skips naming the package to install, or fails under CI=true, when SIPp is missing.
        args = [require_tool("sipp", "Debian package sip-tester", path=Path(SIPP))]
        if remote:
            args.append(remote)
        args += ["-sf", str(self.scenario), "-i", HOST, "-p", str(self.port)]
        args += ["-t", {"udp": "u1", "tcp": "t1"}[transport]]
        args += ["-m", str(calls), "-r", str(rate), "-nostdin"]
        args += ["-timeout", f"{timeout:g}s", "-timeout_error"]
        args += ["-trace_msg", "-message_file", str(self.trace_path)]
        args += ["-trace_err", "-error_file", str(self.err_path)]
        args += ["-max_retrans", "7"]
        if service:
            args += ["-s", service]
        for k, v in (keys or {}).items():
            args += ["-key", k, v]
        args += list(extra)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.started_at = 0.0
        self.ended_at = 0.0

    # --- life cycle -----------------------------------------------------------------------
    def _spawn(self) -> None:
        out = self.out_path.open("wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        out.close()

    def start_server(self, timeout: float = 5.0) -> Sipp:
        self._spawn()
        try:
            wait_listening(self.port, self.transport, timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"SIPp {self.name} did not bind its port:\n{self.describe()}") from None
        return self

    def run(self, timeout: float | None = None) -> int:
        """Run to completion (bounded). Returns SIPp's exit code (0 = every call succeeded)."""
        self._spawn()
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        bound = timeout if timeout is not None else SIPP_DEFAULT_TIMEOUT + 5
        try:
            self.exit_code = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            self.stop()
        self.ended_at = time.monotonic()
        assert self.exit_code is not None
        return self.exit_code

    def stop(self, grace: float = 2.0) -> int | None:
        if self.proc is not None and self.exit_code is None:
            self.exit_code = _stop_process(self.proc, signal.SIGUSR1, grace)
            self.ended_at = time.monotonic()
        return self.exit_code

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- results --------------------------------------------------------------------------
    def messages(self) -> list[SipMessage]:
        return parse_trace(self.trace_path)

    def received(self, method_or_status: str | int | None = None) -> list[SipMessage]:
        return _select([m for m in self.messages() if m.direction == "received"], method_or_status)

    def sent(self, method_or_status: str | int | None = None) -> list[SipMessage]:
        return _select([m for m in self.messages() if m.direction == "sent"], method_or_status)

    def final_responses(self) -> list[SipMessage]:
        """Final responses received for the INVITE."""
        return [m for m in self.received() if m.status >= 200 and m.cseq[1] == "INVITE"]

    def describe(self) -> str:
        lines = [f"=== SIPp {self.name}: {self.scenario.name} ({self.transport}, port {self.port}) "]
        lines.append(f"exit code: {self.exit_code if self.proc else 'not started'}")
        lines.append("cmd: " + " ".join(a if len(a) < 100 else a[:60] + "..." for a in self.args))
        msgs = self.messages()
        lines += [f"  {m.direction:8} {m.transport} {m.start_line}" for m in msgs] or ["  (no messages)"]
        if self.err_path.exists() and self.err_path.stat().st_size:
            lines.append("--- errors ---\n" + _tail(self.err_path, 3000))
        out = _tail(self.out_path, 100000)
        errs = [ln for ln in out.splitlines() if re.search(r"error|unable|abort|fatal|warning", ln, re.I)]
        if errs:
            lines.append("--- stdout (errors) ---\n" + "\n".join(errs[-20:]))
        return "\n".join(lines)


def _select(msgs: list[SipMessage], what: str | int | None) -> list[SipMessage]:
    if what is None:
        return msgs
    if isinstance(what, int):
        return [m for m in msgs if m.status == what]
    return [m for m in msgs if m.is_request and m.method == what.upper()]


# ---------------------------------------------------------------------------------------------
# TLS helpers: a test CA, a TLS-to-TCP relay (TLS ClearIP), a tiny SIP stream client (TLS switch)
# ---------------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_test_pki(directory: Path) -> Pki:
    """A throw-away CA and a server certificate for ``localhost`` / 127.0.0.1, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ClearIP proxy integration test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pki.server_key.chmod(0o600)
    return pki


TLS_1_2 = ssl.TLSVersion.TLSv1_2


class TlsRelay:
    """A TLS server on 127.0.0.1 (test CA certificate) that relays each connection, byte for byte,
    to a plain TCP backend (the SIPp ClearIP UAS). Lets the proxy's TLS ClearIP connection be tested
    with the same SIPp scenarios. Threads; stopped by :meth:`close`."""

    def __init__(
        self,
        pki: Pki,
        backend_port: int,
        *,
        versions: tuple[ssl.TLSVersion, ssl.TLSVersion] = (
            ssl.TLSVersion.TLSv1_2,
            ssl.TLSVersion.MAXIMUM_SUPPORTED,
        ),
    ) -> None:
        """``versions``: the (minimum, maximum) TLS version this server speaks; an old-only server
        (TLS 1.0-1.1, with SECLEVEL 0 so OpenSSL 3 agrees to speak them) tests the proxy's client."""
        self.backend_port = backend_port
        self.port = free_port()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():  # deprecated versions are the point of an old-only server
            warnings.simplefilter("ignore", DeprecationWarning)
            self.ctx.minimum_version, self.ctx.maximum_version = versions
        if versions[1] < TLS_1_2:
            self.ctx.set_ciphers("ALL:@SECLEVEL=0")
        self.ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.listener = socket.create_server((HOST, self.port))
        self.listener.settimeout(0.2)
        self.connections = 0
        self.handshake_errors: list[str] = []
        self.tls_versions: list[str] = []
        self._closing = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(5)
            try:
                tls = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as e:
                self.handshake_errors.append(repr(e))
                raw.close()
                continue
            self.connections += 1
            self.tls_versions.append(str(tls.version()))
            try:
                back = socket.create_connection((HOST, self.backend_port), timeout=2)
            except OSError:
                tls.close()
                continue
            self._socks += [tls, back]
            t = threading.Thread(target=self._pump, args=(tls, back), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, a: ssl.SSLSocket, b: socket.socket) -> None:
        a.setblocking(False)
        b.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._closing.is_set():
                for key, _ in sel.select(0.2):
                    src = key.fileobj
                    dst = key.data
                    assert isinstance(src, socket.socket) and isinstance(dst, socket.socket)
                    while True:
                        try:
                            chunk = src.recv(65536)
                        except (ssl.SSLWantReadError, BlockingIOError):
                            break
                        if not chunk:
                            return
                        dst.setblocking(True)
                        dst.sendall(chunk)
                        dst.setblocking(False)
                        if not (isinstance(src, ssl.SSLSocket) and src.pending()):
                            break
        except OSError:
            return
        finally:
            sel.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(2)


class SipStreamClient:
    """A minimal SIP UAC over a TLS (or TCP) stream: what the TLS switch test uses, since this SIPp
    is built without OpenSSL (``-t l1`` is refused). Records what it sent and received."""

    def __init__(self, port: int, *, tls_ca: Path | None = None, server_name: str = "localhost") -> None:
        raw = socket.create_connection((HOST, port), timeout=5)
        self.transport = "TLS" if tls_ca else "TCP"
        if tls_ca:
            ctx = ssl.create_default_context(cafile=str(tls_ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self.sock: socket.socket = ctx.wrap_socket(raw, server_hostname=server_name)
        else:
            self.sock = raw
        self.local_port = self.sock.getsockname()[1]
        self.log: list[SipMessage] = []
        self._buf = b""
        self._pending: list[bytes] = []

    def send(self, text: str) -> None:
        head, _, body = text.partition("\n\n")
        head_b = head.strip("\n").replace("\n", "\r\n").encode()
        body_b = body.replace("\n", "\r\n").encode() if body else b""
        head_b = head_b.replace(b"Content-Length: {len}", b"Content-Length: %d" % len(body_b))
        data = head_b + b"\r\n\r\n" + body_b
        self.sock.sendall(data)
        self.log.append(SipMessage(data, "sent", self.transport, time.time()))

    def recv(self, timeout: float = 5.0) -> SipMessage | None:
        deadline = time.monotonic() + timeout
        while not self._pending:
            msgs, self._buf = split_stream(self._buf)
            self._pending.extend(msgs)
            if self._pending:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                return None
            if not chunk:
                return None
            self._buf += chunk
        msg = SipMessage(self._pending.pop(0), "received", self.transport, time.time())
        self.log.append(msg)
        return msg

    def recv_until(self, pred: object, timeout: float = 5.0) -> SipMessage | None:
        """Receive until a message satisfies ``pred`` (callable) or the bound expires."""
        assert callable(pred)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            m = self.recv(left)
            if m is None:
                return None
            if pred(m):
                return m
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------------------------------------
# Lab: one test's set of processes
# ---------------------------------------------------------------------------------------------


class Lab:
    """Starts and tracks every process of one test; :meth:`close` stops them all (always)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sipps: list[Sipp] = []
        self.proxies: list[ProxyProcess] = []
        self.closers: list[object] = []

    # --- peers ----------------------------------------------------------------------------
    def sipp(self, name: str, scenario: str, **kw: object) -> Sipp:
        s = Sipp(self.workdir, name, scenario, **kw)  # type: ignore[arg-type]
        self.sipps.append(s)
        return s

    def clearip(
        self, scenario: str, keys: dict[str, str] | None = None, calls: int = 1, **kw: object
    ) -> Sipp:
        """ClearIP stand-in: SIPp UAS over TCP, started (port bound) before the proxy connects."""
        return self.sipp("clearip", scenario, transport="tcp", keys=keys, calls=calls, **kw).start_server()

    def carrier(
        self,
        name: str,
        scenario: str,
        transport: str = "udp",
        keys: dict[str, str] | None = None,
        **kw: object,
    ) -> Sipp:
        return self.sipp(name, scenario, transport=transport, keys=keys, **kw).start_server()

    def proxy(self, clearip_port: int | None, *, wait_clearip: bool = True, **kw: object) -> ProxyProcess:
        """Start the proxy; when ClearIP is up (``clearip_port`` listens), also wait (bounded) until the
        proxy's persistent connection to it is established, so the first INVITE does not race it."""
        clearip_uri = kw.pop("clearip", None) or f"sip:{HOST}:{clearip_port};transport=tcp"
        p = ProxyProcess(self.workdir, str(clearip_uri), **kw)  # type: ignore[arg-type]
        self.proxies.append(p)
        p.start()
        if wait_clearip and clearip_port and not wait_established(clearip_port, 5.0):
            raise AssertionError(
                f"the proxy did not connect to ClearIP on port {clearip_port} within 5 s of 'ready'\n"
                f"--- proxy output ---\n{p.output()}"
            )
        return p

    def switch(
        self,
        scenario: str,
        proxy: ProxyProcess | int,
        transport: str = "udp",
        *,
        number: str = "+15555550100",
        ruri_host: str | None = None,
        keys: dict[str, str] | None = None,
        timeout: float = 10.0,
        name: str = "switch",
        **kw: object,
    ) -> Sipp:
        """The switch UAC, run to completion against the proxy (or, to validate scenarios, a port)."""
        port = proxy if isinstance(proxy, int) else proxy.port
        all_keys = {
            "ruri_user": number,
            "ruri_host": ruri_host or f"{HOST}:{port}",
            "max_forwards": "70",
            "caller_identity": CALLER_IDENTITY,
        }
        all_keys.update(keys or {})
        s = self.sipp(
            name, scenario, transport=transport, remote=f"{HOST}:{port}", keys=all_keys, timeout=timeout, **kw
        )
        s.run(timeout + 5)
        return s

    def add_closer(self, closer: object) -> None:
        self.closers.append(closer)

    # --- teardown -------------------------------------------------------------------------
    def settle(self, *peers: Sipp, timeout: float = 5.0) -> None:
        """Wait (bounded) for UAS peers to finish their calls, then stop them, so traces are complete."""
        deadline = time.monotonic() + timeout
        for p in peers:
            if p.proc is None:
                continue
            left = max(0.1, deadline - time.monotonic())
            try:
                p.exit_code = p.proc.wait(left)
            except subprocess.TimeoutExpired:
                p.stop()

    def close(self) -> None:
        for s in self.sipps:
            s.stop()
        for c in reversed(self.closers):
            with contextlib.suppress(Exception):
                c.close()  # type: ignore[attr-defined]
        for p in self.proxies:
            p.stop()

    def describe(self) -> str:
        parts = []
        for p in self.proxies:
            parts.append(f"=== proxy (exit {p.exit_code}): {' '.join(p.args)}\n{p.output()}")
        parts += [s.describe() for s in self.sipps]
        return "\n\n".join(parts)


CALLER_IDENTITY = make_identity("caller-own-identity", size=400)


def contact_list(entries: Iterable[tuple[str, Sipp, float]]) -> str:
    """A 302 Contact header value: each ``(user, carrier, q)`` becomes
    ``<sip:user@127.0.0.1:port[;transport=tcp]>;q=Q``."""
    out = []
    for user, carrier, q in entries:
        tp = ";transport=tcp" if carrier.transport == "tcp" else ""
        out.append(f"<sip:{user}@{HOST}:{carrier.port}{tp}>;q={q:g}")
    return ", ".join(out)
