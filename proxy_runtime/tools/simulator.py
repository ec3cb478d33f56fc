"""A ClearIP stand-in: a SIP redirect server that answers INVITEs by rules from a TOML file.

Run it with ``python -m proxy_runtime simulate --tcp 127.0.0.1:5070 --udp 127.0.0.1:5070 --rules
rules.toml``. Each INVITE's Request-URI user part (an E.164 number, with or without ``+``) is matched
against the rules in order (exact numbers, then prefixes, first match wins; else the default) and the
rule says what to answer:

- ``redirect``: ``302 Moved Temporarily`` (or ``300 Multiple Choices``) with one or more ``Identity``
  headers (a syntactically real SHAKEN PASSporT, optionally a second ``ppt="div"`` one), optionally a
  ``P-Asserted-Identity`` with ``verstat``, and a Contact list with descending q; the signed headers
  go in the response, escaped inside each Contact URI (RFC 3261 §19.1.1), or both;
- ``reject``: any status with its reason phrase (503, 404, 403, 480...);
- ``block``: ``603 Network Blocked`` with the ATIS-1000099 ("603+") ``Reason`` header and a Call-Info,
  or ``607 Unwanted`` / ``608 Rejected`` (RFC 8688, ``purpose=jwscallinfo``) with theirs;
- ``silence``: no answer at all (not even 100 Trying, nor to a CANCEL), like a hung server;
- ``delay``: a redirect after ``delay_ms`` (every action also takes ``delay_ms``).

ACKs are absorbed, CANCEL gets 200 and the INVITE 487, OPTIONS 200, stream keep-alives
(CRLFCRLF) a CRLF; over UDP a retransmitted INVITE gets the same response again and final responses are
retransmitted until ACKed (RFC 3261 Timer G). The PASSporTs are shaped like real ones but signed with
no key: a verifier must reject them. This is a test tool, never a signing service.

This module is the server and its command line; the rules are :mod:`proxy_runtime.tools.rules`
and what each rule answers is :mod:`proxy_runtime.tools.answers`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.tools.answers import SERVER_HEADER, build_answer
from proxy_runtime.tools.endpoint import T1, SipEndpoint, Source, cancel_tasks, uri_user, via_with_rport
from proxy_runtime.tools.rules import DEFAULT_RULES, DEFAULT_RULES_TOML, Rule, RulesError, RuleSet, load_rules

log = logging.getLogger("proxy_runtime.tools.simulator")


@dataclass(slots=True)
class AnswerRecord:
    """One INVITE answered (or left unanswered) by the simulator."""

    call_id: str
    number: str
    rule: str
    action: str
    status: int | None  # None: silence
    at: float
    response: SipResponse | None = None


@dataclass(slots=True)
class _ServerInvite:
    request: SipRequest
    source: Source
    rule: Rule
    to_tag: str
    trying: bytes = b""
    final: bytes = b""
    status: int | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class ClearIpSimulator:
    """The redirect server. ``await sim.start(tcp=[("127.0.0.1", 0)])``; :attr:`endpoint` has the
    bound addresses; :attr:`answers` records every INVITE's outcome, :attr:`requests` every request."""

    def __init__(self, rules: RuleSet | None = None, *, t1: float = T1) -> None:
        self.rules = rules or DEFAULT_RULES
        self.t1 = t1
        self.endpoint = SipEndpoint(self._on_message, name="clearip-simulator")
        self.answers: list[AnswerRecord] = []
        self.requests: list[SipRequest] = []
        self._invites: dict[tuple[str, str, int], _ServerInvite] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self,
        *,
        tcp: Sequence[tuple[str, int]] = (),
        udp: Sequence[tuple[str, int]] = (),
        tls: Sequence[tuple[str, int]] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if tls and ssl_context is None:
            raise ValueError("a TLS listener needs an SSL context (certificate and key)")
        for host, port in udp:
            await self.endpoint.listen_udp(host, port)
        for host, port in tcp:
            await self.endpoint.listen_stream(host, port)
        for host, port in tls:
            await self.endpoint.listen_stream(host, port, ssl_context=ssl_context)

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        await self.endpoint.close()

    async def __aenter__(self) -> ClearIpSimulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def answers_for(self, call_id: str) -> list[AnswerRecord]:
        return [a for a in self.answers if a.call_id == call_id]

    # --- protocol ----------------------------------------------------------------------------
    def _key(self, req: SipMessage) -> tuple[str, str, int]:
        via = req.top_via
        host, port = via.sent_by
        return via.branch, host, port

    def _spawn(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, src: Source, resp: SipResponse) -> bytes:
        via_with_rport(resp, src)
        data = resp.serialize()
        self.endpoint.reply(src, data)
        return data

    def _on_message(self, msg: SipMessage, src: Source) -> None:
        if not isinstance(msg, SipRequest):
            return
        self.requests.append(msg)
        method = msg.method
        if method == "INVITE":
            self._on_invite(msg, src)
        elif method == "ACK":
            inv = self._invites.get(self._key(msg))
            if inv is not None:
                inv.acked.set()
        elif method == "CANCEL":
            self._on_cancel(msg, src)
        elif method == "OPTIONS":
            allow = [("Allow", "INVITE, ACK, CANCEL, OPTIONS"), ("Server", SERVER_HEADER)]
            self._send(src, make_response(msg, 200, extra=allow))
        elif method == "BYE":
            self._send(src, make_response(msg, 481))
        else:
            self._send(src, make_response(msg, 405, extra=[("Allow", "INVITE, ACK, CANCEL, OPTIONS")]))

    def _on_invite(self, req: SipRequest, src: Source) -> None:
        key = self._key(req)
        inv = self._invites.get(key)
        if inv is not None:  # a retransmission: repeat the last response
            last = inv.final or inv.trying
            if last:
                self.endpoint.reply(src, last)
            return
        user = uri_user(req.uri)
        rule = self.rules.match(user)
        inv = _ServerInvite(req, src, rule, secrets.token_hex(6))
        self._invites[key] = inv
        asyncio.get_running_loop().call_later(64 * self.t1 + 5, self._invites.pop, key, None)
        if rule.action == "silence":
            self._record(inv, None, "silent")
            return
        trying = rule.trying if rule.trying is not None else rule.delay_ms > 0
        if trying:
            inv.trying = self._send(src, make_response(req, 100))
        if rule.delay_ms > 0:
            inv.task = asyncio.get_running_loop().create_task(self._answer_later(inv))
            self._spawn(inv.task)
        else:
            self._answer(inv)

    async def _answer_later(self, inv: _ServerInvite) -> None:
        await asyncio.sleep(inv.rule.delay_ms / 1000)
        inv.task = None
        self._answer(inv)

    def _answer(self, inv: _ServerInvite) -> None:
        resp = build_answer(inv.rule, inv.request, inv.to_tag)
        if resp is None:
            return
        self._final(inv, resp)
        self._record(inv, resp, inv.rule.action)

    def _final(self, inv: _ServerInvite, resp: SipResponse) -> None:
        inv.final = self._send(inv.source, resp)
        inv.status = resp.status
        if inv.source.transport == "udp":
            resend = self.endpoint.resend_until_acked(inv.source, inv.final, inv.acked, self.t1)
            self._spawn(asyncio.get_running_loop().create_task(resend))

    def _on_cancel(self, req: SipRequest, src: Source) -> None:
        inv = self._invites.get(self._key(req))
        if inv is None:
            self._send(src, make_response(req, 481))
            return
        if inv.rule.action == "silence":
            return  # a hung server answers nothing
        self._send(src, make_response(req, 200))
        if inv.status is None:
            if inv.task is not None:
                inv.task.cancel()
                inv.task = None
            resp = make_response(inv.request, 487, to_tag=inv.to_tag, extra=[("Server", SERVER_HEADER)])
            self._final(inv, resp)
            self._record(inv, resp, "cancelled")

    def _record(self, inv: _ServerInvite, resp: SipResponse | None, what: str) -> None:
        user = uri_user(inv.request.uri)
        status = resp.status if resp is not None else None
        self.answers.append(
            AnswerRecord(inv.request.call_id, user, inv.rule.name, what, status, time.monotonic(), resp)
        )
        log.info(
            "INVITE %s rule=%r %s -> %s",
            user or "-",
            inv.rule.name,
            what,
            f"{status} {resp.reason}" if resp is not None else "no answer",
        )


