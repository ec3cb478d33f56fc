"""Issue 6, the runtime side: ``clearip-proxy doctor`` against a real local TLS ClearIP stand-in (a
test CA; good, wrong name, down, skewed clock), ``clearip-proxy trace`` and SIGUSR1 traces from a
proxy carrying SIPp calls, and a SIGHUP settings reload under SIPp load without a failed call.

Everything on 127.0.0.1; the instance metadata service is a local stub (never 169.254.169.254);
every process and thread started here is stopped by the ``lab`` fixture or a ``finally``.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy_runtime.operations.control import request
from tests.integration.flows import CALLED, CLEARIP_KEYS, IDENTITY_1, IDENTITY_2, PAI_OUTBOUND
from tests.integration.harness import (
    HOST,
    PROXY_MODULE,
    REPO,
    Lab,
    Pki,
    ProxyProcess,
    contact_list,
    free_port,
    proxy_pythonpath,
    split_stream,
    wait_established,
)
from tests.unit.test_trace import _decode, _read_pcap

pytestmark = [pytest.mark.sipp, pytest.mark.timeout(90)]


# ---------------------------------------------------------------------------------------------
# Helpers: a TLS ClearIP stand-in, an IMDS stub, the CLI as a process
# ---------------------------------------------------------------------------------------------


class TlsClearIp:
    """A TLS SIP server (test CA certificate for localhost/127.0.0.1): answers OPTIONS with 200 and a
    Date header ``date_offset`` seconds off, and CRLF keep-alives with a CRLF (RFC 5626)."""

    def __init__(self, pki: Pki, *, date_offset: float = 0.0, answer_options: bool = True) -> None:
        self.date_offset = date_offset
        self.answer_options = answer_options
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.port = free_port()
        self.listener = socket.create_server((HOST, self.port))
        self.listener.settimeout(0.2)
        self.options_seen = 0
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        conn.settimeout(0.2)
        buf = b""
        with conn:
            while not self._closing.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except (ssl.SSLError, OSError):
                    return
                if not chunk:
                    return
                buf += chunk
                while buf.startswith(b"\r\n\r\n"):
                    conn.sendall(b"\r\n")
                    buf = buf[4:]
                msgs, buf = split_stream(buf)
                for m in msgs:
                    if m.startswith(b"OPTIONS ") and self.answer_options:
                        self.options_seen += 1
                        conn.sendall(self._ok(m))

    def _ok(self, req: bytes) -> bytes:
        head = req.split(b"\r\n\r\n")[0].decode().split("\r\n")
        keep = [ln for ln in head[1:] if ln.split(":")[0].lower() in ("via", "from", "to", "call-id", "cseq")]
        date = email.utils.formatdate(time.time() + self.date_offset, usegmt=True)
        lines = [
            "SIP/2.0 200 OK",
            *keep,
            f"Date: {date}",
            "Allow: INVITE, ACK, CANCEL, OPTIONS",
            "Content-Length: 0",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for t in self._threads:
            t.join(2)


class ImdsStub:
    """IMDSv2 on 127.0.0.1: PUT /latest/api/token, then GET /latest/meta-data/public-ipv4 with it."""

    def __init__(self, public_ip: str) -> None:
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                ok = self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                )
                self._reply(200 if ok else 400, b"stub-token")

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != "stub-token":
                    self._reply(401, b"")
                elif self.path == "/latest/meta-data/public-ipv4":
                    self._reply(200, stub.public_ip.encode())
                else:
                    self._reply(404, b"")

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.public_ip = public_ip
        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARIP_PROXY_", "CLEARIP_CONTROL"))}
    env.update(PYTHONPATH=proxy_pythonpath(), PYTHONDONTWRITEBYTECODE="1", CLEARIP_ON_EC2="0")
    env.update(extra)
    return env


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROXY_MODULE, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=cli_env(**env),
        check=False,
    )


def doctor_json(*args: str, **env: str) -> tuple[int, dict[str, Any]]:
    r = cli("doctor", "--json", "--timeout", "2", *args, **env)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for c in report["checks"]:
        out.setdefault(c["name"], c)
    return out


def write_config(path: Path, **values: Any) -> Path:
    lines = []
    for k, v in values.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int | float):
            lines.append(f"{k} = {v}")
        elif isinstance(v, list | tuple):
            lines.append(f"{k} = [{', '.join(json.dumps(x) for x in v)}]")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="cip-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clearip(pki: Pki) -> Iterator[TlsClearIp]:
    server = TlsClearIp(pki)
    try:
        yield server
    finally:
        server.close()


def doctor_config(tmp_path: Path, pki: Pki, clearip_port: int, **kw: Any) -> Path:
    values: dict[str, Any] = {
        "udp": [f"{HOST}:{free_port()}"],
        "tcp": [f"{HOST}:{free_port()}"],
        "clearip": f"sip:localhost:{clearip_port};transport=tls",
        "clearip_ca": str(pki.ca_cert),
        "metrics": "off",
    }
    values.update(kw)
    return write_config(tmp_path / "proxy.toml", **values)


def wait_for(pred: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status_of(sock: Path) -> dict[str, Any]:
    return request(sock, {"cmd": "status"})


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def test_version_says_which_build_of_the_core_runs() -> None:
    """`clearip-proxy --version` names the build (setup.py): the compiled core under
    `make test-compiled`, the pure-Python one otherwise."""
    out = cli("--version")
    want = "compiled" if os.environ.get("CLEARIP_COMPILED_DIR") else "pure"
    assert out.returncode == 0 and out.stdout.strip().endswith(f"(core {want})"), out


def test_doctor_good_clearip_prints_one_line_per_check_and_exits_0(
    tmp_path: Path, pki: Pki, clearip: TlsClearIp, sock_dir: Path
) -> None:
    config = doctor_config(tmp_path, pki, clearip.port)
    with socket.create_server((HOST, 0)) as carrier:
        cport = carrier.getsockname()[1]
        r = cli("doctor", "--config", str(config), "--carrier", f"{HOST}:{cport}", "--timeout", "2",
                "--control-socket", str(sock_dir / "none.sock"))  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    lines = out.strip().splitlines()
    statuses = {ln.split()[1]: ln.split()[0] for ln in lines[:-1]}
    assert statuses == {
        "settings": "OK",
        "proxy": "WARN",  # not running: reported, not a failure
        "listener-udp": "OK",
        "listener-tcp": "OK",
        "clearip-dns": "OK",
        "clearip-tcp": "OK",
        "clearip-tls": "WARN",  # the test CA's certificate expires in 2 days (< 14)
        "clearip-sip": "OK",
        "clock": "OK",
        "carrier": "OK",
        "ec2-address": "SKIP",
    }, out
    tls_line = next(ln for ln in lines if " clearip-tls " in ln)
    assert "TLSv1.3" in tls_line and "subject CN=localhost" in tls_line, tls_line
    assert "issuer CN=ClearIP proxy integration test CA" in tls_line and "(in 2 days)" in tls_line, tls_line
    assert "OPTIONS answered 200 OK in" in out and "localhost -> 127.0.0.1" in out
    assert lines[-1].startswith("doctor: passed with warnings: 8 OK, 2 WARN, 0 FAIL, 1 SKIP"), out
    assert clearip.options_seen == 1


def test_doctor_wrong_server_name_fails_the_tls_check(tmp_path: Path, pki: Pki, clearip: TlsClearIp) -> None:
    config = doctor_config(tmp_path, pki, clearip.port, clearip_server_name="sip.clearip.com")
    code, report = doctor_json("--config", str(config))
    checks = by_name(report)
    assert code == 1 and report["ok"] is False
    assert checks["clearip-tcp"]["status"] == "OK"
    assert checks["clearip-tls"]["status"] == "FAIL"
    assert "'sip.clearip.com'" in checks["clearip-tls"]["detail"]
    assert "mismatch" in checks["clearip-tls"]["detail"].lower(), checks["clearip-tls"]
    assert "clearip-sip" not in checks and checks["clock"]["status"] == "SKIP"


def test_doctor_clearip_down_and_a_dead_carrier_fail(tmp_path: Path, pki: Pki) -> None:
    config = doctor_config(tmp_path, pki, free_port())  # nothing listens there
    code, report = doctor_json("--config", str(config), "--carrier", f"{HOST}:{free_port()}")
    checks = by_name(report)
    assert code == 1
    assert checks["clearip-dns"]["status"] == "OK"
    assert checks["clearip-tcp"]["status"] == "FAIL" and "refused" in checks["clearip-tcp"]["detail"].lower()
    assert checks["carrier"]["status"] == "FAIL"
    assert report["summary"]["FAIL"] == 2


def test_doctor_unknown_clearip_host_fails_dns(tmp_path: Path, pki: Pki) -> None:
    config = doctor_config(tmp_path, pki, 5061, clearip="sip:no-such-host.invalid:5061;transport=tls")
    code, report = doctor_json("--config", str(config))
    assert code == 1 and by_name(report)["clearip-dns"]["status"] == "FAIL"


@pytest.mark.parametrize(("offset", "status"), [(5.0, "WARN"), (-45.0, "FAIL")])
def test_doctor_clock_offset_from_clearips_date(tmp_path: Path, pki: Pki, offset: float, status: str) -> None:
    server = TlsClearIp(pki, date_offset=offset)
    try:
        code, report = doctor_json("--config", str(doctor_config(tmp_path, pki, server.port)))
    finally:
        server.close()
    clock = by_name(report)["clock"]
    assert clock["status"] == status, clock
    # Date has 1 s resolution, and a loaded machine may delay reading the answer by another second
    # or so; 5 s (WARN) and -45 s (FAIL) stay far apart and far from 0 within that.
    assert abs(clock["offset_seconds"] - offset) <= 2.5, clock
    assert code == (1 if status == "FAIL" else 0)


def test_doctor_falls_back_to_a_keepalive_when_options_is_unanswered(tmp_path: Path, pki: Pki) -> None:
    server = TlsClearIp(pki, answer_options=False)
    try:
        code, report = doctor_json(
            "--config", str(doctor_config(tmp_path, pki, server.port)), "--timeout", "1"
        )
    finally:
        server.close()
    sip = by_name(report)["clearip-sip"]
    assert sip["status"] == "WARN" and "keep-alive pong" in sip["detail"], sip
    assert code == 0, report


def test_doctor_invalid_settings_fail_first(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.toml", timeout=120)
    code, report = doctor_json("--config", str(bad))
    assert code == 1 and [c["status"] for c in report["checks"]] == ["FAIL"]
    assert "timeout" in report["checks"][0]["detail"]


def test_doctor_listener_in_use_fails(tmp_path: Path, pki: Pki, clearip: TlsClearIp, sock_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        config = doctor_config(tmp_path, pki, clearip.port, udp=[f"{HOST}:{port}"])
        code, report = doctor_json("--config", str(config), "--control-socket", str(sock_dir / "x.sock"))
    udp = by_name(report)["listener-udp"]
    assert code == 1 and udp["status"] == "FAIL" and "cannot bind" in udp["detail"], udp


@pytest.mark.parametrize(
    ("advertise", "status"), [("203.0.113.10", "OK"), ("10.0.0.5", "FAIL"), ("", "FAIL")]
)
def test_doctor_on_ec2_compares_advertise_with_the_public_ip(
    tmp_path: Path, pki: Pki, clearip: TlsClearIp, advertise: str, status: str
) -> None:
    imds = ImdsStub("203.0.113.10")
    try:
        config = doctor_config(tmp_path, pki, clearip.port, **({"advertise": advertise} if advertise else {}))
        _, report = doctor_json("--config", str(config), "--ec2", "--imds-url", imds.url)
    finally:
        imds.close()
    ec2 = by_name(report)["ec2-address"]
    assert ec2["status"] == status and ec2["public_ipv4"] == "203.0.113.10", ec2


def test_doctor_asks_the_running_proxy(
    lab: Lab, tmp_path: Path, pki: Pki, clearip: TlsClearIp, sock_dir: Path
) -> None:
    sock = sock_dir / "c.sock"
    proxy = lab.proxy(
        None,
        clearip=f"sip:localhost:{clearip.port};transport=tls",
        clearip_ca=pki.ca_cert,
        extra=["--control-socket", str(sock)],
    )
    wait_for(lambda: sock.exists() and status_of(sock)["clearip"]["up"], what="the proxy's ClearIP link")
    config = doctor_config(
        tmp_path,
        pki,
        clearip.port,
        udp=[f"{HOST}:{proxy.port}"],
        tcp=[f"{HOST}:{proxy.port}", f"{HOST}:{free_port()}"],
    )
    code, report = doctor_json("--config", str(config), "--control-socket", str(sock))
    checks = report["checks"]
    named = by_name(report)
    assert named["proxy"]["status"] == "OK" and named["proxy"]["pid"] == proxy.proc.pid  # type: ignore[union-attr]
    assert (
        named["proxy-clearip-link"]["status"] == "OK"
        and named["proxy-clearip-link"]["tls_version"] == "TLSv1.3"
    )
    assert (
        named["listener-udp"]["status"] == "OK"
        and "bound by the running proxy" in named["listener-udp"]["detail"]
    )
    tcp = [c for c in checks if c["name"] == "listener-tcp"]
    assert [c["status"] for c in tcp] == ["OK", "WARN"] and "restart to apply" in tcp[1]["detail"]
    assert code == 0, report


# ---------------------------------------------------------------------------------------------
# trace
# ---------------------------------------------------------------------------------------------


def _routed_lab(lab: Lab, calls: int, sock: Path, **proxy_kw: Any) -> tuple[ProxyProcess, Any, Any]:
    carrier = lab.carrier("carrier1", "carrier_answer.xml", "udp", calls=calls)
    keys = dict(CLEARIP_KEYS, contacts=contact_list([(CALLED, carrier, 0.9)]))
    clear = lab.clearip("clearip_302.xml", keys, calls=calls)
    proxy = lab.proxy(clear.port, extra=["--control-socket", str(sock)], **proxy_kw)
    wait_for(sock.exists, what="the control socket")
    return proxy, clear, carrier


def test_trace_cli_writes_a_masked_pcap_of_a_calls_messages(lab: Lab, tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "c.sock"
    proxy, clear, carrier = _routed_lab(lab, 3, sock)
    out = tmp_path / "calls.pcap"
    t0 = time.monotonic()
    tracer = subprocess.Popen(
        [*PROXY_MODULE, "trace", "--seconds", "4", "--output", str(out),
         "--control-socket", str(sock)],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: status_of(sock)["trace"].get("active"), what="the trace to start")
        switch = lab.switch("uac_call.xml", proxy, "udp", calls=3, rate=10)
        stdout, stderr = tracer.communicate(timeout=15)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(5)
    assert switch.exit_code == 0, lab.describe()
    assert tracer.returncode == 0, stdout + stderr
    # Ran its 4 s (the clock started before the tracer, so never less), and stopped by itself: the
    # upper limit is communicate()'s 15 s, minus room for a loaded machine's start-up.
    assert 4.0 <= time.monotonic() - t0 < 14
    assert "phone numbers masked" in stdout and str(out) in stdout, stdout
    pkts = [_decode(p) for _, p in _read_pcap(out)]
    starts = [(proto, p[3].split(b"\r\n", 1)[0]) for p in pkts for proto in [p[0]]]
    invites_in = [s for s in starts if s[0] == "udp" and s[1].startswith(b"INVITE sip:+xxxxxxx0100@")]
    to_clearip = [p for p in pkts if p[0] == "tcp" and p[2][1] == clear.port and p[3].startswith(b"INVITE ")]
    to_carrier = [p for p in pkts if p[2][1] == carrier.port and p[3].startswith(b"INVITE ")]
    from_clearip = [p for p in pkts if p[1][1] == clear.port and p[3].startswith(b"SIP/2.0 302")]
    assert len(to_clearip) == 3 and len(from_clearip) == 3 and len(to_carrier) == 3, starts
    assert len(invites_in) >= 3, starts
    assert all(b"+15555550100" not in p[3].split(b"\r\n\r\n")[0] for p in pkts)
    # The ClearIP 302's Identity headers made it into the carrier INVITEs (decrypted view).
    assert all(b"Identity: " in p[3] for p in to_carrier)
    status = status_of(sock)["trace"]
    assert status["active"] is False and status["messages"] == len(pkts)


def test_trace_limits_and_control_errors(lab: Lab, tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "c.sock"
    proxy, _, _ = _routed_lab(lab, 4, sock)
    out = tmp_path / "small.txt"
    started = request(
        sock, {"cmd": "trace-start", "output": str(out), "seconds": 30, "max_bytes": 4096, "max_files": 2}
    )
    assert started["ok"], started
    again = request(sock, {"cmd": "trace-start", "output": str(tmp_path / "other.txt")})
    assert again == {"ok": False, "error": f"a trace is already running to {out}; stop it first"}
    assert not request(sock, {"cmd": "trace-start", "output": "relative.txt"})["ok"]
    assert not request(sock, {"cmd": "nope"})["ok"]
    switch = lab.switch("uac_call.xml", proxy, "udp", calls=4, rate=10)
    assert switch.exit_code == 0, lab.describe()
    stopped = request(sock, {"cmd": "trace-stop"})["trace"]
    assert stopped["active"] is False and stopped["stop_reason"] == "stopped on request"
    assert stopped["rotations"] >= 2 and stopped["files"] == [str(out), f"{out}.1"], stopped
    for f in stopped["files"]:
        assert 0 < Path(f).stat().st_size <= 4096
    assert not Path(f"{out}.2").exists()
    text = out.read_text()
    assert "==== " in text and ("<<< in  from" in text or ">>> out to" in text)


def test_sigusr1_toggles_a_default_trace_and_the_time_limit_ends_a_trace(
    lab: Lab, tmp_path: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace_dir = tmp_path / "traces"
    trace_dir.mkdir()
    monkeypatch.setenv("CLEARIP_TRACE_DIR", str(trace_dir))
    sock = sock_dir / "c.sock"
    proxy, _, _ = _routed_lab(lab, 2, sock)
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: status_of(sock)["trace"].get("active"), what="SIGUSR1 to start a trace")
    assert status_of(sock)["trace"]["max_bytes"] == 10 * 1024 * 1024
    switch = lab.switch("uac_call.xml", proxy, "udp", calls=1)
    assert switch.exit_code == 0, lab.describe()
    proxy.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: not status_of(sock)["trace"].get("active"), what="SIGUSR1 to stop the trace")
    files = list(trace_dir.glob("clearip-trace-*.txt"))
    assert len(files) == 1 and "INVITE sip:+xxxxxxx0100@" in files[0].read_text()
    assert status_of(sock)["trace"]["stop_reason"] == "stopped by SIGUSR1"
    # A trace ends by itself at its time limit, even with no traffic.
    request(sock, {"cmd": "trace-start", "output": str(tmp_path / "short.txt"), "seconds": 1})
    wait_for(lambda: not status_of(sock)["trace"].get("active"), timeout=4, what="the time limit")
    assert status_of(sock)["trace"]["stop_reason"] == "time limit reached"
    assert (tmp_path / "short.txt").exists()


# ---------------------------------------------------------------------------------------------
# SIGHUP reload under load
# ---------------------------------------------------------------------------------------------


def test_sighup_reload_under_sipp_load_drops_no_call_and_applies_new_settings(
    lab: Lab, tmp_path: Path, sock_dir: Path
) -> None:
    calls, rate = 24, 4  # ~6 s of calls at 4 cps; the reload lands in the middle
    sock = sock_dir / "c.sock"
    carrier = lab.carrier("carrier1", "carrier_answer.xml", "udp", calls=calls, timeout=40)
    keys = dict(CLEARIP_KEYS, contacts=contact_list([(CALLED, carrier, 0.9)]))
    clear = lab.clearip("clearip_302.xml", keys, calls=calls, timeout=40)
    port = free_port()
    base: dict[str, Any] = {
        "udp": [f"{HOST}:{port}"],
        "tcp": [f"{HOST}:{port}"],
        "clearip": f"sip:{HOST}:{clear.port};transport=tcp",
        "timeout": 2.0,
        "allow": ["127.0.0.0/8"],
        "copy_headers": ["Identity", "P-Asserted-Identity"],
        "metrics": "off",
    }
    config = write_config(tmp_path / "proxy.toml", **base)
    proxy = ProxyProcess(tmp_path, "unused")
    proxy.port = port
    proxy.args = [
        *PROXY_MODULE,
        "run",
        "--config",
        str(config),
        "--control-socket",
        str(sock),
    ]
    lab.proxies.append(proxy)
    proxy.start()
    assert wait_established(clear.port, 5.0), proxy.output()
    wait_for(sock.exists, what="the control socket")
    # Before the reload, 127.0.0.2 is allowed: its OPTIONS gets 200.
    before = lab.switch(
        "uac_options.xml", proxy, "udp", name="other-before", extra=["-i", "127.0.0.2"], timeout=3
    )
    assert before.exit_code == 0, lab.describe()

    keys = {"ruri_user": CALLED, "ruri_host": f"{HOST}:{port}", "max_forwards": "70", "caller_identity": "x"}
    switch = lab.sipp(
        "switch",
        "uac_call.xml",
        transport="udp",
        remote=f"{HOST}:{port}",
        calls=calls,
        rate=rate,
        timeout=40,
        keys=keys,
    )
    load = threading.Thread(target=switch.run, args=(45,), daemon=True)
    load.start()
    try:
        time.sleep(2.5)  # calls in progress
        write_config(
            tmp_path / "proxy.toml",
            **dict(
                base,
                timeout=3.5,
                allow=["127.0.0.1/32"],
                copy_headers=["Identity"],
                emergency_numbers=["911", "933", "999"],
                breaker_threshold=7,
                breaker_cool_off=20.0,
                max_contacts=3,
                fork_window=20.0,
                udp=[f"{HOST}:{free_port()}"],  # needs a restart: logged, not applied
            ),
        )
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status_of(sock)["settings"]["timeout"] == 3.5, what="the reload")
    finally:
        load.join(50)
    assert switch.exit_code == 0, "a call failed across the reload\n" + lab.describe()
    assert len(switch.final_responses()) == calls and {m.status for m in switch.final_responses()} == {200}
    lab.settle(clear, carrier)
    invites = carrier.received("INVITE")
    assert len(invites) == calls
    # copy_headers: calls routed after the reload carry ClearIP's Identity, but the switch's own PAI
    # instead of ClearIP's (only the configured headers are replaced).
    assert invites[0].all("P-Asserted-Identity") == [PAI_OUTBOUND], lab.describe()
    assert invites[-1].all("P-Asserted-Identity") == [f"<sip:+12025550100@{HOST}>"], lab.describe()
    assert invites[-1].all("Identity") == [IDENTITY_1, IDENTITY_2]
    st = status_of(sock)
    assert st["settings"]["allow"] == ["127.0.0.1/32"] and st["settings"]["copy_headers"] == ["Identity"]
    # The breaker's settings reload too, and the status shows what is in force.
    assert (st["settings"]["breaker_threshold"], st["settings"]["breaker_cool_off"]) == (7, 20.0)
    assert (st["settings"]["max_contacts"], st["settings"]["fork_window"]) == (3, 20.0)
    assert st["clearip"]["breaker"] == "closed"
    assert st["listeners"][0]["address"] == f"{HOST}:{port}"  # the listener stayed
    out = proxy.log_text()
    assert "settings reloaded; needs a restart to apply: udp" in out, proxy.output()
    # New emergency number: 503 at once, ClearIP not asked.
    emergency = lab.switch("uac_expect_final.xml", proxy, "udp", number="999", name="emergency")
    assert emergency.exit_code == 0 and emergency.final_responses()[0].status == 503, lab.describe()
    assert len(clear.received("INVITE")) == calls
    # New allow-list: 127.0.0.2 is now dropped without an answer.
    after = lab.switch(
        "uac_options.xml", proxy, "udp", name="other-after", extra=["-i", "127.0.0.2"], timeout=2
    )
    assert after.exit_code != 0 and not after.received(), lab.describe()
