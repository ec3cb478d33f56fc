"""SIP header grammar: names and the values the proxy reads (RFC 3261 §7.3, §20, §25.1).

Sans-I/O and message-free: strings in, values out. It owns the header-name tables (compact forms,
which headers are lists), tokens, comma lists and ``;param`` lists, and the structured values Via,
name-addr (From, To, Contact, Route...) and CSeq. It must not know about whole messages, bytes or
framing: :mod:`proxy_runtime.sip.message` holds a message's headers and :mod:`proxy_runtime.sip.parse`
turns bytes into messages, both by calling this module.

Every step is linear in its input: no regex can backtrack and nothing re-scans what it has read.
Strict variants (``strict=True``, :func:`split_strict`) reject what RFC 4475 calls invalid; the
parser applies them to the headers the proxy itself interprets (see ``docs/PARSER.md``).
"""

from __future__ import annotations

import re

from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.uri import plain_params
from proxy_runtime.sip.values import fields_equal, fields_repr

SIP_VERSION = "SIP/2.0"
# Header fields in one message; also bounds the values in one list header (a value flood costs like
# a header flood).
MAX_HEADERS = 256

# RFC 3261 §7.3.3 and later RFCs' compact forms (RFC 3841, 3515, 3892, 4028, 6665, 8224).
COMPACT_FORMS: dict[str, str] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Headers whose values may be comma-joined lists (RFC 3261 §7.3.1). Others (e.g. Identity, Date,
# WWW-Authenticate) must never be split on commas.
LIST_HEADERS = frozenset(
    {
        "via",
        "route",
        "record-route",
        "contact",
        "allow",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "content-encoding",
        "content-language",
        "in-reply-to",
        "path",
        "service-route",
        "reason",
        "p-asserted-identity",
        "allow-events",
        "call-info",
        "alert-info",
        "error-info",
    }
)

# Headers that are never lists, whatever their values hold: ``values``, ``first_value`` and
# ``pop_first_value`` return their values whole (an Identity with a stray comma stays one value).
# Other headers not in LIST_HEADERS (extensions) are split on commas outside quotes and <>.
NEVER_SPLIT = frozenset(
    {
        "identity",
        "identity-info",
        "date",
        "www-authenticate",
        "proxy-authenticate",
        "authorization",
        "proxy-authorization",
        "authentication-info",
        "from",
        "to",
        "call-id",
        "cseq",
        "subject",
        "user-agent",
        "server",
        "organization",
        "content-type",
        "content-length",
        "content-disposition",
        "max-forwards",
        "min-expires",
        "expires",
        "retry-after",
        "timestamp",
        "refer-to",
        "referred-by",
        "replaces",
        "session-expires",
        "min-se",
        "rack",
        "rseq",
        "event",
        "subscription-state",
        "p-charging-vector",
    }
)
# A token (RFC 3261 §25.1): method names, header names, parameter names.
TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# An unquoted display name: tokens separated by LWS (RFC 3261 §25.1 display-name).
_DISPLAY_TOKENS_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+(?:[ \t]+[A-Za-z0-9\-.!%*_+`'~]+)*")
# A complete quoted string, escapes allowed; the unrolled loop cannot backtrack.
_QUOTED_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# List scanning: a quoted string (to its end, or to the end of the text), <...>, or a comma.
_LIST_SCAN_RE = re.compile(r'"[^"\\]*(?:\\.?[^"\\]*)*"?|<[^>]*>?|,', re.S)
_VIA_PROTO_RE = re.compile(r"([^/ \t]+)[ \t]*/[ \t]*([^/ \t]+)[ \t]*/[ \t]*([^/ \t;]+)[ \t]+")
# The usual, canonical Via: "SIP/2.0/UDP host:port;p=v;p" (no LWS, no quotes). Others take the
# general path.
_VIA_FAST_RE = re.compile(
    r"SIP/2\.0/([A-Za-z0-9\-.!%*_+`'~]+) ([A-Za-z0-9\-._]+|\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\])"
    r"(?::([0-9]{1,5}))?((?:;[A-Za-z0-9\-.!%*_+`'~]+(?:=[^;\x00-\x20\"]+)?)*)"
)
_VIA_HOST_RE = re.compile(r"[A-Za-z0-9\-._]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
_SPECIAL_NAMES = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "rack": "RAck",
    "rseq": "RSeq",
    "mime-version": "MIME-Version",
    "sip-etag": "SIP-ETag",
    "sip-if-match": "SIP-If-Match",
}


def header_key(name: str) -> str:
    """The lookup key of a header name: lower case, compact form expanded."""
    k = name.lower()
    return COMPACT_FORMS.get(k, k) if len(k) == 1 else k


def canonical_name(key: str) -> str:
    special = _SPECIAL_NAMES.get(key)
    if special is not None:
        return special
    return "-".join(p.capitalize() for p in key.split("-"))


# Tokens every call carries (methods, the usual header parameters): answered by one set lookup
# before the regex, which is called twenty-odd times per call.
_COMMON_TOKENS = frozenset(
    (
        *("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "PRACK", "UPDATE", "INFO", "NOTIFY", "REFER"),
        *("SUBSCRIBE", "MESSAGE", "REGISTER"),
        *("branch", "rport", "received", "tag", "lr", "transport", "user", "maddr", "ttl", "q"),
        *("expires", "r2", "ftag"),
    )
)


def is_token(s: str) -> bool:
    return s in _COMMON_TOKENS or TOKEN_RE.fullmatch(s) is not None


def is_digits(s: str) -> bool:
    """ASCII digits only (``str.isdigit`` also accepts '²' and other digits ``int`` refuses)."""
    return s.isdigit() and s.isascii()


def _list_commas(value: str) -> list[int]:
    """Positions of the commas that separate list elements (outside quotes and <...>)."""
    return [m.start() for m in _LIST_SCAN_RE.finditer(value) if m.group() == ","]


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, honouring quotes, <...> and escapes."""
    if "," not in value:
        v = value.strip()
        return [v] if v else []
    if '"' not in value and "<" not in value:
        parts = value.split(",")
    else:
        parts = []
        start = 0
        for i in _list_commas(value):
            parts.append(value[start:i])
            start = i + 1
        parts.append(value[start:])
    out = []
    for p in parts:
        p = p.strip()
        if p:
            out.append(p)
    return out


def split_first(value: str) -> tuple[str, str]:
    """The first element of a list value and the rest, the rest's text kept as it was."""
    if "," not in value:
        return value.strip(), ""
    if '"' not in value and "<" not in value:
        first, _, rest = value.partition(",")
    else:
        commas = _list_commas(value)
        if not commas:
            return value.strip(), ""
        first, rest = value[: commas[0]], value[commas[0] + 1 :]
    return first.strip(), rest.lstrip(" \t,")


def parse_params(text: str) -> dict[str, str | None]:
    """';a=b;c' -> {'a': 'b', 'c': None}. Names lower-cased; quoted values kept with quotes."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for part in _split_semicolons(text):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        params[k.strip().lower()] = v.strip() if sep else None
    return params


def _parse_params_strict(text: str, what: str) -> dict[str, str | None]:
    """Header parameters after the value (``text`` starts after the first ';'): no empty parameter,
    names are tokens, '=' has a value (RFC 4475 §3.1.2.1)."""
    params: dict[str, str | None] = {}
    for part in _split_semicolons(text):
        k, sep, v = part.partition("=")
        k = k.strip()
        if not k or not is_token(k):
            raise ParseError(f"bad {what} parameter {part[:40]!r}")
        if sep:
            v = v.strip()
            if not v:
                raise ParseError(f"empty {what} parameter value {k[:40]!r}")
            params[k.lower()] = v
        else:
            params[k.lower()] = None
    return params


def _split_semicolons(text: str) -> list[str]:
    if '"' not in text:
        return text.split(";")
    parts: list[str] = []
    start = 0
    pos = 0
    n = len(text)
    while pos < n:
        semi = text.find(";", pos)
        quote = text.find('"', pos)
        if semi < 0:
            break
        if 0 <= quote < semi:
            m = _QUOTED_RE.match(text, quote)
            if m is None:  # unterminated: the rest is one part
                break
            pos = m.end()
            continue
        parts.append(text[start:semi])
        start = pos = semi + 1
    parts.append(text[start:])
    return parts


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def parse_cseq(value: str) -> tuple[int, str]:
    parts = value.split(" ") if "\t" not in value else value.replace("\t", " ").split(" ")
    if len(parts) != 2:
        parts = [p for p in parts if p]
    if len(parts) != 2 or not is_digits(parts[0]) or not is_token(parts[1]):
        raise ParseError(f"bad CSeq {value[:40]!r}")
    if len(parts[0]) > 10 or int(parts[0]) >= 2**32:  # RFC 3261 §20.16: a 32-bit unsigned integer
        raise ParseError("CSeq number out of range")
    return int(parts[0]), parts[1]


def split_strict(value: str, what: str) -> list[str]:
    """Split a list value; an empty element (",,", a trailing ',') is an error (RFC 4475 §3.1.2.1)."""
    out = []
    start = 0
    commas = _list_commas(value) if '"' in value or "<" in value else _plain_commas(value)
    if len(commas) >= MAX_HEADERS:  # a value flood costs like a header flood
        raise ParseError(f"too many {what} values")
    for i in [*commas, len(value)]:
        part = value[start:i].strip()
        if not part:
            raise ParseError(f"empty {what} value")
        out.append(part)
        start = i + 1
    return out


def _plain_commas(value: str) -> list[int]:
    out = []
    i = value.find(",")
    while i >= 0:
        out.append(i)
        i = value.find(",", i + 1)
    return out


_VIA_FIELDS = ("transport", "host", "port", "params", "protocol")


class Via:
    """One Via value. A plain class rather than a dataclass so that mypyc compiles its
    ``__init__`` (a dataclass's stays interpreted; one or more of these per message)."""

    __slots__ = _VIA_FIELDS

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None,
        params: dict[str, str | None],
        protocol: str = "SIP/2.0",
    ) -> None:
        self.transport = transport  # upper case: UDP, TCP, TLS, SCTP, WS...
        self.host = host
        self.port = port
        self.params = params
        self.protocol = protocol

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Via):
            return NotImplemented
        return fields_equal(self, other, _VIA_FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return fields_repr(self, _VIA_FIELDS)

    @property
    def branch(self) -> str:
        return self.params.get("branch") or ""

    @property
    def sent_by(self) -> tuple[str, int]:
        default = 5061 if self.transport == "TLS" else 5060
        return self.host, self.port if self.port is not None else default

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        hp = f"{host}:{self.port}" if self.port is not None else host
        return f"{self.protocol}/{self.transport} {hp}{format_params(self.params)}"


def parse_via(value: str, *, strict: bool = False) -> Via:
    """One Via value. LWS around '/' and ':' is tolerated (RFC 4475 §3.1.1.1). ``strict`` also
    rejects empty or malformed parameters and an empty port (RFC 4475 §3.1.2.1)."""
    value = value.strip()
    m = _VIA_FAST_RE.fullmatch(value)
    if m is not None:
        f_transport, f_host, f_port, f_params = m.groups()
        f_portn = int(f_port) if f_port else None
        if f_portn is not None and not 0 < f_portn < 65536:
            raise ParseError(f"bad Via port {f_port!r}")
        if f_host[0] == "[":
            f_host = f_host[1:-1]
        return Via(f_transport.upper(), f_host.lower(), f_portn, plain_params(f_params), SIP_VERSION)
    if value.startswith("SIP/2.0/"):
        sp = value.find(" ", 8)
        tab = value.find("\t", 8)
        if tab >= 0 and (sp < 0 or tab < sp):
            sp = tab
        if sp < 0:
            raise ParseError(f"bad Via {value[:60]!r}")
        name, ver, transport = "SIP", "2.0", value[8:sp]
        rest = value[sp + 1 :]
    else:
        m = _VIA_PROTO_RE.match(value)
        if m is None:
            raise ParseError(f"bad Via {value[:60]!r}")
        name, ver, transport = m.group(1, 2, 3)
        rest = value[m.end() :]
    if name.upper() != "SIP" or not is_token(ver) or not is_token(transport):
        raise ParseError(f"bad Via protocol {value[:40]!r}")
    sent_by, semi, param_text = rest.partition(";")
    # Tolerate "host : port" written with spaces (RFC 4475 §3.1.1.1).
    sent_by = sent_by.strip()
    if " " in sent_by or "\t" in sent_by:
        sent_by = sent_by.replace(" ", "").replace("\t", "")
    if not sent_by:
        raise ParseError("Via without sent-by")
    if sent_by[0] == "[":
        end = sent_by.find("]")
        if end < 0:
            raise ParseError(f"bad Via sent-by {sent_by[:60]!r}")
        host = sent_by[1:end]
        after = sent_by[end + 1 :]
        if after and after[0] != ":":
            raise ParseError(f"bad Via sent-by {sent_by[:60]!r}")
        port_s = after[1:]
        has_port = bool(after)
        if ":" not in host:
            raise ParseError(f"bad Via IPv6 host {host[:60]!r}")
    else:
        host, colon, port_s = sent_by.partition(":")
        has_port = bool(colon)
    port: int | None = None
    if port_s:
        if not is_digits(port_s) or len(port_s) > 5 or not 0 < int(port_s) < 65536:
            raise ParseError(f"bad Via sent-by {sent_by[:60]!r}")
        port = int(port_s)
    elif has_port and strict:
        raise ParseError(f"empty Via port {sent_by[:60]!r}")
    if not host or _VIA_HOST_RE.fullmatch(host) is None:
        raise ParseError(f"bad Via host {host[:60]!r}")
    if not strict:
        params = parse_params(param_text)
    else:
        params = _parse_params_strict(param_text, "Via") if semi else {}
    proto = SIP_VERSION if ver == "2.0" and name == "SIP" else f"{name}/{ver}"
    return Via(transport.upper(), host.lower(), port, params, proto)


_NAME_ADDR_FIELDS = ("display", "uri", "params", "bracketed")


class NameAddr:
    """A name-addr or addr-spec with header params: From, To, Contact, Route, Record-Route, PAI.
    A plain class for mypyc, as :class:`Via`."""

    __slots__ = _NAME_ADDR_FIELDS

    def __init__(
        self, display: str | None, uri: str, params: dict[str, str | None], bracketed: bool = True
    ) -> None:
        self.display = display
        self.uri = uri
        self.params = params
        self.bracketed = bracketed

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NameAddr):
            return NotImplemented
        return fields_equal(self, other, _NAME_ADDR_FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return fields_repr(self, _NAME_ADDR_FIELDS)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def q(self) -> float:
        q = self.params.get("q")
        try:
            return float(q) if q is not None else 1.0
        except ValueError:
            return 1.0

    def __str__(self) -> str:
        if not self.bracketed and not self.display:
            return self.uri + format_params(self.params)
        disp = f"{self.display} " if self.display else ""
        return f"{disp}<{self.uri}>{format_params(self.params)}"


def parse_name_addr(value: str, *, strict: bool = False) -> NameAddr:
    """A name-addr (``"Name" <uri>;p=v``) or addr-spec (``uri;p=v``: the params are the header's,
    RFC 3261 §20). ``strict`` rejects what RFC 4475 calls invalid: an unquoted display name with
    non-token characters (§3.1.2.15), spaces inside <> (§3.1.2.14), an addr-spec holding '?' or
    ',' (§3.1.2.13), empty parameters (§3.1.2.1)."""
    value = value.strip()
    lt = value.find("<")
    if lt >= 0:
        q1 = value.find('"', 0, lt)
        if q1 >= 0:
            # The display name is quoted: the '<' we want comes after the closing quote.
            m = _QUOTED_RE.match(value, q1)
            if m is None:
                raise ParseError("unterminated quoted display name")
            if strict and (value[:q1].strip() or value[m.end() : value.find("<", m.end())].strip()):
                raise ParseError("text around a quoted display name")
            lt = value.find("<", m.end())
            if lt < 0:
                raise ParseError("name-addr without <uri>")
        elif strict and value[:lt].strip() and _DISPLAY_TOKENS_RE.fullmatch(value[:lt].strip()) is None:
            raise ParseError(f"unquoted display name with non-token characters {value[:lt][:40]!r}")
        gt = value.find(">", lt)
        if gt < 0:
            raise ParseError("unterminated <uri>")
        display = value[:lt].strip() or None
        raw_uri = value[lt + 1 : gt]
        uri = raw_uri.strip()
        if not uri:
            raise ParseError("empty URI")
        tail = value[gt + 1 :].strip()
        if strict:
            if uri != raw_uri or " " in uri or "\t" in uri:
                raise ParseError(f"whitespace inside <{uri[:40]}>")
            if tail and tail[0] != ";":
                raise ParseError(f"garbage after <uri>: {tail[:40]!r}")
            params = _parse_params_strict(tail[1:], "header") if tail else {}
        else:
            params = parse_params(tail.lstrip(";"))
        return NameAddr(display, uri, params, True)
    if strict and value.startswith('"'):
        raise ParseError(
            "unterminated quoted display name" if _QUOTED_RE.match(value) is None else "no <uri>"
        )
    # addr-spec: params after the URI belong to the header, not the URI (RFC 3261 §20).
    uri, semi, ptext = value.partition(";")
    uri = uri.strip()
    if not uri or " " in uri or "\t" in uri:
        raise ParseError(f"bad addr-spec {value[:60]!r}")
    if strict:
        if "?" in uri or "," in uri or '"' in uri:
            raise ParseError(f"addr-spec with '?' or ',' must be in <> {uri[:40]!r}")
        params = _parse_params_strict(ptext, "header") if semi else {}
    else:
        params = parse_params(ptext)
    return NameAddr(None, uri, params, False)
