"""The ClearIP simulator's rules: which answer each called number gets, read from TOML.

A rule matches exact numbers, then prefixes (first match wins; else the default rule) and names an
action (redirect, reject, block, silence, delay) with its details: a redirect's status (302, or 300
Multiple Choices), where its signed headers go (``identity_in``: as headers of the response, escaped
inside each Contact URI as RFC 3261 §19.1.1 headers, or both), a block's status (603+, 607, 608) and
its Reason and Call-Info. ``parse_rules`` checks every key
and value and raises :class:`RulesError` naming the rule. The built-in rules (what ``simulate``
answers without ``--rules``) are ``DEFAULT_RULES_TOML``, documented in ``docs/SIMULATOR.md``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACTIONS = ("redirect", "reject", "block", "silence", "delay")
IDENTITY_IN = ("header", "contact", "both")
DEFAULT_X5U = "https://certificates.example/cert.pem"
DEFAULT_BLOCK_REASON = 'SIP;cause=603;text="Network Blocked";location=TN'
DEFAULT_BLOCK_CALL_INFO = "<https://redress.example/clearip>;purpose=info"
# RFC 8688 §5: a 608's Call-Info with purpose "jwscallinfo" points at a signed jCard saying who
# rejected the call and how to seek redress (here a placeholder address, never fetched).
DEFAULT_608_CALL_INFO = "<https://redress.example/clearip/608>;purpose=jwscallinfo"


class RulesError(ValueError):
    """A rules file that cannot be used; the message says which rule and what is wrong."""


def normalize_number(text: str) -> str:
    """Digits of a number: ``+1 (212) 555-1234`` -> ``12125551234``; user params dropped."""
    text = text.split(";", 1)[0].strip()
    return "".join(c for c in text if c not in "+-.() \t")


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
    # where the Identity (and P-Asserted-Identity) headers go: "header" (of the 3xx), "contact"
    # (escaped inside each Contact URI, RFC 3261 §19.1.1) or "both"
    identity_in: str = "header"
    identity_per_contact: bool = False  # each Contact URI carries its own PASSporT (fresh origid)
    contact_headers: tuple[tuple[str, str], ...] = ()  # more headers escaped into each Contact URI
    attest: str = "A"
    x5u: str = DEFAULT_X5U
    quote_ppt: bool = False  # write ppt="shaken" instead of ppt=shaken
    identity_size: int = 800  # pad each Identity header to about this many bytes (0: no padding)
    div: bool = False  # add a second, ppt="div" Identity (RFC 8946)
    div_from: str = ""  # the diverting number (default: the called number)
    pai: bool = False  # add P-Asserted-Identity with verstat (inbound calls)
    pai_name: str = ""  # display name, e.g. "[V] Alice Smith"
    verstat: str = "TN-Validation-Passed"
    # block (None: the status's own, see :meth:`block_headers`)
    reason_header: str | None = None
    call_info: str | None = None
    # any action
    headers: tuple[tuple[str, str], ...] = ()
    trying: bool | None = None  # send 100 Trying first; default: when delay_ms > 0

    def matches(self, number: str) -> bool:
        return number in self.numbers or any(number.startswith(p) for p in self.prefixes)

    def block_headers(self, phrase: str) -> tuple[str, str]:
        """A block's ``Reason`` and ``Call-Info`` (``""``: none): the rule's, else the status's own:
        603 the ATIS-1000099 "603+" pair, 608 RFC 8688's jwscallinfo, any other 6xx its cause."""
        status = self.final_status or 603
        reason = DEFAULT_BLOCK_REASON if status == 603 else f'SIP;cause={status};text="{phrase}"'
        call_info = DEFAULT_608_CALL_INFO if status == 608 else DEFAULT_BLOCK_CALL_INFO
        return (
            self.reason_header if self.reason_header is not None else reason,
            self.call_info if self.call_info is not None else call_info,
        )

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
    "identity_in",
    "identity_per_contact",
    "contact_headers",
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
    for key in ("contact_lines", "identity", "identity_per_contact", "quote_ppt", "div", "pai"):
        if key in data:
            kw[key] = _bool(where, key, data[key])
    if "trying" in data:
        kw["trying"] = _bool(where, "trying", data["trying"])
    for key in ("status", "delay_ms", "identity_size"):
        if key in data:
            kw[key] = _int(where, key, data[key])
    for key in (
        "reason",
        "attest",
        "x5u",
        "div_from",
        "pai_name",
        "verstat",
        "reason_header",
        "call_info",
        "identity_in",
    ):
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
    for key in ("headers", "contact_headers"):
        if key in data:
            h = data[key]
            if not isinstance(h, dict) or not all(isinstance(v, str) for v in h.values()):
                raise RulesError(f'{where}: {key} must be a table of name = "value"')
            kw[key] = tuple((str(k), v) for k, v in h.items())
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
    if rule.identity_in not in IDENTITY_IN:
        raise RulesError(f"{where}: identity_in must be one of {', '.join(IDENTITY_IN)}")
    if rule.identity_per_contact and rule.identity_in == "header":
        raise RulesError(f'{where}: identity_per_contact needs identity_in = "contact" or "both"')
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
