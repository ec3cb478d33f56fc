"""``make demo``: the proxy on loopback against the ClearIP simulator and two simulated carriers.

It starts, on free 127.0.0.1 ports, the simulator with a demo rule set, carrier A (UDP; answers 503
for one number so the proxy must route-advance) and carrier B (TCP), and the proxy itself (in process
when :class:`proxy_runtime.transport.server.ProxyServer` exists, else ``python -m proxy_runtime run`` as a
subprocess). A simulated switch then places one call per row of DESIGN §2's table, and one per answer
shape seen in the field (the PASSporT and PAI escaped inside each Contact URI, 300 Multiple Choices,
608 Rejected), and the demo prints what ClearIP said, what each carrier saw and what the switch got.
Exit status 0 when every call ended as expected, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TextIO

from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import parse_name_addr
from proxy_runtime.sip.message import SipResponse
from proxy_runtime.sip.uri import UriError, parse_uri, parse_uri_headers
from proxy_runtime.tools.carrier import SimulatedCarrier
from proxy_runtime.tools.endpoint import Transport, uri_user
from proxy_runtime.tools.rules import RuleSet, normalize_number, parse_rules
from proxy_runtime.tools.simulator import ClearIpSimulator
from proxy_runtime.tools.switch import CallResult, SimulatedSwitch

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PROXY_TIMEOUT = 2.0  # the proxy's ClearIP timeout in the demo (default 5 s in production)
READY_WAIT = 20.0

# The called numbers, one per row of DESIGN §2's table.
N_ANSWERED = "+12025550101"
N_ADVANCE = "+12025550102"
N_CLEARIP_503 = "+12025550103"
N_NOT_FOUND = "+12025550104"
N_BLOCKED = "+12025550105"
N_FORBIDDEN = "+12025550106"
N_SILENT = "+12025550107"
N_INBOUND = "+12025550108"
N_IN_CONTACT = "+12025550109"
N_MULTIPLE = "+12025550110"
N_REJECTED = "+12025550111"
N_EMERGENCY = "911"


def demo_rules_toml(carrier_a: str, carrier_b: str) -> str:
    """The demo's rules file (``carrier_a``/``carrier_b``: Contact URI templates)."""
    return f"""
[[rule]]
name = "302 -> carrier A answers"
numbers = ["{N_ANSWERED}"]
action = "redirect"
contacts = ["{carrier_a}", "{carrier_b}"]

[[rule]]
name = "302 -> A 503, advance to B"
numbers = ["{N_ADVANCE}"]
action = "redirect"
contacts = ["{carrier_a}", "{carrier_b}"]

[[rule]]
name = "503 no route"
numbers = ["{N_CLEARIP_503}"]
action = "reject"
status = 503

[[rule]]
name = "404 unknown"
numbers = ["{N_NOT_FOUND}"]
action = "reject"
status = 404

[[rule]]
name = "603+ blocked"
numbers = ["{N_BLOCKED}"]
action = "block"

[[rule]]
name = "403 not whitelisted"
numbers = ["{N_FORBIDDEN}"]
action = "reject"
status = 403

[[rule]]
name = "silence"
numbers = ["{N_SILENT}"]
action = "silence"

[[rule]]
name = "inbound: PAI [V] + div"
numbers = ["{N_INBOUND}"]
action = "redirect"
div = true
pai = true
pai_name = "[V] Alice Example"
contacts = ["{carrier_b}"]

[[rule]]
name = "302, Identity + PAI in each Contact URI"
numbers = ["{N_IN_CONTACT}"]
action = "redirect"
identity_in = "contact"
identity_per_contact = true
pai = true
pai_name = "[V] Alice Example"
contacts = ["{carrier_a}", "{carrier_b}"]

[[rule]]
name = "300 Multiple Choices"
numbers = ["{N_MULTIPLE}"]
action = "redirect"
status = 300
contacts = ["{carrier_a}", "{carrier_b}"]

[[rule]]
name = "608 Rejected (RFC 8688)"
numbers = ["{N_REJECTED}"]
action = "block"
status = 608

[default]
action = "reject"
status = 404
"""


