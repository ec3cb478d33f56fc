"""Command line: ``clearip-proxy run | check-config | set | settings | simulate | demo | doctor | trace``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from proxy_runtime import settings as settings_mod
from proxy_runtime.settings import Settings, SettingsError
from proxy_runtime.transport import gcpolicy

if TYPE_CHECKING:
    from proxy_runtime.operations.control import ControlServer
    from proxy_runtime.transport.server import ProxyServer

log = logging.getLogger("clearip")

# flag -> settings field
_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--udp", "udp", {"action": "append", "metavar": "HOST:PORT"}),
    ("--tcp", "tcp", {"action": "append", "metavar": "HOST:PORT"}),
    ("--tls", "tls", {"action": "append", "metavar": "HOST:PORT"}),
    ("--tls-cert", "tls_cert", {"metavar": "FILE"}),
    ("--tls-key", "tls_key", {"metavar": "FILE"}),
    ("--advertise", "advertise", {"metavar": "ADDR"}),
    ("--clearip", "clearip", {"metavar": "URI"}),
    ("--clearip-ca", "clearip_ca", {"metavar": "FILE"}),
    ("--clearip-server-name", "clearip_server_name", {"metavar": "NAME"}),
    ("--timeout", "timeout", {"metavar": "SECONDS"}),
    ("--ring-timeout", "ring_timeout", {"metavar": "SECONDS"}),
    ("--allow", "allow", {"action": "append", "metavar": "CIDR"}),
    ("--copy-header", "copy_headers", {"action": "append", "metavar": "NAME"}),
    ("--redirect-code", "redirect_codes", {"action": "append", "metavar": "CODE"}),
    ("--emergency-number", "emergency_numbers", {"action": "append", "metavar": "NUMBER"}),
    ("--emergency-action", "emergency_action", {"choices": settings_mod.EMERGENCY_ACTIONS}),
    ("--emergency-route", "emergency_route", {"metavar": "URI"}),
    ("--max-in-flight", "max_in_flight", {"metavar": "N"}),
    ("--overload-queue-delay", "overload_queue_delay", {"metavar": "SECONDS"}),
    ("--metrics", "metrics", {"metavar": "|".join(settings_mod.METRICS_SINKS)}),
    ("--metrics-interval", "metrics_interval", {"metavar": "SECONDS"}),
    ("--proxy-id", "proxy_id", {"metavar": "ID"}),
    ("--log-level", "log_level", {"metavar": "LEVEL"}),
]


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="settings file (flat TOML); env CLEARIP_PROXY_CONFIG")
    for flag, dest, kw in _FLAGS:
        p.add_argument(flag, dest=dest, default=None, **kw)
    p.add_argument("--log-numbers", dest="log_numbers", action="store_const", const=True, default=None)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _, dest, _kw in _FLAGS:
        v = getattr(args, dest, None)
        if v is not None:
            out[dest] = v
    if getattr(args, "log_numbers", None):
        out["log_numbers"] = True
    # --emergency-number adds to the built-in 911/933 rather than replacing them.
    if "emergency_numbers" in out:
        out["emergency_numbers"] = list(settings_mod.DEFAULT_EMERGENCY_NUMBERS) + list(
            out["emergency_numbers"]
        )
    return out


def load_settings(args: argparse.Namespace) -> Settings:
    config = args.config or os.environ.get("CLEARIP_PROXY_CONFIG")
    return settings_mod.load(config, overrides=overrides_from(args))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """The proxy's logging: ``LOG_FORMAT`` lines on stderr (the journal, under systemd).

    Every finished call logs a line, so a record's cost is on the call path. The format uses no
    caller, thread or process fields, so logging is told not to collect them (the "Optimization"
    section of Python's logging HOWTO): a tenth of a record's cost, without the frame walk that
    finds the caller."""
    logging._srcfile = None  # no findCaller(): the format has no %(pathname)s, %(lineno)d, ...
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+: the current task's name
        setattr(logging, "logAsyncioTasks", False)  # noqa: B010 - not in 3.11's stubs
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=LOG_FORMAT,
        stream=sys.stderr if stream is None else stream,
    )


async def run_proxy(settings: Settings, config_args: argparse.Namespace | None = None) -> int:
    from proxy_runtime.metrics.publisher import MetricsPublisher
    from proxy_runtime.metrics.recorder import MetricsRecorder
    from proxy_runtime.metrics.sinks import make_sink
    from proxy_runtime.transport.server import ProxyServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server: ProxyServer | None = None
    publisher: MetricsPublisher | None = None
    control: ControlServer | None = None

    # The handlers go in before anything listens: the control socket and the "ready" line are
    # what a supervisor or an operator waits for, and a SIGUSR1/SIGHUP sent right after them must
    # not meet the default action (SIGUSR1's default kills the process).
    def on_term() -> None:
        if server is not None:
            log.info("SIGTERM: draining (at most %.0f s)", server.settings.drain_timeout)
        stop.set()

    started = False  # listeners, metrics and the control socket are up
    hup_pending = False

    def on_hup() -> None:
        nonlocal hup_pending
        if config_args is None:
            return
        if not started or server is None:
            # Mid start-up the server is still being built from the settings it was given: reload
            # once it is up, so the new file is applied whole rather than half or not at all.
            hup_pending = True
            log.info("SIGHUP during start-up: the settings are reloaded once the proxy is up")
            return
        try:
            new = load_settings(config_args)
        except (SettingsError, OSError) as exc:  # OSError: e.g. the file is not readable
            log.error("reload refused, keeping the running settings: %s", exc)
            return
        restart = server.reload(new)
        if control is not None:
            control.settings_changed()
        if publisher is not None:
            publisher.interval = new.metrics_interval
        logging.getLogger().setLevel(new.log_level.upper())
        log.info(
            "settings reloaded%s", f"; needs a restart to apply: {', '.join(restart)}" if restart else ""
        )

    def on_usr1() -> None:
        if control is None:
            log.warning("SIGUSR1: no control socket, so no trace to toggle (control_socket is off)")
            return
        control.toggle_trace()

    handlers: dict[signal.Signals, Callable[[], None]] = {
        signal.SIGTERM: on_term,
        signal.SIGINT: on_term,
        signal.SIGHUP: on_hup,
        signal.SIGUSR1: on_usr1,
    }
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        recorder = MetricsRecorder(proxy_id=settings.proxy_id, log_numbers=settings.log_numbers)
        try:
            sink = await loop.run_in_executor(
                None, lambda: make_sink(settings.metrics, proxy_id=settings.proxy_id)
            )
        except ValueError as exc:
            raise SettingsError("metrics", str(exc)) from None
        publisher = MetricsPublisher(recorder, sink, interval=settings.metrics_interval)
        server = ProxyServer(settings, recorder=recorder)
        try:
            await server.start()
        except OSError as exc:
            log.error("cannot open listeners: %s", exc)
            await server.stop()
            return 1
        await publisher.start()
        gcpolicy.apply()
        gc_task = loop.create_task(gcpolicy.collect_periodically(), name="gc")
        control = await _start_control(server, config_args)
        started = True
        if hup_pending:
            on_hup()
        try:
            await stop.wait()
            await server.drain()
        finally:
            gc_task.cancel()
            if control is not None:
                await control.stop()
            await server.stop()
            await publisher.stop()
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


async def _start_control(server: ProxyServer, config_args: argparse.Namespace | None) -> ControlServer | None:
    """The local control socket (status, traces: operations/control.py); ``off`` disables it.
    A proxy that cannot open it still carries calls: the failure is logged, not fatal."""
    from proxy_runtime.operations import control as control_mod

    path = getattr(config_args, "control_socket", None) or os.environ.get(control_mod.ENV_SOCKET) or ""
    if path == "off":
        return None
    ctl = control_mod.ControlServer(server, path or control_mod.default_socket_path())
    try:
        await ctl.start()
    except OSError as exc:
        log.warning("no control socket (doctor/trace cannot reach this proxy): %s", exc)
        return None
    return ctl


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the runtime requirements
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_run(args: argparse.Namespace) -> int:
    try:
        s = load_settings(args)
    except SettingsError as exc:
        print(f"clearip-proxy: {exc}", file=sys.stderr)
        return 2
    setup_logging(s.log_level)
    _use_uvloop()
    try:
        return asyncio.run(run_proxy(s, args))
    except SettingsError as exc:
        print(f"clearip-proxy: {exc}", file=sys.stderr)
        return 2


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        s = load_settings(args)
    except SettingsError as exc:
        print(f"clearip-proxy: {exc}", file=sys.stderr)
        return 2
    print(settings_mod.to_toml(s), end="")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    """Persist one setting in the settings file (used by the Session Manager documents)."""
    from proxy_runtime.settings.file import set_value

    try:
        set_value(args.config, args.key, args.value)
    except SettingsError as exc:
        print(f"clearip-proxy: {exc}", file=sys.stderr)
        return 2
    print(f"{args.key} = {args.value} written to {args.config}; restart the proxy to apply")
    return 0


def cmd_settings_write(args: argparse.Namespace) -> int:
    """Write the settings file whole from a site file and flags; print how the proxy takes it.

    The last line on stdout is ``unchanged``, ``reload`` or ``restart``: install.sh reads it to
    choose between nothing, ``systemctl reload`` (SIGHUP) and a drained ``systemctl restart``."""
    from proxy_runtime.settings.file import write_settings

    values: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"clearip-proxy: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        values[key.strip()] = value
    if args.allow:
        values["allow"] = [c for a in args.allow for c in a.split(",") if c.strip()]
    try:
        apply, changed = write_settings(
            args.config,
            site=args.site,
            values=values,
            clearip_transport=args.clearip_transport,
            root=args.root,
            check_files=not args.no_file_checks,
            dry_run=args.dry_run,
        )
    except SettingsError as exc:
        print(f"clearip-proxy: {exc}", file=sys.stderr)
        return 2
    if changed and not args.dry_run:
        print(f"settings changed: {', '.join(changed)}", file=sys.stderr)
    print(apply)
    return 0


def cmd_settings_get(args: argparse.Namespace) -> int:
    """Print one setting as the proxy reads it (install.sh reads ``allow`` for the host firewall)."""
    from proxy_runtime.settings.file import read_value

    try:
        value = read_value(args.config, args.key, root=args.root)
    except SettingsError as exc:
        print(f"clearip-proxy: {exc}", file=sys.stderr)
        return 2
    for item in value if isinstance(value, tuple) else (value,):
        print(item)
    return 0


def cmd_simulate(argv: Sequence[str]) -> int:
    from proxy_runtime.tools import simulator

    return simulator.main(list(argv))


def cmd_demo(argv: Sequence[str]) -> int:
    from proxy_runtime.tools import demo

    return demo.main(list(argv))


def cmd_doctor(argv: Sequence[str]) -> int:
    from proxy_runtime.operations.doctor import doctor_main

    return doctor_main(argv)


def cmd_trace(argv: Sequence[str]) -> int:
    from proxy_runtime.operations.trace_cli import trace_main

    return trace_main(argv)


def version_line() -> str:
    """``clearip-proxy 0.1.0 (core compiled)``: the release, and whether its core is the compiled
    build or the pure-Python one (setup.py)."""
    from importlib.metadata import PackageNotFoundError, version

    from proxy_runtime.core import build_kind

    try:
        release = version("clearip-proxy")
    except PackageNotFoundError:
        release = "(not installed)"
    return f"clearip-proxy {release} (core {build_kind()})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clearip-proxy", description="In-line SIP proxy for ClearIP")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the proxy")
    _add_settings_flags(r)
    r.add_argument(
        "--control-socket",
        metavar="PATH",
        help="local control socket for doctor/trace ('off' to disable); env CLEARIP_CONTROL_SOCKET; "
        "default /run/clearip-proxy/control.sock, else $XDG_RUNTIME_DIR or /tmp",
    )
    c = sub.add_parser("check-config", help="validate the settings and print them as TOML")
    _add_settings_flags(c)
    st = sub.add_parser("set", help="persist one setting in the settings file")
    st.add_argument("key")
    st.add_argument("value")
    st.add_argument("--config", required=True, metavar="FILE")
    sw = sub.add_parser("settings", help="write the settings file whole (install.sh, deploys)")
    ssub = sw.add_subparsers(dest="settings_command", required=True)
    w = ssub.add_parser(
        "write",
        help="validate and write the settings file from a site file and flags; print unchanged, "
        "reload or restart",
    )
    w.add_argument("--config", required=True, metavar="FILE", help="the settings file to write")
    w.add_argument("--site", metavar="FILE", help="site settings (flat TOML; no host fields)")
    w.add_argument("--set", action="append", metavar="KEY=VALUE", help="one setting (repeatable)")
    w.add_argument("--allow", action="append", metavar="CIDR[,CIDR]", help="trusted CIDRs (repeatable)")
    w.add_argument("--clearip-transport", metavar="tls|tcp", help="rewrite the ClearIP URI's transport")
    w.add_argument("--root", metavar="DIR", help="scratch root: paths are looked up under DIR")
    w.add_argument("--dry-run", action="store_true", help="validate and report only")
    w.add_argument("--no-file-checks", action="store_true", help="do not require the TLS files yet")
    g = ssub.add_parser("get", help="print one setting of the settings file (a list: one item a line)")
    g.add_argument("key")
    g.add_argument("--config", required=True, metavar="FILE")
    g.add_argument("--root", metavar="DIR", help="scratch root: the file is looked up under DIR")
    sub.add_parser("simulate", help="run the ClearIP simulator (see docs/SIMULATOR.md)", add_help=False)
    sub.add_parser("demo", help="the proxy against the simulator, placing calls", add_help=False)
    sub.add_parser("doctor", help="check settings, listeners, ClearIP, DNS, carriers, clock", add_help=False)
    sub.add_parser("trace", help="capture a SIP trace from the running proxy", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own argument parsers.
    if argv and argv[0] == "simulate":
        return cmd_simulate(argv[1:])
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    if argv and argv[0] == "doctor":
        return cmd_doctor(argv[1:])
    if argv and argv[0] == "trace":
        return cmd_trace(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "set":
        return cmd_set(args)
    if args.command == "settings" and args.settings_command == "get":
        return cmd_settings_get(args)
    if args.command == "settings":
        return cmd_settings_write(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
