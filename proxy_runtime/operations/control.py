"""The local control socket of a running proxy: status, and call traces switched on and off.

An asyncio Unix-socket server inside the proxy. A client sends one JSON object on one line and gets
one JSON object on one line back, then the connection closes::

    {"cmd": "status"}
    {"cmd": "trace-start", "output": "/tmp/t.pcap", "seconds": 60, "format": "pcap",
     "max_bytes": 10485760, "max_files": 5}
    {"cmd": "trace-stop"}

Answers carry ``"ok": true`` or ``"ok": false, "error": "..."``. The socket is created mode 0660
(owner and group of the proxy, and root); ``clearip-proxy doctor`` and ``clearip-proxy trace`` are
its clients (:mod:`proxy_runtime.operations.doctor`, :mod:`proxy_runtime.operations.trace_cli`),
through :func:`find_control_socket` and :func:`request`. SIGUSR1 toggles a trace with default
limits (:meth:`ControlServer.toggle_trace`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy_runtime.core import build_kind
from proxy_runtime.operations.trace import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FILES,
    DEFAULT_SECONDS,
    TraceOptions,
    Tracer,
)

if TYPE_CHECKING:
    from proxy_runtime.transport.server import ProxyServer

log = logging.getLogger("clearip.control")

ENV_SOCKET = "CLEARIP_CONTROL_SOCKET"
ENV_TRACE_DIR = "CLEARIP_TRACE_DIR"
RUN_DIR = Path("/run/clearip-proxy")
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 5.0


def socket_candidates(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where the control socket may be, in order of preference (the server takes the first whose
    directory it can write; clients try each that exists)."""
    env = os.environ if environ is None else environ
    out = [RUN_DIR / "control.sock"]
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        out.append(Path(xdg) / "clearip-proxy.sock")
    out.append(Path(tempfile.gettempdir()) / f"clearip-proxy-{os.getuid()}.sock")
    return out


def default_socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """The path the proxy listens on when neither ``--control-socket`` nor the env var says."""
    env = os.environ if environ is None else environ
    if env.get(ENV_SOCKET):
        return Path(env[ENV_SOCKET])
    for p in socket_candidates(env):
        if p.parent.is_dir() and os.access(p.parent, os.W_OK | os.X_OK):
            return p
    return socket_candidates(env)[-1]


def default_trace_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(ENV_TRACE_DIR):
        return Path(env[ENV_TRACE_DIR])
    for d in (Path("/var/log/clearip-proxy"), Path("/var/lib/clearip-proxy")):
        if d.is_dir() and os.access(d, os.W_OK | os.X_OK):
            return d
    return Path(tempfile.gettempdir())


class ControlError(Exception):
    """A request the control server refuses; the message goes back to the client."""