@dataclass(slots=True)
class DemoCall:
    label: str
    number: str
    transport: Transport
    expect_status: int
    expect_clearip: int | Literal["not asked"] | None  # None: asked, never answered
    expect_carriers: dict[str, list[int]]  # carrier -> INVITE finals it sent
    expect_header: tuple[str, str] | None = None  # (name, text it must contain) in the final
    max_time: float | None = None
    # carriers must get ClearIP's Identity headers byte for byte: those escaped in the URI of the
    # Contact that reached them, else those of the 3xx
    check_identity: bool = False


@dataclass(slots=True)
class Outcome:
    call: DemoCall
    result: CallResult
    clearip: str
    carriers: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def demo_calls(timeout: float) -> list[DemoCall]:
    return [
        DemoCall("302, carrier answers", N_ANSWERED, "udp", 200, 302, {"A": [200]}, check_identity=True),
        DemoCall(
            "302, route-advance", N_ADVANCE, "udp", 200, 302, {"A": [503], "B": [200]}, check_identity=True
        ),
        DemoCall("ClearIP 503", N_CLEARIP_503, "udp", 503, 503, {}),
        DemoCall("ClearIP 404", N_NOT_FOUND, "tcp", 404, 404, {}),
        DemoCall("603+ blocked", N_BLOCKED, "udp", 603, 603, {}, ("Reason", "Network Blocked")),
        DemoCall("ClearIP 403", N_FORBIDDEN, "udp", 403, 403, {}),
        DemoCall("ClearIP silent", N_SILENT, "udp", 503, None, {}, ("Reason", ""), max_time=timeout + 2.0),
        DemoCall("emergency 911", N_EMERGENCY, "udp", 503, "not asked", {}, max_time=1.0),
        DemoCall("inbound, PAI [V]", N_INBOUND, "tcp", 200, 302, {"B": [200]}, check_identity=True),
        DemoCall(
            "Identity in Contact URI",
            N_IN_CONTACT,
            "udp",
            200,
            302,
            {"A": [503], "B": [200]},
            check_identity=True,
        ),
        DemoCall("300 Multiple Choices", N_MULTIPLE, "tcp", 200, 300, {"A": [200]}, check_identity=True),
        DemoCall("608 Rejected", N_REJECTED, "udp", 608, 608, {}, ("Call-Info", "purpose=jwscallinfo")),
    ]


# ---------------------------------------------------------------------------------------------
# Running the proxy
# ---------------------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A port free for both UDP and TCP on ``host`` (probed, then released)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError("no free port for UDP and TCP")


class RunningProxy(Protocol):
    async def stop(self) -> None: ...

    async def wait_clearip(self, limit: float) -> bool: ...

    def tail(self) -> list[str]: ...


class _InProcessProxy:
    def __init__(self, server: Any) -> None:
        self.server = server

    async def stop(self) -> None:
        await self.server.stop()

    async def wait_clearip(self, limit: float) -> bool:
        core = getattr(self.server, "core", None)
        if core is None or not hasattr(core, "clearip_up"):
            return False
        for _ in range(max(1, int(limit / 0.02))):  # the core has no event to await: poll its flag
            if core.clearip_up:
                return True
            await asyncio.sleep(0.02)
        return bool(core.clearip_up)

    def tail(self) -> list[str]:
        return []


class _SubprocessProxy:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.ready = asyncio.Event()
        self.clearip_up = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    def watch(self, stream: asyncio.StreamReader | None) -> None:
        if stream is not None:
            self._readers.append(asyncio.get_running_loop().create_task(self._read(stream)))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            log.debug("proxy: %s", text)
            if "ready" in text.lower():
                self.ready.set()
            if "clearip connection up" in text.lower():
                self.clearip_up.set()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        for task in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2.0)

    def tail(self) -> list[str]:
        return list(self.lines)[-20:]

    async def wait_clearip(self, limit: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.clearip_up.wait(), limit)
        return self.clearip_up.is_set()


def proxy_server_class() -> Any | None:
    """The lead's in-process API, when present: ``ProxyServer(settings)`` with start()/stop()."""
    try:
        module = importlib.import_module("proxy_runtime.transport.server")
    except ImportError:
        return None
    cls = getattr(module, "ProxyServer", None)
    if cls is None or not hasattr(cls, "start") or not hasattr(cls, "stop"):
        return None
    return cls


