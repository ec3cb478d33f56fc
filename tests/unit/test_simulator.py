"""The ClearIP simulator's pure parts: rules, PASSporTs, the answers it builds. No sockets."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest

from proxy_runtime.core.routing import redirect_targets
from proxy_runtime.sip.grammar import parse_name_addr
from proxy_runtime.sip.message import SipRequest
from proxy_runtime.sip.parse import parse_message
from proxy_runtime.sip.uri import parse_uri, parse_uri_headers
from proxy_runtime.tools.answers import build_answer, decode_passport, make_passport, uri_with_headers
from proxy_runtime.tools.rules import (
    DEFAULT_RULES,
    DEFAULT_X5U,
    Rule,
    RulesError,
    load_rules,
    normalize_number,
    parse_rules,
)

EXAMPLE_RULES = Path(__file__).resolve().parents[2] / "examples" / "simulator-rules.toml"


def invite(number: str = "+12125551234", from_number: str = "+13035550100") -> SipRequest:
    raw = (
        f"INVITE sip:{number}@acme.sip.clearip.com SIP/2.0\r\n"
        "Via: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bKabc123;rport\r\n"
        "Max-Forwards: 70\r\n"
        f'From: "Caller" <sip:{from_number}@10.0.0.1>;tag=f1\r\n'
        f"To: <sip:{number}@acme.sip.clearip.com>\r\n"
        "Call-ID: call-1@10.0.0.1\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:switch@10.0.0.1:5060;transport=tcp>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    msg = parse_message(raw, datagram=False)
    assert isinstance(msg, SipRequest)
    return msg


RULES = parse_rules(
    tomllib.loads(
        """
[[rule]]
name = "exact"
numbers = ["+12125550001", "12125550002"]
action = "reject"
status = 404

[[rule]]
name = "prefix"
prefixes = ["1212555"]
action = "reject"
status = 503

[[rule]]
name = "blocked"
prefixes = ["1900"]
action = "block"

[[rule]]
name = "dead"
numbers = ["18005550000"]
action = "silence"

[[rule]]
name = "slow"
numbers = ["18005550001"]
action = "delay"
delay_ms = 250
contacts = ["sip:{user}@192.0.2.1"]

