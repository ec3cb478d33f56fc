"""``clearip-proxy doctor``: what an engineer checks by hand, as one command.

It runs each check in order and prints one line per check (OK / WARN / FAIL / SKIP and a detail),
or the same as JSON with ``--json``; the exit status is 1 when any check FAILs. It needs no running
proxy, but when one answers on the control socket its own view (listeners, ClearIP link) is reported
too.

Blocking sockets with timeouts: this is a short-lived command, not the event loop. The instance
metadata service (IMDSv2) is only asked when the host is EC2 (``--ec2``, ``CLEARIP_ON_EC2=1``, or
the hypervisor/DMI files say so), at ``--imds-url`` / ``CLEARIP_IMDS_URL`` (tests point it at a stub).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.utils
import json
import os
import secrets
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy_runtime import settings as settings_mod
from proxy_runtime.operations import control
from proxy_runtime.settings import Settings, SettingsError
from proxy_runtime.sip.framing import PING, FramingError, StreamFramer
from proxy_runtime.transport import tls

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
CLOCK_WARN = 2.0  # seconds
CLOCK_FAIL = 30.0  # a PASSporT is stale after 60 s; at 30 s of skew calls fail intermittently
CERT_WARN_DAYS = 14
DEFAULT_IMDS = "http://169.254.169.254"
ENV_ON_EC2 = "CLEARIP_ON_EC2"
ENV_IMDS = "CLEARIP_IMDS_URL"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, **self.data}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000.0, 1)


def _name(rdn: Any) -> str:
    """``getpeercert()``'s subject/issuer tuple as ``CN=..., O=...``."""
    short = {"commonName": "CN", "organizationName": "O", "countryName": "C", "organizationalUnitName": "OU"}
    parts = []
    for group in rdn or ():
        for key, value in group:
            parts.append(f"{short.get(key, key)}={value}")
    return ", ".join(parts)


def _parse_hostport(text: str, default_port: int = 5060) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


def on_ec2(environ: Mapping[str, str] | None = None, sys_root: Path = Path("/sys")) -> bool:
    """Whether this host is an EC2 instance (so IMDSv2 may be asked), without any network probe."""
    env = os.environ if environ is None else environ
    flag = env.get(ENV_ON_EC2, "").strip().lower()
    if flag:
        return flag in ("1", "true", "yes", "on")

    def read(rel: str) -> str:
        try:
            return (sys_root / rel).read_text(errors="replace").strip()
        except OSError:
            return ""

    return (
        read("hypervisor/uuid").lower().startswith("ec2")
        or read("class/dmi/id/board_asset_tag").startswith("i-")
        or read("class/dmi/id/sys_vendor") == "Amazon EC2"
    )


# ---------------------------------------------------------------------------------------------
# The ClearIP probe: TCP, TLS, OPTIONS (or a CRLF keep-alive)
# ---------------------------------------------------------------------------------------------


@dataclass
class SipAnswer:
    status: int
    reason: str
    headers: dict[str, str]
    rtt_ms: float
    local_mid: float  # wall time half-way between sending and receiving