async def start_proxy(
    port: int, clearip_port: int, *, clearip_timeout: float, mode: Literal["auto", "inprocess", "subprocess"]
) -> RunningProxy:
    clearip = f"sip:{LOOPBACK}:{clearip_port};transport=tcp"
    cls = proxy_server_class() if mode != "subprocess" else None
    if mode == "inprocess" and cls is None:
        raise RuntimeError("proxy_runtime.transport.server.ProxyServer is not available")
    if cls is not None:
        from proxy_runtime import settings as settings_mod

        s = settings_mod.load(
            environ={},
            overrides={
                "udp": f"{LOOPBACK}:{port}",
                "tcp": f"{LOOPBACK}:{port}",
                "clearip": clearip,
                "allow": "127.0.0.0/8",
                "metrics": "log",
                "timeout": clearip_timeout,
            },
        )
        server = cls(s)
        await server.start()
        return _InProcessProxy(server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEARIP_PROXY_")}
    env["PYTHONUNBUFFERED"] = "1"
    # fmt: off
    args = [
        "-m", "proxy_runtime", "run",
        "--udp", f"{LOOPBACK}:{port}", "--tcp", f"{LOOPBACK}:{port}",
        "--clearip", clearip, "--allow", "127.0.0.0/8", "--metrics", "log",
        "--timeout", f"{clearip_timeout:g}",
    ]
    # fmt: on
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    running = _SubprocessProxy(proc)
    running.watch(proc.stderr)
    running.watch(proc.stdout)
    exited = asyncio.get_running_loop().create_task(proc.wait())
    ready = asyncio.get_running_loop().create_task(running.ready.wait())
    try:
        done, _ = await asyncio.wait({exited, ready}, timeout=READY_WAIT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (exited, ready):
            if not t.done():
                t.cancel()
    if ready not in done or not running.ready.is_set():
        await running.stop()
        tail = "\n    ".join(running.tail()) or "(no output)"
        why = f"exited with status {proc.returncode}" if proc.returncode is not None else "never said ready"
        raise RuntimeError(f"the proxy {why}:\n    {tail}")
    return running


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


def _summarise(
    call: DemoCall,
    result: CallResult,
    sim: ClearIpSimulator,
    carriers: dict[str, SimulatedCarrier],
    started: float,
) -> Outcome:
    problems: list[str] = []
    notes: list[str] = []
    number = normalize_number(call.number)

    def mine(call_id: str, user: str, at: float) -> bool:
        return call_id == result.call_id or (normalize_number(user) == number and at >= started)

    answers = [a for a in sim.answers if mine(a.call_id, a.number, a.at)]
    asked = [r for r in sim.requests if r.method == "INVITE" and r.call_id == result.call_id] or answers
    if not asked:
        clearip = "not asked"
    elif not answers or answers[-1].status is None:
        clearip = "(silence)"
    else:
        a = answers[-1]
        assert a.response is not None
        clearip = f"{a.status} {a.response.reason}"
    if call.expect_clearip == "not asked":
        if asked:
            problems.append("ClearIP was asked")
    elif call.expect_clearip is None:
        if clearip != "(silence)":
            problems.append(f"ClearIP should have been silent, said {clearip}")
    elif not answers or answers[-1].status != call.expect_clearip:
        problems.append(f"ClearIP should have said {call.expect_clearip}, said {clearip}")

    clearip_identity: list[str] = []
    in_contacts: dict[tuple[str, int | None], dict[str, list[str]]] = {}
    if answers and answers[-1].response is not None:
        clearip_identity = answers[-1].response.get_all("identity")
        in_contacts = contact_uri_headers(answers[-1].response)
    seen: list[str] = []
    for name, carrier in carriers.items():
        invites = [
            r
            for r in carrier.received
            if r.method == "INVITE"
            and not r.request.to_tag
            and mine(r.request.call_id, uri_user(r.request.uri), r.at)
        ]
        finals: list[int] = []
        for r in invites:
            finals.extend(carrier.invite_finals(r.request.call_id))
        finals = sorted(set(finals), key=finals.index)
        if invites:
            first = invites[0].request
            ids = first.get_all("identity")
            seen.append(f"{name} {'/'.join(map(str, finals)) or '?'}")
            embedded = in_contacts.get(_host_port(first.uri), {})
            want_ids = embedded.get("Identity") or clearip_identity
            plural = "s" if len(ids) > 1 else ""
            where = f"the one{plural} in its Contact URI" if "Identity" in embedded else "ClearIP's"
            if "?" in first.uri:
                problems.append(f"carrier {name} got a Request-URI with a headers part: {first.uri}")
            if call.check_identity and ids != want_ids:
                problems.append(f"carrier {name} did not get ClearIP's Identity headers byte for byte")
            elif ids:
                size = ", ".join(f"{len(v)} B" for v in ids)
                same = f" = {where}, byte for byte" if ids == want_ids else ""
                notes.append(f"carrier {name} got INVITE with {len(ids)} Identity ({size}){same}")
            pai = first.get("p-asserted-identity")
            if (
                call.check_identity
                and "P-Asserted-Identity" in embedded
                and [pai] != embedded["P-Asserted-Identity"]
            ):
                problems.append(f"carrier {name} did not get the P-Asserted-Identity of its Contact URI")
            if pai:
                notes.append(f"carrier {name} got P-Asserted-Identity: {pai}")
        expected = call.expect_carriers.get(name)
        if expected is None and invites:
            problems.append(f"carrier {name} should not have been tried")
        elif expected is not None and finals != expected:
            problems.append(f"carrier {name} should have answered {expected}, answered {finals or 'nothing'}")
    carriers_text = ", ".join(seen) or "-"

    if result.status != call.expect_status:
        got = result.status if result.status is not None else (result.error or "nothing")
        problems.append(f"the switch should have got {call.expect_status}, got {got}")
    if call.expect_status == 200 and result.status == 200 and not result.torn_down:
        problems.append(f"BYE through the proxy failed ({result.bye_status or result.error or 'no answer'})")
    if call.expect_header is not None and result.final is not None:
        hname, text = call.expect_header
        value = result.header(hname)
        if value is None or text not in value:
            problems.append(f"the final response lacks {hname}: ...{text}...")
    if result.final is not None:
        reason = result.header("reason")
        if reason and result.status and result.status >= 300:
            notes.append(f"switch got Reason: {reason}")
        call_info = result.header("call-info")
        if call_info and result.status and result.status >= 600:
            notes.append(f"switch got Call-Info: {call_info}")
    if call.max_time is not None and result.elapsed > call.max_time:
        problems.append(f"took {result.elapsed:.2f} s, expected under {call.max_time:g} s")
    return Outcome(call, result, clearip, carriers_text, problems, notes)


def contact_uri_headers(resp: SipResponse) -> dict[tuple[str, int | None], dict[str, list[str]]]:
    """The headers escaped in each Contact URI of a redirect (RFC 3261 §19.1.1), unescaped, by the
    Contact's host and port (each demo carrier has its own port)."""
    out: dict[tuple[str, int | None], dict[str, list[str]]] = {}
    for value in resp.values("contact"):
        try:
            uri = parse_uri(parse_name_addr(value).uri)
            pairs = parse_uri_headers(uri.headers)
        except (ParseError, UriError):
            continue
        headers = out.setdefault((uri.host, uri.port), {})
        for hname, hvalue in pairs:
            headers.setdefault(hname, []).append(hvalue)
    return out


def _host_port(uri_text: str) -> tuple[str, int | None]:
    try:
        uri = parse_uri(uri_text)
    except UriError:
        return ("", None)
    return (uri.host, uri.port)


def print_table(outcomes: list[Outcome], out: TextIO) -> None:
    head = ("#", "call", "number", "ClearIP said", "carriers saw", "switch got", "time", "check")
    rows: list[tuple[str, ...]] = []
    for i, o in enumerate(outcomes, 1):
        r = o.result
        final = f"{r.status} {r.reason}" if r.status is not None else (r.error or "nothing")
        if r.answered:
            final += ", BYE ok" if r.torn_down else ", BYE failed"
        rows.append(
            (
                str(i),
                o.call.label,
                o.call.number,
                o.clearip,
                o.carriers,
                final,
                f"{r.elapsed:.2f}s",
                "ok" if o.ok else "WRONG",
            )
        )
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out.write(line(head) + "\n")
    out.write(line(tuple("-" * w for w in widths)) + "\n")
    for o, row in zip(outcomes, rows, strict=True):
        out.write(line(row) + "\n")
        for note in o.notes:
            out.write(f"{'':{widths[0]}}    {note}\n")
        for p in o.problems:
            out.write(f"{'':{widths[0]}}    !! {p}\n")


async def run_demo(
    *,
    out: TextIO | None = None,
    mode: Literal["auto", "inprocess", "subprocess"] = "auto",
    clearip_timeout: float = PROXY_TIMEOUT,
) -> int:
    """Run the whole demo; 0 when every call ended as expected, 1 otherwise."""
    out = out or sys.stdout
    write: Callable[[str], object] = out.write
    t0 = time.monotonic()
    sim: ClearIpSimulator | None = None
    proxy: RunningProxy | None = None
    carrier_a = SimulatedCarrier("A", numbers={N_ADVANCE: "unavailable", N_IN_CONTACT: "unavailable"})
    carrier_b = SimulatedCarrier("B")
    switch = SimulatedSwitch(from_number="+13035550100")
    try:
        await carrier_a.start(udp=True, tcp=False)
        await carrier_b.start(udp=False, tcp=True)
        rules: RuleSet = parse_rules(
            tomllib.loads(demo_rules_toml(carrier_a.uri("{user}", "udp"), carrier_b.uri("{user}", "tcp")))
        )
        sim = ClearIpSimulator(rules)
        await sim.start(tcp=[(LOOPBACK, 0)])
        sim_port = sim.endpoint.listen_addrs["tcp"][0][1]
        await switch.start()
        proxy_port = free_port()
        write(
            f"ClearIP simulator on tcp {LOOPBACK}:{sim_port}; carrier A on udp "
            f"{carrier_a.address('udp')[1]}, carrier B on tcp {carrier_b.address('tcp')[1]}; starting the "
            f"proxy on {LOOPBACK}:{proxy_port} (udp+tcp, ClearIP timeout {clearip_timeout:g} s)...\n"
        )
        try:
            proxy = await start_proxy(proxy_port, sim_port, clearip_timeout=clearip_timeout, mode=mode)
        except (RuntimeError, OSError) as exc:
            write(f"demo: could not start the proxy: {exc}\n")
            return 1
        # The proxy may say "ready" before its ClearIP connection is up; calls would then (rightly) get
        # an immediate 503. Wait for the simulator to see the connection.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sim.endpoint.accepted.wait(), READY_WAIT)
        if not sim.endpoint.accepted.is_set():
            write("demo: the proxy did not connect to the ClearIP simulator\n")
        elif not await proxy.wait_clearip(3.0):
            await asyncio.sleep(0.5)  # no way to see the proxy's own view: give it a moment
        write(f"proxy ready after {time.monotonic() - t0:.1f} s; placing calls...\n\n")
        outcomes: list[Outcome] = []
        carriers = {"A": carrier_a, "B": carrier_b}
        for call in demo_calls(clearip_timeout):
            started = time.monotonic()
            result = await switch.call(
                call.number,
                (LOOPBACK, proxy_port),
                call.transport,
                time_limit=clearip_timeout + 3.0,
                hold=0.05,
            )
            await asyncio.sleep(0.05)  # let the last ACK/BYE responses land before summarising
            outcomes.append(_summarise(call, result, sim, carriers, started))
        print_table(outcomes, out)
        bad = [o for o in outcomes if not o.ok]
        write(
            f"\n{len(outcomes) - len(bad)}/{len(outcomes)} calls ended as expected "
            f"({time.monotonic() - t0:.1f} s in all).\n"
        )
        return 0 if not bad else 1
    finally:
        if proxy is not None:
            await proxy.stop()
        await switch.stop()
        if sim is not None:
            await sim.stop()
        await carrier_a.stop()
        await carrier_b.stop()


def main(argv: list[str] | None = None) -> int:
    """``demo`` command: ``argv`` are the arguments after the command name."""
    parser = argparse.ArgumentParser(
        prog="python -m proxy_runtime demo",
        description="Run the proxy on loopback against the ClearIP simulator and two simulated carriers.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--subprocess", action="store_true", help="run the proxy as `python -m proxy_runtime run`"
    )
    group.add_argument("--in-process", action="store_true", help="run the proxy in this process")
    parser.add_argument("--timeout", type=float, default=PROXY_TIMEOUT, help="the proxy's ClearIP timeout")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the simulator's and peers' work")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mode: Literal["auto", "inprocess", "subprocess"] = (
        "subprocess" if args.subprocess else "inprocess" if args.in_process else "auto"
    )
    try:
        return asyncio.run(run_demo(mode=mode, clearip_timeout=args.timeout))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