class ControlServer:
    """Serves the control socket for ``proxy``; attaches and detaches its tracer."""

    def __init__(self, proxy: ProxyServer, path: str | os.PathLike[str]) -> None:
        self.proxy = proxy
        self.path = Path(path)
        self.started = time.time()
        self.tracer: Tracer | None = None
        self.last_trace: dict[str, Any] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stop_timer: asyncio.TimerHandle | None = None

    # --- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        path = self.path
        if path.exists() or path.is_symlink():
            st = path.lstat()
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{path} exists and is not a socket")
            if _answers(path):
                raise OSError(f"{path}: another proxy is using this control socket")
            if st.st_uid != os.getuid():
                raise OSError(f"{path} belongs to another user")
            path.unlink()  # stale, from a proxy that did not exit cleanly
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(path))
        finally:
            os.umask(old)
        log.info("control socket: %s", path)

    async def stop(self) -> None:
        if self.tracer is not None:
            self.tracer.stop("proxy stopping")
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(OSError):
            if self.path.is_socket():
                self.path.unlink()

    # --- requests -------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            except (TimeoutError, ValueError, asyncio.LimitOverrunError):
                return
            if not line or len(line) > MAX_REQUEST:
                return
            answer = self.dispatch(line)
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not JSON"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "expected a JSON object"}
        cmd = req.get("cmd")
        try:
            if cmd == "status":
                return {"ok": True, **self.status()}
            if cmd == "trace-start":
                return {"ok": True, "trace": self.start_trace(req)}
            if cmd == "trace-stop":
                return {"ok": True, "trace": self.stop_trace()}
            if cmd == "trace-status":
                return {"ok": True, "trace": self.trace_status()}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        return {
            "ok": False,
            "error": f"unknown cmd {cmd!r}; use status, trace-start, trace-stop, trace-status",
        }

    # --- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        p = self.proxy
        s = p.settings
        link = p.link
        core = p.core
        return {
            "pid": os.getpid(),
            "build": build_kind(),  # compiled | pure (setup.py, CLEARIP_COMPILE)
            "uptime": round(time.time() - self.started, 1),
            "listeners": [{"transport": lst.transport, "address": str(lst.bound)} for lst in p.listeners],
            "clearip": {
                "uri": s.clearip,
                "up": bool(link is not None and link.up),
                "tls_version": link.tls_version if link is not None else None,
                "reconnects": link.reconnects if link is not None else 0,
                "last_error": link.last_error if link is not None else "",
                # closed | open | half-open now (an open breaker past its cool-off reads
                # half-open, as the next call would find it; docs/FAULTS.md)
                "breaker": (
                    core.breaker.state_at(asyncio.get_running_loop().time()).value
                    if core is not None
                    else "closed"
                ),
            },
            "calls_in_flight": core.in_flight if core is not None else 0,
            # Overload control (docs/FAULTS.md): the queue delay it acted on last, the share of
            # new INVITEs it refuses now, and how many it has refused since start.
            "overload": {
                "queue_delay_ms": round(core.overload.delay * 1000, 1) if core is not None else 0.0,
                "refusing_percent": round(core.overload.refuse * 100, 1) if core is not None else 0.0,
                "refused": core.overload.refused if core is not None else 0,
            },
            "draining": bool(core is not None and core.draining),
            "advertise": core.advertise if core is not None else s.advertise,
            "settings": {
                "timeout": s.timeout,
                "ring_timeout": s.ring_timeout,
                "allow": list(s.allow),
                "copy_headers": list(s.copy_headers),
                "redirect_codes": list(s.redirect_codes),
                "max_contacts": s.max_contacts,
                "fork_window": s.fork_window,
                "emergency_numbers": list(s.emergency_numbers),
                "emergency_action": s.emergency_action,
                "max_in_flight": s.max_in_flight,
                "clearip_connect_wait": s.clearip_connect_wait,
                "breaker_threshold": s.breaker_threshold,
                "breaker_window": s.breaker_window,
                "breaker_cool_off": s.breaker_cool_off,
                "breaker_probe_every": s.breaker_probe_every,
                "overload_queue_delay": s.overload_queue_delay,
                "overload_retry_after": s.overload_retry_after,
                "metrics": s.metrics,
                "metrics_interval": s.metrics_interval,
                "proxy_id": s.proxy_id,
                "log_level": s.log_level,
                "log_numbers": s.log_numbers,
            },
            "trace": self.trace_status(),
        }

    # --- traces ---------------------------------------------------------------------------
    def trace_status(self) -> dict[str, Any]:
        if self.tracer is not None:
            return self.tracer.status()
        return self.last_trace or {"active": False}

    def start_trace(self, req: Mapping[str, Any]) -> dict[str, Any]:
        if self.tracer is not None and self.tracer.active:
            raise ControlError(f"a trace is already running to {self.tracer.path}; stop it first")
        output = str(req.get("output") or "")
        if not output:
            raise ControlError("output (an absolute file path) is required")
        if not os.path.isabs(output):
            raise ControlError(f"output must be an absolute path, got {output!r}")
        try:
            opts = TraceOptions(
                output=output,
                format=str(req.get("format") or "text"),
                seconds=float(req.get("seconds") or DEFAULT_SECONDS),
                max_bytes=int(req.get("max_bytes") or DEFAULT_MAX_BYTES),
                max_files=int(req.get("max_files") or DEFAULT_MAX_FILES),
                log_numbers=self.proxy.settings.log_numbers,
            ).validate()
        except (TypeError, ValueError) as exc:
            raise ControlError(str(exc)) from None
        core = self.proxy.core
        try:
            tracer = Tracer(
                opts,
                local_host=core.advertise if core is not None else "127.0.0.1",
                ports=self.proxy.ports,
                on_stop=self._detach,
            )
        except OSError as exc:
            raise ControlError(f"cannot write {output}: {exc}") from None
        self.tracer = tracer
        self.proxy.tracer = tracer
        loop = asyncio.get_running_loop()
        self._stop_timer = loop.call_later(opts.seconds, tracer.stop, "time limit reached")
        log.info(
            "trace started: %s (%s, %.0f s, %d x %d bytes%s)",
            output,
            opts.format,
            opts.seconds,
            opts.max_files,
            opts.max_bytes,
            ", numbers masked" if not opts.log_numbers else "",
        )
        return tracer.status()

    def stop_trace(self) -> dict[str, Any]:
        tracer = self.tracer
        if tracer is None:
            return self.last_trace or {"active": False}
        tracer.stop("stopped on request")
        return tracer.status()

    def _detach(self, tracer: Tracer) -> None:
        if self.proxy.tracer is tracer:
            self.proxy.tracer = None
        if self.tracer is tracer:
            self.tracer = None
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        self.last_trace = tracer.status()
        log.info(
            "trace stopped (%s): %d message(s), %d bytes in %s",
            tracer.stop_reason,
            tracer.messages,
            tracer.bytes_written,
            ", ".join(tracer.files) or "no file",
        )

    def toggle_trace(self) -> None:
        """SIGUSR1: start a text trace with the default limits, or stop the running one."""
        if self.tracer is not None and self.tracer.active:
            self.tracer.stop("stopped by SIGUSR1")
            return
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        output = default_trace_dir() / f"clearip-trace-{stamp}.txt"
        try:
            self.start_trace({"output": str(output)})
        except ControlError as exc:
            log.error("SIGUSR1: cannot start a trace: %s", exc)

    def settings_changed(self) -> None:
        """After a reload: a running trace follows the new ``log_numbers``."""
        if self.tracer is not None:
            self.tracer.log_numbers = self.proxy.settings.log_numbers


def find_control_socket(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The control socket to talk to: the flag, the env var, else the first default that exists."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(ENV_SOCKET):
        return Path(env[ENV_SOCKET])
    for p in socket_candidates(env):
        if p.exists():
            return p
    return None


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def request(path: str | os.PathLike[str], payload: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the control socket at ``path`` and return the answer (blocking client)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(dict(payload)).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 4 * MAX_REQUEST:
                raise OSError("answer too large")
    if not buf:
        raise OSError(f"{path}: no answer")
    answer = json.loads(buf)
    if not isinstance(answer, dict):
        raise OSError(f"{path}: unexpected answer")
    return answer


__all__ = [
    "ENV_SOCKET",
    "ControlServer",
    "default_socket_path",
    "default_trace_dir",
    "request",
    "socket_candidates",
]