def _options(host: str, transport: str, sock: socket.socket) -> tuple[bytes, str]:
    local = sock.getsockname()
    call_id = secrets.token_hex(12) + "@clearip-proxy-doctor"
    via_host = f"[{local[0]}]" if ":" in local[0] else local[0]
    msg = (
        f"OPTIONS sip:{host} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} {via_host}:{local[1]}"
        f";branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:clearip-proxy-doctor@{via_host}>;tag={secrets.token_hex(6)}\r\n"
        f"To: <sip:{host}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Accept: application/sdp\r\n"
        "User-Agent: clearip-proxy doctor\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    return msg.encode(), call_id


def _read_answer(
    sock: socket.socket, call_id: str, deadline: float
) -> tuple[int, str, dict[str, str]] | None:
    framer = StreamFramer(65535)
    while True:
        while True:
            try:
                frame = framer.next_frame()
            except FramingError:
                return None
            if frame is None:
                break
            if frame is PING or frame == PING:
                continue
            head = frame.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
            if not head[0].startswith("SIP/2.0 "):
                continue  # a request from the far end: not ours
            headers: dict[str, str] = {}
            for line in head[1:]:
                k, _, v = line.partition(":")
                headers.setdefault(k.strip().lower(), v.strip())
            if headers.get("call-id", headers.get("i")) != call_id:
                continue
            parts = head[0].split(" ", 2)
            return int(parts[1]), (parts[2] if len(parts) > 2 else ""), headers
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        framer.feed(chunk)


def _ping(sock: socket.socket, timeout: float) -> float | None:
    """RFC 5626 CRLF keep-alive: send CRLF CRLF, expect a CRLF back; the round trip in ms."""
    t0 = time.monotonic()
    sock.sendall(PING)
    sock.settimeout(timeout)
    try:
        data = sock.recv(64)
    except (TimeoutError, OSError):
        return None
    return _ms(t0) if data.startswith(b"\r\n") else None


def check_clearip(s: Settings, timeout: float) -> tuple[list[Check], SipAnswer | None]:
    uri = s.clearip_uri
    host = uri.host
    port = uri.port or uri.default_port
    transport = uri.transport
    checks: list[Check] = []
    # DNS
    t0 = time.monotonic()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        checks.append(Check("clearip-dns", FAIL, f"{host}: cannot resolve: {exc}"))
        return checks, None
    addrs = sorted({str(i[4][0]) for i in infos})
    checks.append(
        Check("clearip-dns", OK, f"{host} -> {', '.join(addrs)} ({_ms(t0):g} ms)", {"addresses": addrs})
    )
    # TCP
    t0 = time.monotonic()
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        checks.append(Check("clearip-tcp", FAIL, f"{host}:{port}: cannot connect: {exc}"))
        return checks, None
    peer = raw.getpeername()
    checks.append(Check("clearip-tcp", OK, f"connected to {peer[0]}:{peer[1]} in {_ms(t0):g} ms"))
    sock: socket.socket = raw
    try:
        if transport == "tls":
            name = s.clearip_server_name or host
            ctx = tls.client_context(s.clearip_ca or None)
            t0 = time.monotonic()
            try:
                raw.settimeout(timeout)
                sock = ctx.wrap_socket(raw, server_hostname=name)
            except ssl.SSLCertVerificationError as exc:
                detail = exc.verify_message or str(exc)
                checks.append(
                    Check(
                        "clearip-tls", FAIL, f"certificate of {host}:{port} rejected for {name!r}: {detail}"
                    )
                )
                return checks, None
            except (ssl.SSLError, OSError) as exc:
                checks.append(Check("clearip-tls", FAIL, f"TLS handshake with {host}:{port} failed: {exc}"))
                return checks, None
            checks.append(_cert_check(sock, name, _ms(t0), s.clearip_ca))
        else:
            checks.append(Check("clearip-tls", SKIP, f"ClearIP transport is {transport}: no TLS"))
        # SIP round trip: OPTIONS, else a CRLF keep-alive.
        data, call_id = _options(host, transport, sock)
        t0 = time.monotonic()
        w0 = time.time()
        sock.sendall(data)
        got = _read_answer(sock, call_id, time.monotonic() + timeout)
        if got is None:
            rtt = _ping(sock, timeout)
            if rtt is None:
                checks.append(
                    Check(
                        "clearip-sip", FAIL, f"no answer to OPTIONS nor to a CRLF keep-alive in {timeout:g} s"
                    )
                )
            else:
                checks.append(
                    Check(
                        "clearip-sip",
                        WARN,
                        f"no answer to OPTIONS in {timeout:g} s; keep-alive pong in {rtt:g} ms",
                    )
                )
            return checks, None
        status, reason, headers = got
        answer = SipAnswer(status, reason, headers, _ms(t0), (w0 + time.time()) / 2)
        if status == 403:
            checks.append(
                Check(
                    "clearip-sip",
                    FAIL,
                    f"OPTIONS answered 403 {reason} in {answer.rtt_ms:g} ms: "
                    "this address is not whitelisted at ClearIP",
                    {"status": status, "rtt_ms": answer.rtt_ms},
                )
            )
        else:
            checks.append(
                Check(
                    "clearip-sip",
                    OK,
                    f"OPTIONS answered {status} {reason} in {answer.rtt_ms:g} ms",
                    {"status": status, "rtt_ms": answer.rtt_ms},
                )
            )
        return checks, answer
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def _cert_check(sock: ssl.SSLSocket, name: str, ms: float, ca: str) -> Check:
    cert = sock.getpeercert() or {}
    subject = _name(cert.get("subject"))
    issuer = _name(cert.get("issuer"))
    not_after = str(cert.get("notAfter", ""))
    days: float | None = None
    status = OK
    expiry = not_after
    if not_after:
        when = ssl.cert_time_to_seconds(not_after)
        days = (when - time.time()) / 86400.0
        expiry = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d")
        if days < CERT_WARN_DAYS:
            status = WARN
    version = sock.version() or "?"
    cipher = (sock.cipher() or ("?",))[0]
    detail = (
        f"{version} {cipher}; name {name!r} verified against {'the CA ' + ca if ca else 'the system CAs'}; "
        f"subject {subject}; issuer {issuer}; expires {expiry}"
        + (f" (in {days:.0f} days)" if days is not None else "")
        + f"; handshake {ms:g} ms"
    )
    return Check(
        "clearip-tls",
        status,
        detail,
        {
            "tls_version": version,
            "cipher": cipher,
            "subject": subject,
            "issuer": issuer,
            "not_after": expiry,
            "days_left": None if days is None else round(days, 1),
        },
    )


# ---------------------------------------------------------------------------------------------
# Other checks
# ---------------------------------------------------------------------------------------------


def check_listeners(s: Settings, status: dict[str, Any] | None) -> list[Check]:
    configured = [("udp", hp) for hp in s.udp] + [("tcp", hp) for hp in s.tcp] + [("tls", hp) for hp in s.tls]
    out: list[Check] = []
    if status is not None:
        running = {(lst["transport"], lst["address"]) for lst in status.get("listeners", [])}
        for transport, hp in configured:
            if hp.port == 0 or (transport, str(hp)) in running:
                out.append(
                    Check(
                        f"listener-{transport}",
                        OK,
                        f"{hp} bound by the running proxy (pid {status.get('pid')})",
                    )
                )
            else:
                out.append(
                    Check(
                        f"listener-{transport}",
                        WARN,
                        f"{hp} is in the settings but the running proxy listens on "
                        f"{', '.join(sorted(a for t, a in running if t == transport)) or 'nothing'}"
                        ": restart to apply",
                    )
                )
        return out
    for transport, hp in configured:
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
        try:
            with socket.socket(family, kind) as sock:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((hp.host, hp.port))
        except OSError as exc:
            out.append(
                Check(
                    f"listener-{transport}",
                    FAIL,
                    f"{hp}: cannot bind ({exc.strerror or exc}); another process holds it, or the proxy runs "
                    "without a reachable control socket",
                )
            )
        else:
            out.append(Check(f"listener-{transport}", OK, f"{hp} can be bound (the proxy is not running)"))
    return out


def check_running(status: dict[str, Any] | None, sock_path: Path | None, error: str) -> list[Check]:
    if status is None:
        where = str(sock_path) if sock_path else "no control socket found"
        return [Check("proxy", WARN, f"no running proxy answered ({where}{': ' + error if error else ''})")]
    ci = status.get("clearip", {})
    out = [
        Check(
            "proxy",
            OK,
            f"running, pid {status.get('pid')}, up {status.get('uptime', 0):.0f} s, "
            f"{status.get('calls_in_flight', 0)} call(s) in flight"
            + (", DRAINING" if status.get("draining") else "")
            + (", trace on" if status.get("trace", {}).get("active") else ""),
            {"pid": status.get("pid"), "calls_in_flight": status.get("calls_in_flight")},
        )
    ]
    if ci.get("up"):
        out.append(
            Check(
                "proxy-clearip-link",
                OK,
                f"up ({ci.get('tls_version') or 'tcp'}), {ci.get('reconnects', 0)} reconnect(s)",
                {"tls_version": ci.get("tls_version"), "reconnects": ci.get("reconnects")},
            )
        )
    else:
        out.append(
            Check(
                "proxy-clearip-link",
                FAIL,
                f"DOWN: {ci.get('last_error') or 'not connected'}; calls get 503 at once",
                {"reconnects": ci.get("reconnects")},
            )
        )
    return out


def check_clock(answer: SipAnswer | None, time_url: str | None, timeout: float) -> Check:
    source = ""
    offset: float | None = None
    if answer is not None and answer.headers.get("date"):
        parsed = _http_date(answer.headers["date"])
        if parsed is not None:
            # Date has 1 s resolution: its true value is on average half a second later.
            offset = parsed + 0.5 - answer.local_mid
            source = "the Date of ClearIP's OPTIONS answer"
    if offset is None and time_url:
        try:
            w0 = time.time()
            req = urllib.request.Request(time_url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                date = resp.headers.get("Date")
            mid = (w0 + time.time()) / 2
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return Check("clock", WARN, f"cannot read the time from {time_url}: {exc}")
        parsed = _http_date(date or "")
        if parsed is None:
            return Check("clock", WARN, f"{time_url} sent no usable Date header")
        offset = parsed + 0.5 - mid
        source = f"the HTTP Date of {time_url}"
    if offset is None:
        return Check("clock", SKIP, "no time source (ClearIP sent no Date; give --time-url URL)")
    a = abs(offset)
    status = OK if a <= CLOCK_WARN else WARN if a <= CLOCK_FAIL else FAIL
    note = "" if status == OK else "; PASSporTs older than 60 s are rejected: fix NTP (chronyc tracking)"
    return Check(
        "clock",
        status,
        f"local clock {'behind' if offset > 0 else 'ahead of'} {source} by {a:.1f} s (±0.5 s){note}",
        {"offset_seconds": round(offset, 2)},
    )


def _http_date(value: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def check_carriers(carriers: Sequence[str], timeout: float) -> list[Check]:
    out = []
    for c in carriers:
        try:
            host, port = _parse_hostport(c)
        except ValueError:
            out.append(Check("carrier", FAIL, f"{c!r}: not HOST:PORT"))
            continue
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            out.append(Check("carrier", FAIL, f"{host}:{port} TCP: {exc}", {"address": f"{host}:{port}"}))
        else:
            out.append(
                Check(
                    "carrier",
                    OK,
                    f"{host}:{port} TCP connect in {_ms(t0):g} ms",
                    {"address": f"{host}:{port}"},
                )
            )
    return out


def check_ec2(s: Settings, enabled: bool, imds_url: str, timeout: float) -> Check:
    if not enabled:
        return Check("ec2-address", SKIP, "not on EC2 (set CLEARIP_ON_EC2=1 or --ec2 to check)")
    base = imds_url.rstrip("/")
    try:
        req = urllib.request.Request(
            base + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            token = resp.read().decode()
        req = urllib.request.Request(
            base + "/latest/meta-data/public-ipv4", headers={"X-aws-ec2-metadata-token": token}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            public = resp.read().decode().strip()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return Check("ec2-address", FAIL, "the instance has no public IPv4 (no Elastic IP associated)")
        return Check("ec2-address", WARN, f"instance metadata: HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        return Check("ec2-address", WARN, f"instance metadata (IMDSv2) unreachable at {base}: {exc}")
    data = {"public_ipv4": public, "advertise": s.advertise}
    if not s.advertise:
        return Check(
            "ec2-address",
            FAIL,
            f"advertise is not set; carriers must see the public {public} in Via/Record-Route",
            data,
        )
    if s.advertise != public:
        return Check(
            "ec2-address", FAIL, f"advertise {s.advertise} differs from the instance's public {public}", data
        )
    return Check("ec2-address", OK, f"advertise {s.advertise} is the instance's public IPv4", data)


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def run_doctor(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> list[Check]:
    env = os.environ if environ is None else environ
    checks: list[Check] = []
    config = args.config or env.get("CLEARIP_PROXY_CONFIG")
    try:
        s = settings_mod.load(config, environ=env)
    except SettingsError as exc:
        checks.append(Check("settings", FAIL, str(exc)))
        return checks
    listeners = len(s.udp) + len(s.tcp) + len(s.tls)
    checks.append(
        Check(
            "settings",
            OK,
            f"{config or 'defaults and environment'}: valid; {listeners} listener(s); ClearIP {s.clearip}; "
            f"timeout {s.timeout:g} s",
        )
    )
    sock_path = control.find_control_socket(args.control_socket, env)
    status: dict[str, Any] | None = None
    error = ""
    if sock_path is not None:
        try:
            answer = control.request(sock_path, {"cmd": "status"}, timeout=args.timeout)
            if answer.get("ok"):
                status = answer
            else:
                error = str(answer.get("error"))
        except (OSError, ValueError) as exc:
            error = str(exc)
    checks += check_running(status, sock_path, error)
    checks += check_listeners(s, status)
    clearip_checks, sip_answer = check_clearip(s, args.timeout)
    checks += clearip_checks
    checks.append(check_clock(sip_answer, args.time_url, args.timeout))
    checks += check_carriers(args.carrier or [], args.timeout)
    ec2 = args.ec2 if args.ec2 is not None else on_ec2(env)
    checks.append(
        check_ec2(s, ec2, args.imds_url or env.get(ENV_IMDS) or DEFAULT_IMDS, min(args.timeout, 2.0))
    )
    return checks


def render(checks: Sequence[Check]) -> str:
    counts = {k: sum(1 for c in checks if c.status == k) for k in (OK, WARN, FAIL, SKIP)}
    width = max((len(c.name) for c in checks), default=8)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in checks]
    verdict = "FAILED" if counts[FAIL] else "passed with warnings" if counts[WARN] else "all good"
    lines.append(
        f"doctor: {verdict}: {counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP"
    )
    return "\n".join(lines)


def doctor_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="clearip-proxy doctor", description="check the proxy's set-up")
    p.add_argument("--config", metavar="FILE", help="settings file (as for run); env CLEARIP_PROXY_CONFIG")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--carrier", action="append", metavar="HOST:PORT", help="check TCP reachability (repeat)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per network check (default 5)")
    p.add_argument("--control-socket", metavar="PATH", help="the running proxy's control socket")
    p.add_argument("--time-url", metavar="URL", help="HTTP(S) URL whose Date header is a time reference")
    ec2 = p.add_mutually_exclusive_group()
    ec2.add_argument("--ec2", dest="ec2", action="store_const", const=True, default=None)
    ec2.add_argument("--no-ec2", dest="ec2", action="store_const", const=False)
    p.add_argument("--imds-url", metavar="URL", help=argparse.SUPPRESS)
    args = p.parse_args(list(argv))
    if not 0 < args.timeout <= 60:
        p.error("--timeout must be in (0, 60]")
    checks = run_doctor(args)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not failed,
                    "summary": {k: sum(1 for c in checks if c.status == k) for k in (OK, WARN, FAIL, SKIP)},
                    "checks": [c.as_dict() for c in checks],
                },
                indent=2,
            )
        )
    else:
        print(render(checks))
    return 1 if failed else 0


__all__ = ["Check", "doctor_main", "on_ec2", "run_doctor"]
