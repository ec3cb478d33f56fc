"""A ClearIP stand-in: a SIP redirect server that answers INVITEs by rules from a TOML file.

Run it with ``python -m proxy_runtime simulate --tcp 127.0.0.1:5070 --udp 127.0.0.1:5070 --rules
rules.toml``. Each INVITE's Request-URI user part (an E.164 number, with or without ``+``) is matched
against the rules in order (exact numbers, then prefixes, first match wins; else the default) and the
rule says what to answer:

- ``redirect``: ``302 Moved Temporarily`` with one or more ``Identity`` headers (a syntactically real
  SHAKEN PASSporT, optionally a second ``ppt="div"`` one), optionally a ``P-Asserted-Identity`` with
  ``verstat``, and a Contact list with descending q;
- ``reject``: any status with its reason phrase (503, 404, 403, 480...);
- ``block``: ``603 Network Blocked`` with the ATIS-1000099 ("603+") ``Reason`` header and a Call-Info;
- ``silence``: no answer at all (not even 100 Trying, nor to a CANCEL), like a hung server;
- ``delay``: a redirect after ``delay_ms`` (every action also takes ``delay_ms``).

ACKs are absorbed, CANCEL gets 200 and the INVITE 487, OPTIONS 200, stream keep-alives
(CRLFCRLF) a CRLF; over UDP a retransmitted INVITE gets the same response again and final responses are
retransmitted until ACKed (RFC 3261 Timer G). The PASSporTs are shaped like real ones but signed with
no key: a verifier must reject them. This is a test tool, never a signing service.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
import signal
import ssl
import sys
import time
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy_runtime.sip.build import REASON_PHRASES, make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import parse_name_addr
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.tools.peers import T1, T2, SipEndpoint, Source, cancel_tasks, uri_user, via_with_rport

log = logging.getLogger("proxy_runtime.tools.simulator")

ACTIONS = ("redirect", "reject", "block", "silence", "delay")
DEFAULT_X5U = "https://certificates.example/cert.pem"
DEFAULT_BLOCK_REASON = 'SIP;cause=603;text="Network Blocked";location=TN'
DEFAULT_BLOCK_CALL_INFO = "<https://redress.example/clearip>;purpose=info"
SERVER_HEADER = "clearip-simulator"

EXTRA_REASONS: dict[int, str] = {
    301: "Moved Permanently",
    401: "Unauthorized",
    410: "Gone",
    480: "Temporarily Unavailable",
    484: "Address Incomplete",
    486: "Busy Here",
    488: "Not Acceptable Here",
    600: "Busy Everywhere",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
    607: "Unwanted",
    608: "Rejected",
}


class RulesError(ValueError):
    """A rules file that cannot be used; the message says which rule and what is wrong."""


def reason_phrase(status: int) -> str:
    return REASON_PHRASES.get(status) or EXTRA_REASONS.get(status) or "Unknown"


def normalize_number(text: str) -> str:
    """Digits of a number: ``+1 (212) 555-1234`` -> ``12125551234``; user params dropped."""
    text = text.split(";", 1)[0].strip()
    return "".join(c for c in text if c not in "+-.() \t")


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One answer. ``numbers``/``prefixes`` are normalised (digits only, no ``+``)."""

    name: str
    action: str
    numbers: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    status: int = 0  # 0: the action's default (302, 603; required for reject)
    reason: str = ""  # reason phrase; "" = the status's usual one
    delay_ms: int = 0
    # redirect
    contacts: tuple[str, ...] = ()  # templates: {user} {number} {e164}
    q: tuple[float, ...] = ()  # explicit q per contact; default 0.99, 0.98, ...
    contact_lines: bool = False  # one Contact header per URI instead of one comma-separated list
    identity: bool = True
    attest: str = "A"
    x5u: str = DEFAULT_X5U
    quote_ppt: bool = False  # write ppt="shaken" instead of ppt=shaken
    identity_size: int = 800  # pad each Identity header to about this many bytes (0: no padding)
    div: bool = False  # add a second, ppt="div" Identity (RFC 8946)
    div_from: str = ""  # the diverting number (default: the called number)
    pai: bool = False  # add P-Asserted-Identity with verstat (inbound calls)
    pai_name: str = ""  # display name, e.g. "[V] Alice Smith"
    verstat: str = "TN-Validation-Passed"
    # block
    reason_header: str = DEFAULT_BLOCK_REASON
    call_info: str = DEFAULT_BLOCK_CALL_INFO
    # any action
    headers: tuple[tuple[str, str], ...] = ()
    trying: bool | None = None  # send 100 Trying first; default: when delay_ms > 0

    def matches(self, number: str) -> bool:
        return number in self.numbers or any(number.startswith(p) for p in self.prefixes)

    @property
    def final_status(self) -> int | None:
        if self.action == "silence":
            return None
        if self.status:
            return self.status
        return 603 if self.action == "block" else 302


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    default: Rule

    def match(self, user: str) -> Rule:
        number = normalize_number(user)
        for rule in self.rules:
            if rule.matches(number):
                return rule
        return self.default


