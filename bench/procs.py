"""Processes of the benchmark: SIPp peers, the proxy under test, Kamailio; /proc readings.

Every process is started in its own session (so a Ctrl-C on the terminal reaches only us, and we
stop them ourselves), registered in :data:`REGISTRY`, and stopped by :func:`stop_all` (called from
``finally`` blocks and at exit). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import report

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / ".build" / "compiled"  # `make compiled` (setup.py): the mypyc-compiled core


def proxy_pythonpath() -> str:
    """PYTHONPATH for ours: the compiled build first when CLEARIP_COMPILED_DIR names it
    (``python -m bench --build compiled``, the default), then the repository."""
    compiled = os.environ.get("CLEARIP_COMPILED_DIR", "")
    return os.pathsep.join([*([compiled] if compiled else []), str(REPO)])


SCENARIOS = Path(__file__).resolve().parent / "scenarios"
KAMAILIO_CFG = Path(__file__).resolve().parent / "kamailio" / "kamailio.cfg"
SIPP = shutil.which("sipp") or "/usr/bin/sipp"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
TASKSET = shutil.which("taskset") or "/usr/bin/taskset"
CLK_TCK = os.sysconf("SC_CLK_TCK")

REGISTRY: list[Proc] = []
_used_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port(host: str = HOST) -> int:
    """A port free for UDP and TCP on ``host``, chosen below Linux's ephemeral range (32768+) so
    outgoing connections cannot take it meanwhile, and not handed out before in this process.
    Thread-safe (the test harness calls it from several threads)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    with _port_lock:
        for _ in range(500):
            port = rng.randrange(12000, 32000)
            if port in _used_ports:
                continue
            try:
                with (
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t,
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
                ):
                    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    t.bind((host, port))
                    u.bind((host, port))
            except OSError:
                continue
            _used_ports.add(port)
            return port
    raise RuntimeError(f"no free port on {host}")


def listening(port: int, transport: str) -> bool:
    table = "/proc/net/tcp" if transport == "tcp" else "/proc/net/udp"
    want = (f"0100007F:{port:04X}", f"00000000:{port:04X}")
    for ln in Path(table).read_text().splitlines()[1:]:
        p = ln.split()
        if len(p) > 3 and p[1] in want and (transport != "tcp" or p[3] == "0A"):
            return True
    return False


def established(port: int) -> int:
    want = f"0100007F:{port:04X}"
    n = 0
    for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        p = ln.split()
        if len(p) > 3 and p[1] == want and p[3] == "01":
            n += 1
    return n


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.03)
    raise TimeoutError(f"{what} (after {timeout:g} s)")


# ---------------------------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """``pid`` and all its descendants (Kamailio forks its workers)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def _stat_seconds(pids: Sequence[int], ticks_of: Callable[[str], int]) -> float:
    """Seconds summed over ``pids`` from their /proc stat lines (a process gone meanwhile counts 0)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            ticks += ticks_of(Path(f"/proc/{pid}/stat").read_text())
    return ticks / CLK_TCK


def cpu_seconds(pids: Sequence[int]) -> float:
    return _stat_seconds(pids, report.parse_proc_stat_cpu_ticks)


def sys_seconds(pids: Sequence[int]) -> float:
    """The kernel's part of :func:`cpu_seconds` (stime)."""
    return _stat_seconds(pids, report.parse_proc_stat_sys_ticks)


def system_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    return report.parse_proc_stat_busy(Path("/proc/stat").read_text()) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    try:
        return report.parse_proc_status_kb(Path(f"/proc/{pid}/status").read_text(), key)
    except OSError:
        return 0