[default]
contacts = ["sip:{user}@192.0.2.10", "sip:{number}@198.51.100.20;transport=tcp", "sip:{e164}@203.0.113.5"]
"""
    )
)


# --- rule matching ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "rule"),
    [
        ("+12125550001", "exact"),  # exact, with +
        ("12125550001", "exact"),  # exact, without + (E.164 either way)
        ("+12125550002", "exact"),  # rule written without +, number with
        ("+12125550003", "prefix"),  # first match wins: not exact, so the prefix
        ("12125559999", "prefix"),
        ("+19005551234", "blocked"),
        ("+12125550001;npdi", "exact"),  # user parameters ignored
        ("+1-212-555-0001", "exact"),  # visual separators ignored
        ("+14155550100", "default"),
        ("18005550000", "dead"),
    ],
)
def test_rule_matching(user: str, rule: str) -> None:
    assert RULES.match(user).name == rule


def test_first_match_wins_in_file_order() -> None:
    rules = parse_rules(
        {
            "rule": [
                {"name": "broad", "prefixes": ["1"], "action": "reject", "status": 480},
                {"name": "narrow", "numbers": ["12125550001"], "action": "reject", "status": 404},
            ]
        }
    )
    assert rules.match("+12125550001").name == "broad"


def test_normalize_number() -> None:
    assert normalize_number("+1 (212) 555-1234") == "12125551234"
    assert normalize_number("+12125551234;rn=+12125550000;npdi") == "12125551234"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rule": [{"numbers": ["1"], "action": "explode"}]}, "action must be one of"),
        ({"rule": [{"numbers": ["1"], "action": "reject"}]}, "needs status"),
        ({"rule": [{"numbers": ["1"], "action": "redirect"}]}, "needs contacts"),
        ({"rule": [{"action": "reject", "status": 404}]}, "needs numbers or prefixes"),
        ({"rule": [{"numbers": ["abc"], "action": "reject", "status": 404}]}, "not a number"),
        ({"rule": [{"numbers": ["1"], "action": "reject", "status": 404, "colour": "red"}]}, "unknown key"),
        ({"rule": [{"numbers": ["1"], "action": "delay", "contacts": ["sip:a@b"]}]}, "delay_ms > 0"),
        (
            {"rule": [{"numbers": ["1"], "action": "redirect", "contacts": ["sip:a@b"], "q": [0.5, 0.4]}]},
            "one value per contact",
        ),
        ({"rules": []}, "unknown top-level"),
        (
            {"rule": [{"numbers": ["1"], "contacts": ["sip:a@b"], "identity_in": "body"}]},
            "identity_in must be one of header, contact, both",
        ),
        (
            {"rule": [{"numbers": ["1"], "contacts": ["sip:a@b"], "identity_per_contact": True}]},
            "identity_per_contact needs identity_in",
        ),
        (
            {"rule": [{"numbers": ["1"], "contacts": ["sip:a@b"], "contact_headers": ["X"]}]},
            "contact_headers must be a table",
        ),
    ],
)
def test_bad_rules_are_refused_with_the_reason(data: dict[str, object], message: str) -> None:
    with pytest.raises(RulesError, match=message):
        parse_rules(data)


@pytest.mark.parametrize(
    ("number", "status", "contacts"),
    [
        ("+19005550000", 603, []),  # the robocall prefix: 603+ block
        ("+15555550100", 404, []),
        ("+19995550000", 503, []),
        (
            "14155550100",
            302,
            ["<sip:14155550100@192.0.2.10>", "<sip:14155550100@198.51.100.20;transport=tcp>"],
        ),
    ],
)
def test_builtin_rules_answer_as_documented(number: str, status: int, contacts: list[str]) -> None:
    """The simulator's built-in rules (what `simulate` uses without --rules; docs/SIMULATOR.md),
    checked by the answers they give, not against the expression that defines them."""
    resp = build_answer(DEFAULT_RULES.match(number), invite(number), "t", now=1_700_000_000)
    assert resp is not None and resp.status == status
    got = [c.split(";q=")[0].strip() for v in resp.values("contact") for c in v.split(",")]
    assert got == contacts
    assert bool(resp.values("identity")) == (status == 302)
    if status == 603:
        assert resp.get("reason")  # the 603+ Reason header


def test_builtin_and_example_rules_load() -> None:
    assert [r.name for r in DEFAULT_RULES.rules] == [
        "blocked robocaller (603+)",
        "unknown number",
        "no route",
    ]
    assert DEFAULT_RULES.default.action == "redirect"
    example = load_rules(EXAMPLE_RULES)
    assert example.rules and example.default.action == "redirect"


def test_missing_rules_file() -> None:
    with pytest.raises(RulesError, match="no such rules file"):
        load_rules("/nonexistent/rules.toml")


# --- PASSporT ---------------------------------------------------------------------------------


def test_passport_shape() -> None:
    before = int(time.time())
    token = make_passport("+13035550100", "+12125551234", attest="B", pad_to=700)
    header, payload, signature = decode_passport(token)
    assert header == {"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": DEFAULT_X5U}
    assert payload["attest"] == "B"
    assert payload["orig"] == {"tn": "13035550100"}
    assert payload["dest"] == {"tn": ["12125551234"]}
    assert before <= payload["iat"] <= int(time.time())
    assert len(payload["origid"]) == 36  # a UUID
    assert len(signature) == 64  # the size of an ES256 (P-256) signature
    assert all(c.isalnum() or c in "-_." for c in token)  # base64url, no padding
    assert 650 <= len(token) <= 720


def test_div_passport() -> None:
    header, payload, _ = decode_passport(
        make_passport("13035550100", "12125551234", ppt="div", div="14155550100")
    )
    assert header["ppt"] == "div"
    assert payload["div"] == {"tn": "14155550100"}
    assert "attest" not in payload


def test_redirect_answer() -> None:
    req = invite("+14155550100")
    resp = build_answer(RULES.match("+14155550100"), req, "tt1", now=1_700_000_000)
    assert resp is not None
    assert (resp.status, resp.reason) == (302, "Moved Temporarily")
    assert resp.call_id == req.call_id and resp.to_tag == "tt1" and resp.get("via") == req.get("via")
    identities = resp.get_all("identity")
    assert len(identities) == 1
    ident = identities[0]
    assert 700 <= len(ident) <= 1000
    assert ident.endswith(f";info=<{DEFAULT_X5U}>;alg=ES256;ppt=shaken")
    header, payload, _ = decode_passport(ident)
    assert header["x5u"] == DEFAULT_X5U
    assert payload["iat"] == 1_700_000_000
    assert payload["orig"] == {"tn": "13035550100"} and payload["dest"] == {"tn": ["14155550100"]}
    contacts = [parse_name_addr(c) for c in resp.values("contact")]
    assert [c.uri for c in contacts] == [
        "sip:+14155550100@192.0.2.10",
        "sip:14155550100@198.51.100.20;transport=tcp",
        "sip:+14155550100@203.0.113.5",
    ]
    assert [c.q for c in contacts] == [0.99, 0.98, 0.97]
    # It survives a round trip through the parser unchanged.
    again = parse_message(resp.serialize(), datagram=False)
    assert again.get_all("identity") == identities


def test_redirect_options_div_pai_quoted_ppt_and_q() -> None:
    rule = Rule(
        "inbound",
        "redirect",
        numbers=("1",),
        contacts=("sip:switch-a@10.1.1.1", "sip:switch-b@10.1.1.2"),
        q=(0.7, 0.3),
        contact_lines=True,
        div=True,
        div_from="+14155550199",
        pai=True,
        pai_name="[V] Alice Smith",
        quote_ppt=True,
        identity_size=0,
    )
    resp = build_answer(rule, invite(), "t")
    assert resp is not None
    shaken, div = resp.get_all("identity")
    assert shaken.endswith(';ppt="shaken"')
    assert div.endswith(';ppt="div"')
    assert decode_passport(div)[1]["div"] == {"tn": "14155550199"}
    assert "pad" not in decode_passport(shaken)[1]
    pai = resp.get("p-asserted-identity")
    assert pai is not None
    assert pai.startswith('"[V] Alice Smith" <sip:+13035550100@')
    assert "verstat=TN-Validation-Passed" in pai
    assert resp.get_all("contact") == ["<sip:switch-a@10.1.1.1>;q=0.7", "<sip:switch-b@10.1.1.2>;q=0.3"]


def test_603_plus() -> None:
    resp = build_answer(RULES.match("+19005550000"), invite("+19005550000"), "t")
    assert resp is not None
    assert (resp.status, resp.reason) == (603, "Network Blocked")
    reason = resp.get("reason")
    assert reason is not None
    assert reason.startswith("SIP;cause=603;") and 'text="Network Blocked"' in reason
    assert resp.get("call-info")
    assert not resp.has("contact") and not resp.has("identity")


def test_reject_and_silence() -> None:
    resp = build_answer(RULES.match("+12125550003"), invite("+12125550003"), "t")
    assert resp is not None and (resp.status, resp.reason) == (503, "Service Unavailable")
    custom = Rule("r", "reject", numbers=("1",), status=480, reason="Try Later")
    resp = build_answer(custom, invite(), "t")
    assert resp is not None and (resp.status, resp.reason) == (480, "Try Later")
    assert build_answer(RULES.match("18005550000"), invite("18005550000"), "t") is None


# --- answer shapes of the field: headers in the Contact URI, 300, 607/608 ---------------------


def test_uri_headers_are_escaped_so_the_proxy_unescapes_them_byte_for_byte() -> None:
    nasty = 'a;b=c <d> "e", f&g=h @i +1 %41 ?j é'
    uri = uri_with_headers("sip:+15551234567@198.51.100.7;transport=tcp", [("Identity", nasty), ("X-A", "")])
    head, _, part = uri.partition("?")
    assert head == "sip:+15551234567@198.51.100.7;transport=tcp"
    assert not set(part) & set(';<>" ,@é') and part.count("&") == 1  # delimiters escaped
    assert parse_uri(uri).headers == part
    assert parse_uri_headers(part) == [("Identity", nasty), ("X-A", "")]
    # A template that already has a headers part gets the new ones after it.
    assert uri_with_headers("sip:a@b?X=1", [("Y", "2")]) == "sip:a@b?X=1&Y=2"
    assert uri_with_headers("sip:a@b", []) == "sip:a@b"


def _contact_rule(**kw: object) -> Rule:
    base: dict[str, object] = {
        "contacts": ("sip:{e164}@198.51.100.7", "sip:{e164}@198.51.100.8;transport=tcp"),
        "identity_in": "contact",
        "div": True,
        "pai": True,
        "pai_name": "[V] Alice",
    }
    base.update(kw)
    return Rule("in-uri", "redirect", numbers=("1",), **base)  # type: ignore[arg-type]


def test_identity_in_contact_uri_reaches_the_proxy_parser_as_headers() -> None:
    rule = _contact_rule(contact_headers=(("Max-Forwards", "3"),))
    resp = build_answer(rule, invite("+15551234567"), "t", now=1_700_000_000)
    assert resp is not None and resp.status == 302
    assert not resp.has("identity") and not resp.has("p-asserted-identity")  # only in the URIs
    raw = resp.get("contact") or ""
    assert "?Identity=eyJ" in raw and "%3Binfo%3D%3Chttps" in raw  # the field's shape, escaped
    redirect = redirect_targets(resp)  # the proxy's own reading of the 302
    assert [str(t.uri) for t in redirect.targets] == [
        "sip:+15551234567@198.51.100.7",
        "sip:+15551234567@198.51.100.8;transport=tcp",
    ]
    first, second = (dict_all(t.headers) for t in redirect.targets)
    assert first == second  # one signature, repeated in each Contact (identity_per_contact off)
    shaken, div = first["Identity"]
    assert shaken.endswith(f";info=<{DEFAULT_X5U}>;alg=ES256;ppt=shaken")
    assert decode_passport(shaken)[1]["dest"] == {"tn": ["15551234567"]}
    assert decode_passport(div)[0]["ppt"] == "div"
    assert first["P-Asserted-Identity"][0].startswith('"[V] Alice" <sip:+13035550100@')
    assert [t.ignored for t in redirect.targets] == [("Max-Forwards",), ("Max-Forwards",)]


def dict_all(pairs: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


def test_identity_per_contact_and_both() -> None:
    resp = build_answer(_contact_rule(identity_per_contact=True, div=False), invite(), "t")
    assert resp is not None
    ids = [dict_all(t.headers)["Identity"] for t in redirect_targets(resp).targets]
    assert len(ids) == 2 and ids[0] != ids[1]  # a PASSporT of its own in each Contact
    origids = {decode_passport(i[0])[1]["origid"] for i in ids}
    assert len(origids) == 2
    both = build_answer(_contact_rule(identity_in="both"), invite(), "t")
    assert both is not None
    in_uri = dict_all(redirect_targets(both).targets[0].headers)
    assert both.get_all("identity") == in_uri["Identity"]
    assert both.get_all("p-asserted-identity") == in_uri["P-Asserted-Identity"]


def test_300_multiple_choices() -> None:
    rules = parse_rules(
        tomllib.loads(
            '[default]\nstatus = 300\ncontacts = ["sip:{user}@192.0.2.10", "sip:{user}@192.0.2.11"]'
        )
    )
    resp = build_answer(rules.default, invite(), "t")
    assert resp is not None and (resp.status, resp.reason) == (300, "Multiple Choices")
    assert len(resp.values("contact")) == 2 and resp.get("identity")


@pytest.mark.parametrize(
    ("status", "phrase", "purpose"),
    [(603, "Network Blocked", "info"), (607, "Unwanted", "info"), (608, "Rejected", "jwscallinfo")],
)
def test_block_statuses_carry_their_own_reason_and_call_info(status: int, phrase: str, purpose: str) -> None:
    rule = parse_rules({"rule": [{"numbers": ["1"], "action": "block", "status": status}]}).rules[0]
    resp = build_answer(rule, invite(), "t")
    assert resp is not None and (resp.status, resp.reason) == (status, phrase)
    assert (resp.get("reason") or "").startswith(f'SIP;cause={status};text="{phrase}"')
    assert (resp.get("call-info") or "").endswith(f";purpose={purpose}")
    assert not resp.has("contact")


def test_block_headers_can_be_set_or_left_out() -> None:
    data = {
        "numbers": ["1"],
        "action": "block",
        "status": 608,
        "call_info": "",
        "reason_header": "Q.850;cause=21",
    }
    resp = build_answer(parse_rules({"rule": [data]}).rules[0], invite(), "t")
    assert resp is not None
    assert resp.get("reason") == "Q.850;cause=21" and not resp.has("call-info")