def parse_hostport(text: str, default_port: int = 5070) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_s = text.split(":")
    else:
        host, port_s = text, ""
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host or "0.0.0.0", port


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def run_simulator(
    *,
    tcp: Sequence[tuple[str, int]] = (),
    udp: Sequence[tuple[str, int]] = (),
    tls: Sequence[tuple[str, int]] = (),
    tls_cert: str = "",
    tls_key: str = "",
    rules: RuleSet | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve until ``stop`` is set or SIGINT/SIGTERM; returns the exit status."""
    ctx = server_ssl_context(tls_cert, tls_key) if tls else None
    sim = ClearIpSimulator(rules)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await sim.start(tcp=tcp, udp=udp, tls=tls, ssl_context=ctx)
        listening = ", ".join(
            f"{t.upper()} {h}:{p}" for t, addrs in sim.endpoint.listen_addrs.items() for h, p in addrs
        )
        n = len(sim.rules.rules)
        log.info(
            "ClearIP simulator ready on %s (%d rule(s) + default %r)", listening, n, sim.rules.default.name
        )
        await stop.wait()
        return 0
    finally:
        await sim.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """``simulate`` command: ``argv`` are the arguments after the command name."""
    parser = argparse.ArgumentParser(
        prog="python -m proxy_runtime simulate",
        description="A ClearIP stand-in: a SIP redirect server answering INVITEs by rules.",
    )
    parser.add_argument("--tcp", action="append", default=[], type=parse_hostport, metavar="HOST:PORT")
    parser.add_argument("--udp", action="append", default=[], type=parse_hostport, metavar="HOST:PORT")
    parser.add_argument(
        "--tls", action="append", default=[], type=lambda s: parse_hostport(s, 5071), metavar="HOST:PORT"
    )
    parser.add_argument("--tls-cert", default="", metavar="FILE")
    parser.add_argument("--tls-key", default="", metavar="FILE")
    parser.add_argument("--rules", default="", metavar="FILE", help="TOML rules (default: built-in rules)")
    parser.add_argument(
        "--print-default-rules", action="store_true", help="print the built-in rules and exit"
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = parser.parse_args(argv)
    if args.print_default_rules:
        sys.stdout.write(DEFAULT_RULES_TOML.lstrip())
        return 0
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tls and not (args.tls_cert and args.tls_key):
        parser.error("--tls needs --tls-cert and --tls-key")
    try:
        rules = load_rules(args.rules) if args.rules else DEFAULT_RULES
    except RulesError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    tcp, udp = args.tcp, args.udp
    if not (tcp or udp or args.tls):
        tcp = udp = [("127.0.0.1", 5070)]
    try:
        return asyncio.run(
            run_simulator(
                tcp=tcp, udp=udp, tls=args.tls, tls_cert=args.tls_cert, tls_key=args.tls_key, rules=rules
            )
        )
    except OSError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