def pss_kb(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += report.parse_proc_status_kb(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")
    return total


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class Proc:
    """A started process (own session / process group), its output in ``log``."""

    def __init__(
        self, name: str, args: Sequence[str], cwd: Path, log: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.args = list(args)
        self.log = log
        out = log.open("wb")
        try:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            out.close()
        REGISTRY.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 3.0) -> int | None:
        """Signal the process group (only ours: it was started in its own session), then SIGKILL."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5)
        else:
            # the leader is gone; make sure nothing of its group is left (Kamailio workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            REGISTRY.remove(self)
        return self.popen.returncode

    def tail(self, limit: int = 3000) -> str:
        try:
            t = self.log.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""
        return t[-limit:]


def stop_all() -> None:
    for p in list(reversed(REGISTRY)):
        p.stop(signal.SIGKILL, 2.0)


NICE = shutil.which("nice") or "/usr/bin/nice"
PRIORITY = ["-n", "-10"]  # ahead of background work on a shared machine (as root; a no-op otherwise)


def pin(cpus: str | None) -> list[str]:
    """The command prefix for every benchmark process: raised priority, and the CPU set when pinned."""
    prefix = [NICE, *PRIORITY] if os.geteuid() == 0 else []
    return prefix + ([TASKSET, "-c", cpus] if cpus else [])


class Sipp(Proc):
    """One SIPp: ``role`` names its files in ``workdir`` (``role.out``, ``role.csv`` stats, ...)."""

    def __init__(
        self,
        workdir: Path,
        role: str,
        scenario: str,
        *,
        port: int,
        transport: str,
        remote: str | None = None,
        keys: dict[str, str] | None = None,
        extra: Sequence[str] = (),
        cpus: str | None = None,
        trace: bool = False,
        bound_s: float = 300.0,
    ) -> None:
        self.role = role
        self.port = port
        self.transport = transport
        self.stat_path = workdir / f"{role}.csv"
        self.err_path = workdir / f"{role}.err"
        self.msg_path = workdir / f"{role}.msg"
        args = [*pin(cpus), SIPP]
        if remote:
            args.append(remote)
        args += ["-sf", str(SCENARIOS / scenario), "-i", HOST, "-p", str(port)]
        args += ["-t", {"udp": "u1", "tcp": "t1"}[transport], "-nostdin"]
        args += ["-trace_stat", "-stf", str(self.stat_path), "-fd", "1"]
        args += ["-trace_err", "-error_file", str(self.err_path)]
        args += ["-timeout", f"{bound_s:g}s", "-buff_size", "4194304"]
        if trace:
            args += ["-trace_msg", "-message_file", str(self.msg_path)]
        for k, v in (keys or {}).items():
            args += ["-key", k, v]
        args += list(extra)
        super().__init__(role, args, workdir, workdir / f"{role}.out")

    def start_server(self) -> Sipp:
        wait_for(
            lambda: listening(self.port, self.transport) or not self.alive(),
            5.0,
            f"SIPp {self.role} did not bind {self.port}",
        )
        if not self.alive():
            raise RuntimeError(f"SIPp {self.role} exited at start:\n{self.tail()}")
        return self

    def last_stats(self) -> dict[str, str] | None:
        try:
            rows = report.parse_stat_csv(self.stat_path.read_text())
        except OSError:
            return None
        return rows[-1] if rows else None

    def errors(self, limit: int = 2000) -> str:
        try:
            return self.err_path.read_bytes().decode("utf-8", "replace")[:limit]
        except OSError:
            return ""


def proxy_command(port: int, clearip_port: int, max_in_flight: int, extra: Sequence[str] = ()) -> list[str]:
    """The proxy under test, exactly as the brief runs it."""
    return [
        sys.executable,
        "-P",  # the working directory off sys.path: PYTHONPATH decides which build runs
        "-m",
        "proxy_runtime",
        "run",
        "--udp",
        f"{HOST}:{port}",
        "--tcp",
        f"{HOST}:{port}",
        "--clearip",
        f"sip:{HOST}:{clearip_port};transport=tcp",
        "--timeout",
        "5",
        "--allow",
        "127.0.0.0/8",
        "--metrics",
        "off",
        "--max-in-flight",
        str(max_in_flight),
        # no control socket: the default path is shared by every proxy on the machine, and a test's
        # doctor/trace elsewhere must not reach (and trace) the proxy under load
        "--control-socket",
        "off",
        *extra,
    ]


class Target:
    """The proxy under test (``ours``) or the reference (``kamailio``): start, pids, CPU, memory."""

    def __init__(
        self,
        kind: str,
        workdir: Path,
        clearip_port: int,
        cpus: str | None,
        max_in_flight: int,
        proxy_args: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.clearip_port = clearip_port
        self.cpus = cpus
        self.max_in_flight = max_in_flight
        self.proxy_args = list(proxy_args)
        self.proc: Proc | None = None

    def start(self) -> Target:
        if self.kind == "ours":
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
            env["PYTHONPATH"] = proxy_pythonpath() + os.pathsep + env.get("PYTHONPATH", "")
            args = [
                *pin(self.cpus),
                *proxy_command(self.port, self.clearip_port, self.max_in_flight, self.proxy_args),
            ]
            proc = self.proc = Proc("proxy", args, REPO, self.workdir / "proxy.log", env)
            wait_for(
                lambda: b"ready" in proc.log.read_bytes() or not proc.alive(),
                15.0,
                "the proxy printed no 'ready' line",
            )
            if not self.proc.alive():
                raise RuntimeError(f"the proxy exited at start:\n{self.proc.tail()}")
            wait_for(lambda: established(self.clearip_port) > 0, 5.0, "the proxy did not connect to ClearIP")
        else:
            cfg = KAMAILIO_CFG.read_text()
            for k, v in {
                "__SIP_PORT__": str(self.port),
                "__CLEARIP_PORT__": str(self.clearip_port),
                "__CHILDREN__": "4",
                "__TCP_CHILDREN__": "2",
            }.items():
                cfg = cfg.replace(k, v)
            path = self.workdir / "kamailio.cfg"
            path.write_text(cfg)
            args = [
                *pin(self.cpus),
                KAMAILIO,
                "-DD",
                "-E",
                "-f",
                str(path),
                "-m",
                "1024",
                "-M",
                "16",
                "-Y",
                str(self.workdir),
            ]
            kproc = self.proc = Proc("kamailio", args, self.workdir, self.workdir / "kamailio.log")
            wait_for(
                lambda: listening(self.port, "udp") or not kproc.alive(),
                10.0,
                "Kamailio did not bind its port",
            )
            if not self.proc.alive():
                raise RuntimeError(f"Kamailio exited at start:\n{self.proc.tail()}")
            time.sleep(0.5)  # workers forked
        return self

    def pids(self) -> list[int]:
        assert self.proc is not None
        if self.kind == "ours":
            # with taskset the leader execs python itself: one process
            return [self.proc.pid]
        return children_of(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def sys_seconds(self) -> float:
        return sys_seconds(self.pids())

    def memory_kb(self) -> int:
        """ours: VmRSS of the process; Kamailio: the sum of Pss over its processes (shared memory
        counted once)."""
        if self.kind == "ours":
            return status_kb(self.pids()[0], "VmRSS")
        return pss_kb(self.pids())

    def peak_kb(self) -> int:
        if self.kind == "ours":
            return status_kb(self.pids()[0], "VmHWM")
        return self.memory_kb()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def stop(self) -> None:
        if self.proc is not None:
            # ours drains on SIGTERM (up to 30 s with calls up): the benchmark does not wait for that
            self.proc.stop(signal.SIGTERM, 2.0)