_RULE_KEYS = {
    "name",
    "action",
    "numbers",
    "prefixes",
    "status",
    "reason",
    "delay_ms",
    "contacts",
    "q",
    "contact_lines",
    "identity",
    "attest",
    "x5u",
    "quote_ppt",
    "identity_size",
    "div",
    "div_from",
    "pai",
    "pai_name",
    "verstat",
    "reason_header",
    "call_info",
    "headers",
    "trying",
}


def _strs(where: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise RulesError(f"{where}: {key} must be a list of strings")
    return tuple(str(v) for v in value)


def _bool(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RulesError(f"{where}: {key} must be true or false")
    return value


def _int(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RulesError(f"{where}: {key} must be an integer")
    return value


def parse_rule(data: Mapping[str, Any], where: str, *, default: bool = False) -> Rule:
    unknown = set(data) - _RULE_KEYS
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    action = str(data.get("action", "redirect"))
    if action not in ACTIONS:
        raise RulesError(f"{where}: action must be one of {', '.join(ACTIONS)}, got {action!r}")
    kw: dict[str, Any] = {"action": action, "name": str(data.get("name", where))}
    numbers = tuple(normalize_number(n) for n in _strs(where, "numbers", data.get("numbers", [])))
    prefixes = tuple(normalize_number(n) for n in _strs(where, "prefixes", data.get("prefixes", [])))
    for n in (*numbers, *prefixes):
        if not n.isdigit():
            raise RulesError(f"{where}: {n!r} is not a number")
    if not default and not numbers and not prefixes:
        raise RulesError(f"{where}: a rule needs numbers or prefixes (use [default] for the rest)")
    kw["numbers"], kw["prefixes"] = numbers, prefixes
    for key in ("contact_lines", "identity", "quote_ppt", "div", "pai"):
        if key in data:
            kw[key] = _bool(where, key, data[key])
    if "trying" in data:
        kw["trying"] = _bool(where, "trying", data["trying"])
    for key in ("status", "delay_ms", "identity_size"):
        if key in data:
            kw[key] = _int(where, key, data[key])
    for key in ("reason", "attest", "x5u", "div_from", "pai_name", "verstat", "reason_header", "call_info"):
        if key in data:
            if not isinstance(data[key], str):
                raise RulesError(f"{where}: {key} must be a string")
            kw[key] = data[key]
    if "contacts" in data:
        kw["contacts"] = _strs(where, "contacts", data["contacts"])
    if "q" in data:
        q = data["q"]
        if not isinstance(q, list) or not all(isinstance(x, int | float) and 0 <= x <= 1 for x in q):
            raise RulesError(f"{where}: q must be a list of numbers between 0 and 1")
        kw["q"] = tuple(float(x) for x in q)
    if "headers" in data:
        h = data["headers"]
        if not isinstance(h, dict) or not all(isinstance(v, str) for v in h.values()):
            raise RulesError(f'{where}: headers must be a table of name = "value"')
        kw["headers"] = tuple((str(k), v) for k, v in h.items())
    rule = Rule(**kw)
    if rule.delay_ms < 0:
        raise RulesError(f"{where}: delay_ms must not be negative")
    if action == "reject" and not 300 <= rule.status <= 699:
        raise RulesError(f"{where}: a reject rule needs status between 300 and 699")
    if action in ("redirect", "delay"):
        if rule.status and not 300 <= rule.status <= 399:
            raise RulesError(f"{where}: a redirect's status must be 3xx")
        if not rule.contacts:
            raise RulesError(f"{where}: a redirect needs contacts")
        if rule.q and len(rule.q) != len(rule.contacts):
            raise RulesError(f"{where}: q needs one value per contact")
    if action == "block" and rule.status and not 600 <= rule.status <= 699:
        raise RulesError(f"{where}: a block's status must be 6xx")
    if action == "delay" and rule.delay_ms <= 0:
        raise RulesError(f"{where}: a delay rule needs delay_ms > 0")
    if rule.attest not in ("A", "B", "C"):
        raise RulesError(f"{where}: attest must be A, B or C")
    return rule


def parse_rules(data: Mapping[str, Any]) -> RuleSet:
    """Rules from a parsed TOML document: ``[[rule]]`` tables and an optional ``[default]``."""
    unknown = set(data) - {"rule", "default"}
    if unknown:
        raise RulesError(
            f"unknown top-level key(s) {', '.join(sorted(unknown))} (expected [[rule]], [default])"
        )
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RulesError("rule must be an array of tables: [[rule]]")
    rules = tuple(parse_rule(r, f"rule {i + 1}") for i, r in enumerate(raw_rules))
    default_data = data.get("default")
    if default_data is None:
        default = DEFAULT_RULES.default
    elif isinstance(default_data, dict):
        default = parse_rule({"name": "default", **default_data}, "default", default=True)
    else:
        raise RulesError("default must be a table: [default]")
    return RuleSet(rules, default)


def load_rules(path: str | Path) -> RuleSet:
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise RulesError(f"no such rules file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path} is not valid TOML: {exc}") from None
    return parse_rules(data)


# The built-in rules: what `simulate` answers without --rules. Documented in docs/SIMULATOR.md.
DEFAULT_RULES_TOML = """
[[rule]]
name = "blocked robocaller (603+)"
prefixes = ["1900"]
action = "block"

[[rule]]
name = "unknown number"
prefixes = ["1555"]
action = "reject"
status = 404

[[rule]]
name = "no route"
prefixes = ["1999"]
action = "reject"
status = 503

[default]
name = "default redirect"
action = "redirect"
contacts = ["sip:{user}@192.0.2.10", "sip:{user}@198.51.100.20;transport=tcp"]
"""

DEFAULT_RULES = parse_rules(tomllib.loads(DEFAULT_RULES_TOML))


# ---------------------------------------------------------------------------------------------
# PASSporT (RFC 8225, 8588 SHAKEN, 8946 div) and the answers
# ---------------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(obj: Mapping[str, Any]) -> bytes:
    # RFC 8225 §9: keys in lexicographic order, no whitespace.
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def make_passport(
    orig: str,
    dest: str,
    *,
    attest: str = "A",
    ppt: str = "shaken",
    x5u: str = DEFAULT_X5U,
    iat: int | None = None,
    origid: str | None = None,
    div: str | None = None,
    pad_to: int = 0,
) -> str:
    """A compact JWS ``header.payload.signature`` shaped like a real SHAKEN (or div) PASSporT.

    The signature is 64 bytes derived from the signing input (the size of an ES256 signature), not a
    real signature. ``pad_to`` adds a ``pad`` claim so the token is about that many characters long."""
    header = {"alg": "ES256", "ppt": ppt, "typ": "passport", "x5u": x5u}
    payload: dict[str, Any] = {
        "dest": {"tn": [normalize_number(dest)]},
        "iat": int(time.time()) if iat is None else iat,
        "orig": {"tn": normalize_number(orig)},
    }
    if ppt == "div":
        payload["div"] = {"tn": normalize_number(div or dest)}
    else:
        payload["attest"] = attest
        payload["origid"] = origid or str(uuid.uuid4())

    def encode(p: Mapping[str, Any]) -> str:
        signing_input = f"{b64url(_json(header))}.{b64url(_json(p))}"
        return f"{signing_input}.{b64url(hashlib.sha512(signing_input.encode()).digest())}"

    token = encode(payload)
    if pad_to and len(token) < pad_to:
        # Each claim character costs 4/3 characters in base64url; '"pad":"",' costs 9.
        extra = max(0, (pad_to - len(token)) * 3 // 4 - 9)
        payload["pad"] = secrets.token_hex(extra // 2 + 1)[:extra]
        token = encode(payload)
    return token


def identity_header(
    token: str, *, x5u: str = DEFAULT_X5U, ppt: str = "shaken", quote_ppt: bool = False
) -> str:
    pptv = f'"{ppt}"' if quote_ppt or ppt == "div" else ppt
    return f"{token};info=<{x5u}>;alg=ES256;ppt={pptv}"


def decode_passport(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Split a compact JWS into its header and payload JSON and the signature bytes (no check)."""
    token = token.split(";", 1)[0].strip()
    h, p, s = token.split(".")

    def d(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    header: dict[str, Any] = json.loads(d(h))
    payload: dict[str, Any] = json.loads(d(p))
    return header, payload, d(s)


def _fill(template: str, user: str) -> str:
    number = normalize_number(user)
    return template.replace("{user}", user).replace("{number}", number).replace("{e164}", "+" + number)


def build_answer(
    rule: Rule, request: SipRequest, to_tag: str, *, now: int | None = None
) -> SipResponse | None:
    """The response ``rule`` gives ``request`` (None for silence). Pure: no I/O, no clock but ``now``."""
    status = rule.final_status
    if status is None:
        return None
    user = uri_user(request.uri)
    extra: list[tuple[str, str]] = []
    if rule.action in ("redirect", "delay"):
        from_value = request.get("from") or ""
        try:
            orig = uri_user(parse_name_addr(from_value).uri) or "0"
        except ParseError:
            orig = "0"
        if rule.identity:
            token = make_passport(
                orig, user, attest=rule.attest, x5u=rule.x5u, iat=now, pad_to=_token_target(rule)
            )
            extra.append(("Identity", identity_header(token, x5u=rule.x5u, quote_ppt=rule.quote_ppt)))
            if rule.div:
                div_token = make_passport(
                    orig,
                    user,
                    ppt="div",
                    x5u=rule.x5u,
                    iat=now,
                    div=rule.div_from or user,
                    pad_to=_token_target(rule),
                )
                extra.append(("Identity", identity_header(div_token, x5u=rule.x5u, ppt="div")))
        if rule.pai:
            num = normalize_number(orig)
            name = f'"{rule.pai_name}" ' if rule.pai_name else ""
            pai = f"{name}<sip:+{num}@sip.clearip.example;user=phone;verstat={rule.verstat}>"
            extra.append(("P-Asserted-Identity", pai))
        qs = rule.q or tuple(round(0.99 - 0.01 * i, 2) for i in range(len(rule.contacts)))
        contacts = [f"<{_fill(c, user)}>;q={q:g}" for c, q in zip(rule.contacts, qs, strict=True)]
        if rule.contact_lines:
            extra.extend(("Contact", c) for c in contacts)
        else:
            extra.append(("Contact", ", ".join(contacts)))
    elif rule.action == "block":
        extra.append(("Reason", rule.reason_header))
        if rule.call_info:
            extra.append(("Call-Info", rule.call_info))
    extra.append(("Server", SERVER_HEADER))
    extra.extend(rule.headers)
    reason = rule.reason or ("Network Blocked" if rule.action == "block" else reason_phrase(status))
    return make_response(request, status, reason, to_tag=to_tag, extra=extra)


def _token_target(rule: Rule) -> int:
    if not rule.identity_size:
        return 0
    params = len(f";info=<{rule.x5u}>;alg=ES256;ppt=") + 8
    return max(0, rule.identity_size - params)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


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
            self._spawn(asyncio.get_running_loop().create_task(self._retransmit(inv)))

    async def _retransmit(self, inv: _ServerInvite) -> None:
        """Timer G until the ACK, giving up at Timer H (64*T1)."""
        interval = self.t1
        deadline = time.monotonic() + 64 * self.t1
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(inv.acked.wait(), interval)
                return
            except TimeoutError:
                self.endpoint.reply(inv.source, inv.final)
                interval = min(interval * 2, T2)

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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


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
