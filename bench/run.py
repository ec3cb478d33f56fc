"""The benchmark's phases: a session (ClearIP + carriers + the proxy under test), smoke check,
rate steps, the half-rate and 503-mix runs, the ringing-memory run.

A *session* starts ClearIP (SIPp UAS, TCP server: the proxy's one connection), two carriers (SIPp
UAS, UDP; the 302 lists both, the first always answers) and the target (ours or Kamailio), and
stops them all when left. Each run inside it is one switch UAC (SIPp, UDP) at a fixed rate.
"""

from __future__ import annotations

import base64
import contextlib
import json
import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs, report
from bench.procs import HOST, Sipp, Target
from bench.report import MemoryResult, StepResult

NUMBER = "+18005550100"
CLEARIP_PAI = "<sip:+12025550100@clearip.example;user=phone>;verstat=TN-Validation-Passed"
SWITCH_IDENTITY_MARK = "eyJzd2l0Y2giOiJvd24ifQ"  # the switch's own Identity (must not reach the carrier)


def make_identity(size: int = 900) -> str:
    """A SHAKEN PASSporT Identity header value of about ``size`` bytes (ppt=shaken, ES256,
    attest A) that decodes as ClearIP's do: the proxy's STIR/SHAKEN reading takes its usual path,
    not the one for an undecodable value. The size is made up in the certificate URL (x5u)."""
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731

    def header(x5u: str) -> str:
        return b64(json.dumps({"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": x5u}).encode())

    claims = {
        "attest": "A",
        "dest": {"tn": ["18005550100"]},
        "iat": 1700000000,
        "orig": {"tn": "12025550100"},
        "origid": "4437c7eb-8f4a-4a2a-9a93-2bd1f1e4cb3c",
    }
    payload = b64(json.dumps(claims).encode())
    sig = b64(bytes(range(64)))
    base = "https://certificates.clearip.example/shaken/"
    params = f";info=<{base}cert.pem>;alg=ES256;ppt=shaken"
    room = size - len(header(base + ".pem")) - len(payload) - len(sig) - len(params) - 2
    x5u = base + "c" * max(0, room * 3 // 4) + ".pem"  # base64 makes 4 characters of every 3 bytes
    return f"{header(x5u)}.{payload}.{sig}{params}"


IDENTITY = make_identity()


def write_inf(path: Path, mix503: bool) -> Path:
    """The switch's injection file: field0 tells ClearIP 302 or 503 (3 in 10 calls for the mix)."""
    pattern = ["302", "302", "503", "302", "302", "503", "302", "302", "503", "302"] if mix503 else ["302"]
    path.write_text("SEQUENTIAL\n" + "".join(f"{p};{NUMBER}\n" for p in pattern))
    return path


@dataclass
class Session:
    target_kind: str
    pinned: bool
    workdir: Path
    carrier_hold_ms: int = 0
    trace: bool = False
    max_in_flight: int = 30000
    proxy_args: list[str] = field(default_factory=list)
    clearip: Sipp | None = None
    carriers: list[Sipp] = field(default_factory=list)
    target: Target | None = None
    runs: int = 0

    @property
    def proxy_cpus(self) -> str | None:
        return "0" if self.pinned else None

    @property
    def sipp_cpus(self) -> str | None:
        return "1" if self.pinned else None

    def peers(self) -> list[Sipp]:
        return ([self.clearip] if self.clearip else []) + self.carriers

    def start(self) -> Session:
        self.workdir.mkdir(parents=True, exist_ok=True)
        c1, c2 = procs.free_port(), procs.free_port()
        contacts = f"<sip:{NUMBER}@{HOST}:{c1}>;q=0.9, <sip:{NUMBER}@{HOST}:{c2}>;q=0.5"
        for i, port in enumerate((c1, c2), 1):
            self.carriers.append(
                Sipp(
                    self.workdir,
                    f"carrier{i}",
                    "carrier_uas.xml",
                    port=port,
                    transport="udp",
                    extra=["-d", str(self.carrier_hold_ms)],
                    cpus=self.sipp_cpus,
                    trace=self.trace,
                ).start_server()
            )
        self.clearip = Sipp(
            self.workdir,
            "clearip",
            "clearip_uas.xml",
            port=procs.free_port(),
            transport="tcp",
            keys={"identity": IDENTITY, "pai": CLEARIP_PAI, "contacts": contacts},
            cpus=self.sipp_cpus,
            trace=self.trace,
        ).start_server()
        self.target = Target(
            self.target_kind,
            self.workdir,
            self.clearip.port,
            self.proxy_cpus,
            self.max_in_flight,
            self.proxy_args,
        ).start()
        return self

    def stop(self) -> None:
        if self.target:
            self.target.stop()
        for p in self.peers():
            p.stop()

    def carried(self) -> int:
        """Calls the proxy passed on to ClearIP so far (ClearIP's successful INVITE-302-ACK
        exchanges, cumulative over the session): the calls it did not refuse. Not the carriers'
        count: with Kamailio's several workers an ACK or BYE sometimes overtakes its INVITE and
        the carrier SIPp aborts a call the switch saw completed (2-10 in 4,000 calls measured)."""
        assert self.clearip is not None
        return report.stat_int(self.clearip.last_stats(), "SuccessfulCall(C)")

    def peers_retrans(self) -> int:
        return sum(report.stat_int(p.last_stats(), "Retransmissions(C)") for p in self.peers())

    def sipp_cpu(self, extra: list[int]) -> float:
        return procs.cpu_seconds([p.pid for p in self.peers()] + extra)

    # --- one run --------------------------------------------------------------------------------
    def uac(
        self,
        name: str,
        rate: int,
        calls: int,
        *,
        hold_ms: int,
        mix503: bool,
        recv_timeout_ms: int | None,
        limit: int,
        bound_s: float,
        trace: bool = False,
    ) -> Sipp:
        assert self.target is not None
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        inf = write_inf(d / "calls.csv", mix503)
        extra = [
            "-inf",
            str(inf),
            "-m",
            str(calls),
            "-r",
            str(rate),
            "-rp",
            "1000",
            "-d",
            str(hold_ms),
            "-l",
            str(limit),
            "-trace_rtt",
            "-rtt_freq",
            "100",
            "-max_retrans",
            "5",
        ]
        if recv_timeout_ms:
            extra += ["-recv_timeout", str(recv_timeout_ms)]
        return Sipp(
            d,
            "switch",
            "switch_uac.xml",
            port=procs.free_port(),
            transport="udp",
            remote=f"{HOST}:{self.target.port}",
            extra=extra,
            cpus=self.sipp_cpus,
            trace=trace,
            bound_s=bound_s,
        )

    def run_rate(
        self,
        kind: str,
        rate: int,
        seconds: float,
        *,
        hold_ms: int = 0,
        mix503: bool = False,
        trace: bool = False,
    ) -> StepResult:
        """One switch UAC at ``rate`` cps for ``seconds``; the figures of the step."""
        assert self.target is not None
        self.runs += 1
        calls = max(1, int(rate * seconds))
        res = StepResult(self.target_kind, self.pinned, kind, rate, seconds)
        retrans0 = self.peers_retrans()
        carried0 = self.carried()
        cpu0 = self.target.cpu_seconds()
        sys0 = self.target.sys_seconds()
        sipp0 = self.sipp_cpu([])
        kids0 = _children_cpu()
        busy0 = procs.system_busy_seconds()
        t0 = time.monotonic()
        bound = seconds + 25
        uac = self.uac(
            f"run{self.runs:02d}-{kind}-{rate}",
            rate,
            calls,
            hold_ms=hold_ms,
            mix503=mix503,
            recv_timeout_ms=6000,
            limit=max(1000, rate * 10),
            bound_s=bound,
            trace=trace,
        )
        code = uac.wait(bound + 5)
        if code is None:
            res.notes.append(
                f"{self.target_kind} {kind} {rate} cps: the switch UAC overran its bound; stopped"
            )
            uac.stop()
            code = uac.popen.returncode
        uac_cpu = _children_cpu() - kids0  # the UAC, reaped by wait(): its CPU is in our children's rusage
        wall = time.monotonic() - t0
        cpu1 = self.target.cpu_seconds()
        sys1 = self.target.sys_seconds()
        busy1 = procs.system_busy_seconds()
        time.sleep(1.2)  # UAS stat files are dumped every second
        res.exit_code = code
        st = uac.last_stats()
        res.calls = report.stat_int(st, "TotalCallCreated")
        res.ok = report.stat_int(st, "SuccessfulCall(C)")
        res.failed = report.stat_int(st, "FailedCall(C)")
        res.retrans_switch = report.stat_int(st, "Retransmissions(C)")
        res.retrans_peers = self.peers_retrans() - retrans0
        res.carried = self.carried() - carried0
        samples = []
        for f in uac.log.parent.glob("*_rtt.csv"):
            samples += report.parse_rtt_csv(f.read_text())
        rtts = [s.rtt_ms for s in samples]
        res.p50_ms = report.percentile(rtts, 50)
        res.p99_ms = report.percentile(rtts, 99)
        res.achieved_cps = report.achieved_cps(samples)
        res.cpu_s = cpu1 - cpu0
        res.cpu_sys_s = sys1 - sys0
        if res.calls:
            res.cpu_s_per_1k = res.cpu_s / res.calls * 1000
        res.rss_kb = self.target.memory_kb()
        res.peak_rss_kb = self.target.peak_kb()
        sipp_cpu = self.sipp_cpu([]) - sipp0 + uac_cpu
        res.sipp_cpu_util = sipp_cpu / max(wall, 0.001)
        res.other_load = max(0.0, (busy1 - busy0 - res.cpu_s - sipp_cpu) / max(wall, 0.001))
        if res.failed or code not in (0, None):
            errs = uac.errors(1500).strip()
            res.notes.append(
                f"{self.target_kind} {'pinned' if self.pinned else 'unpinned'} {kind} {rate} cps: "
                f"{res.failed} failed (SIPp exit {code}); files in {uac.log.parent}"
                + (f"; first SIPp error: {errs.splitlines()[0][:300]}" if errs else "")
            )
        if not self.target.alive() and self.target.proc is not None:
            res.notes.append(
                f"{self.target_kind} exited during {kind} {rate} cps:\n{self.target.proc.tail()}"
            )
        return res

    # --- the ringing-memory run ------------------------------------------------------------------
    def run_memory(self, n: int, rate: int) -> MemoryResult:
        """``n`` calls ringing at once (the carriers hold after 180); memory loaded vs idle."""
        assert self.target is not None
        res = MemoryResult(
            self.target_kind,
            self.pinned,
            n,
            metric="VmRSS" if self.target_kind == "ours" else "sum of Pss (all processes)",
        )
        time.sleep(0.5)
        res.idle_kb = self.target.memory_kb()
        bound = n / rate + 40
        uac = self.uac(
            "memory", rate, n, hold_ms=0, mix503=False, recv_timeout_ms=None, limit=n + 100, bound_s=bound
        )
        carrier = self.carriers[0]
        deadline = time.monotonic() + n / rate + 20
        ringing = 0
        while time.monotonic() < deadline:
            time.sleep(1.0)
            ringing = report.stat_int(carrier.last_stats(), "CurrentCall")
            if ringing >= n or not uac.alive():
                break
        time.sleep(2.0)  # the last 180s relayed; stats dumped again
        res.loaded_kb = self.target.memory_kb()
        ringing = report.stat_int(carrier.last_stats(), "CurrentCall")
        uac_current = report.stat_int(uac.last_stats(), "CurrentCall")
        uac_failed = report.stat_int(uac.last_stats(), "FailedCall(C)")
        res.ringing = min(ringing, uac_current) if uac_current else ringing
        if res.ringing < n:
            res.notes.append(
                f"{self.target_kind} memory run: {res.ringing} of {n} calls ringing at the measurement "
                f"(switch failed {uac_failed}); files in {uac.log.parent}"
            )
        uac.stop(signal.SIGKILL, 1.0)
        return res


def _children_cpu() -> float:
    """CPU seconds of every child reaped so far (user + system)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@contextlib.contextmanager
def session(*args, **kw) -> Iterator[Session]:
    s = Session(*args, **kw)
    try:
        yield s.start()
    finally:
        s.stop()


def smoke(kind: str, pinned: bool, workdir: Path, calls: int = 10) -> list[str]:
    """A few calls of the 302/503 mix with every peer tracing: the relay must be right before its
    speed means anything. Returns the problems found (empty = fine)."""
    problems: list[str] = []
    with session(kind, pinned, workdir, trace=True) as s:
        r = s.run_rate("smoke", 10, calls / 10, mix503=True, trace=True)
        time.sleep(0.5)
        if r.failed or r.ok != calls:
            problems.append(f"{kind}: {r.ok}/{calls} smoke calls succeeded, {r.failed} failed: {r.notes}")
        for p in s.peers():
            p.stop(signal.SIGUSR1, 2.0)
        text = (
            s.carriers[0].msg_path.read_bytes().decode(errors="replace")
            if s.carriers[0].msg_path.exists()
            else ""
        )
        invites = [m for m in text.split("INVITE sip:")[1:]]
        want = sum(1 for i in range(calls) if i % 10 not in (2, 5, 8))
        if len(invites) != want:
            problems.append(f"{kind}: carrier 1 got {len(invites)} INVITEs, expected {want}")
        with_identity = sum(
            1 for m in invites if f"Identity: {IDENTITY}\r\n" in m.split("\r\n\r\n")[0] + "\r\n"
        )
        if with_identity != len(invites):
            problems.append(
                f"{kind}: {len(invites) - with_identity} INVITEs reached the carrier without "
                "ClearIP's Identity header"
            )
        if any(SWITCH_IDENTITY_MARK in m.split("\r\n\r\n")[0] for m in invites):
            problems.append(f"{kind}: the switch's own Identity reached the carrier (not replaced)")
        if sum(1 for m in invites if f"P-Asserted-Identity: {CLEARIP_PAI}" in m) != len(invites):
            problems.append(f"{kind}: ClearIP's P-Asserted-Identity missing at the carrier")
        c2 = s.carriers[1].msg_path
        if c2.exists() and b"INVITE sip:" in c2.read_bytes():
            problems.append(f"{kind}: carrier 2 (q=0.5) got an INVITE though carrier 1 answered")
    return problems
