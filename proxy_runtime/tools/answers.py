"""What the ClearIP simulator answers: PASSporTs (RFC 8225, 8588 SHAKEN, 8946 div) shaped like real
ones but signed with no key, and the response a rule gives a request (:func:`build_answer`, pure).

A redirect's signed headers (Identity, P-Asserted-Identity) go as headers of the 3xx, or escaped
inside each Contact URI (``<sip:+1...@host?Identity=...>``, RFC 3261 §19.1.1) for SBCs that take
redirect targets verbatim, or both (:func:`uri_with_headers`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from proxy_runtime.sip.build import REASON_PHRASES, make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import parse_name_addr
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.tools.endpoint import uri_user
from proxy_runtime.tools.rules import DEFAULT_X5U, Rule, normalize_number

SERVER_HEADER = "clearip-simulator"

EXTRA_REASONS: dict[int, str] = {
    300: "Multiple Choices",
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


def reason_phrase(status: int) -> str:
    return REASON_PHRASES.get(status) or EXTRA_REASONS.get(status) or "Unknown"


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


# RFC 3261 §25.1: an hname or hvalue is hnv-unreserved / unreserved / escaped. quote() leaves
# letters, digits and "_.-~" as they are; these are the other characters the grammar lets through
# unescaped. Everything else (";", "=", "<", ">", '"', ",", "&", "@", space...) is %XX-escaped, so
# the proxy's urllib.parse.unquote gives the value back byte for byte ("+" stays "+").
_HNV_SAFE = "[]/?:+$!*'()"


def uri_with_headers(uri: str, headers: Iterable[tuple[str, str]]) -> str:
    """``uri`` with ``headers`` appended as its ``?name=value&...`` part, escaped."""
    part = "&".join(f"{quote(n, safe=_HNV_SAFE)}={quote(v, safe=_HNV_SAFE)}" for n, v in headers)
    if not part:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}{part}"


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
        signed = _signed_headers(rule, orig, user, now)
        if rule.identity_in != "contact":
            extra.extend(signed)
        qs = rule.q or tuple(round(0.99 - 0.01 * i, 2) for i in range(len(rule.contacts)))
        contacts = []
        for i, (template, q) in enumerate(zip(rule.contacts, qs, strict=True)):
            embedded: list[tuple[str, str]] = []
            if rule.identity_in != "header":
                fresh = rule.identity_per_contact and i > 0
                embedded = _signed_headers(rule, orig, user, now) if fresh else signed
            uri = uri_with_headers(_fill(template, user), [*embedded, *rule.contact_headers])
            contacts.append(f"<{uri}>;q={q:g}")
        if rule.contact_lines:
            extra.extend(("Contact", c) for c in contacts)
        else:
            extra.append(("Contact", ", ".join(contacts)))
    phrase = "Network Blocked" if rule.action == "block" and status == 603 else reason_phrase(status)
    if rule.action == "block":
        reason_header, call_info = rule.block_headers(phrase)
        if reason_header:
            extra.append(("Reason", reason_header))
        if call_info:
            extra.append(("Call-Info", call_info))
    extra.append(("Server", SERVER_HEADER))
    extra.extend(rule.headers)
    return make_response(request, status, rule.reason or phrase, to_tag=to_tag, extra=extra)


def _signed_headers(rule: Rule, orig: str, user: str, now: int | None) -> list[tuple[str, str]]:
    """What a signing service adds: the SHAKEN Identity (and a div one), P-Asserted-Identity."""
    out: list[tuple[str, str]] = []
    if rule.identity:
        token = make_passport(
            orig, user, attest=rule.attest, x5u=rule.x5u, iat=now, pad_to=_token_target(rule)
        )
        out.append(("Identity", identity_header(token, x5u=rule.x5u, quote_ppt=rule.quote_ppt)))
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
            out.append(("Identity", identity_header(div_token, x5u=rule.x5u, ppt="div")))
    if rule.pai:
        num = normalize_number(orig)
        name = f'"{rule.pai_name}" ' if rule.pai_name else ""
        out.append(
            (
                "P-Asserted-Identity",
                f"{name}<sip:+{num}@sip.clearip.example;user=phone;verstat={rule.verstat}>",
            )
        )
    return out


def _token_target(rule: Rule) -> int:
    if not rule.identity_size:
        return 0
    params = len(f";info=<{rule.x5u}>;alg=ES256;ppt=") + 8
    return max(0, rule.identity_size - params)
