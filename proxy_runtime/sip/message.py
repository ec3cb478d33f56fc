"""SIP messages: parse bytes into requests and responses, edit headers, serialise back to bytes.

Sans-I/O. Header lines are kept as received (name spelling, value text, order), so a message relayed
unchanged is relayed byte for byte; header names are matched case-insensitively with compact forms
expanded (RFC 3261 §7.3.3). Values are parsed only when asked for (Via, CSeq, name-addr).
Errors are :class:`ParseError` with the status a server should answer (``status_hint``).

Conformance choices (RFC 4475) are listed in ``docs/PARSER.md``. In short: what the proxy itself
interprets (start line, Via, From, To, Call-ID, CSeq, Max-Forwards, Content-Length, Contact) is
validated strictly, except where the RFC allows leniency and the proxy re-writes the element anyway
(extra SP in the request line); what it only relays (Date, unknown headers) is not looked at.

Every step is linear in the input: no regex can backtrack, folded lines are joined once, and
nothing re-scans what it has already read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from proxy_runtime.sip.uri import SipUri, UriError, parse_uri

SIP_VERSION = "SIP/2.0"
MAX_HEADERS = 256
MAX_FORWARDS_DEFAULT = 70
# Absolute cap on one message (the largest ``max_message_size`` settings accept); transports apply
# their own, smaller, configured cap first (the stream framer, the UDP datagram size).
MAX_MESSAGE_SIZE = 1_048_576

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

_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# An unquoted display name: tokens separated by LWS (RFC 3261 §25.1 display-name).
_DISPLAY_TOKENS_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+(?:[ \t]+[A-Za-z0-9\-.!%*_+`'~]+)*")
# A complete quoted string, escapes allowed; the unrolled loop cannot backtrack.
_QUOTED_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# List scanning: a quoted string (to its end, or to the end of the text), <...>, or a comma.
_LIST_SCAN_RE = re.compile(r'"[^"\\]*(?:\\.?[^"\\]*)*"?|<[^>]*>?|,', re.S)
_VIA_PROTO_RE = re.compile(r"([^/ \t]+)[ \t]*/[ \t]*([^/ \t]+)[ \t]*/[ \t]*([^/ \t;]+)[ \t]+")
_BLANK_LINE_RE = re.compile(rb"\n\r?\n")
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


class ParseError(ValueError):
    """A message that cannot be understood. ``status_hint``: what to answer a request (400, 505...)."""

    def __init__(self, reason: str, status_hint: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_hint = status_hint


def header_key(name: str) -> str:
    """The lookup key of a header name: lower case, compact form expanded."""
    k = name.lower()
    return COMPACT_FORMS.get(k, k) if len(k) == 1 else k


def canonical_name(key: str) -> str:
    special = _SPECIAL_NAMES.get(key)
    if special is not None:
        return special
    return "-".join(p.capitalize() for p in key.split("-"))


def is_token(s: str) -> bool:
    return _TOKEN_RE.fullmatch(s) is not None


def _is_digits(s: str) -> bool:
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


def _split_first(value: str) -> tuple[str, str]:
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


# ---------------------------------------------------------------------------------------------
# Structured header values
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Via:
    transport: str  # upper case: UDP, TCP, TLS, SCTP, WS...
    host: str
    port: int | None
    params: dict[str, str | None]
    protocol: str = "SIP/2.0"

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
        f_pdict: dict[str, str | None] = {}
        if f_params:
            for part in f_params[1:].split(";"):
                k, sep, v = part.partition("=")
                f_pdict[k.lower()] = v if sep else None
        if f_host[0] == "[":
            f_host = f_host[1:-1]
        return Via(f_transport.upper(), f_host.lower(), f_portn, f_pdict, SIP_VERSION)
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
        if not _is_digits(port_s) or len(port_s) > 5 or not 0 < int(port_s) < 65536:
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


@dataclass(slots=True)
class NameAddr:
    """A name-addr or addr-spec with header params: From, To, Contact, Route, Record-Route, PAI."""

    display: str | None
    uri: str
    params: dict[str, str | None]
    bracketed: bool = True

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


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


class SipMessage:
    """Headers as ``[key, name, value]`` lists in order, plus the body bytes.

    A header entry is never edited in place once parsing is done: edits replace the entry. That
    lets :meth:`copy` share entries between copies (a proxy copies every request it forwards)."""

    __slots__ = ("_cache", "body", "headers")

    def __init__(self, headers: list[list[str]] | None = None, body: bytes = b"") -> None:
        self.headers: list[list[str]] = headers if headers is not None else []
        self.body = body
        # Parsed header values, keyed by what they were parsed from: an entry is used only while
        # the header still holds that very string object, so any edit invalidates it.
        self._cache: dict[str, tuple[str, Any]] = {}

    def forget_parsed(self) -> None:
        """Drop the cached parsed values (they are rebuilt on demand): for messages held long,
        such as the INVITE of a ringing call, memory matters more than re-parsing speed."""
        self._cache = {}

    def _cached(self, key: str, raw: str) -> Any:
        entry = self._cache.get(key)
        if entry is not None and entry[0] is raw:
            return entry[1]
        return None

    # --- header access -------------------------------------------------------------------------
    def get(self, name: str) -> str | None:
        key = header_key(name)
        for h in self.headers:
            if h[0] == key:
                return h[2]
        return None

    def get_all(self, name: str) -> list[str]:
        key = header_key(name)
        return [h[2] for h in self.headers if h[0] == key]

    def values(self, name: str) -> list[str]:
        """All values of a list header, comma-separated values split, in order."""
        key = header_key(name)
        out: list[str] = []
        whole = key in NEVER_SPLIT
        for h in self.headers:
            if h[0] == key:
                if whole:
                    v = h[2].strip()
                    if v:
                        out.append(v)
                else:
                    out.extend(split_list(h[2]))
        return out

    def has(self, name: str) -> bool:
        key = header_key(name)
        return any(h[0] == key for h in self.headers)

    def remove(self, name: str) -> int:
        key = header_key(name)
        before = len(self.headers)
        self.headers = [h for h in self.headers if h[0] != key]
        return before - len(self.headers)

    def set(self, name: str, value: str) -> None:
        """Replace every header of that name by one, at the first one's place (or at the end)."""
        key = header_key(name)
        headers = self.headers
        for i, h in enumerate(headers):
            if h[0] == key:
                headers[i] = [key, h[1], value]
                for j in range(len(headers) - 1, i, -1):
                    if headers[j][0] == key:
                        del headers[j]
                return
        headers.append([key, canonical_name(key), value])

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Add a header line; first=True puts it above any existing line of that name."""
        key = header_key(name)
        line = [key, canonical_name(key) if name.islower() else name, value]
        headers = self.headers
        if first:
            for i, h in enumerate(headers):
                if h[0] == key:
                    headers.insert(i, line)
                    return
            headers.insert(self._insert_pos(), line)
        else:
            last = -1
            for i, h in enumerate(headers):
                if h[0] == key:
                    last = i
            headers.insert(last + 1 if last >= 0 else self._insert_pos(), line)

    def _insert_pos(self) -> int:
        # New headers go before Content-Length / Content-Type so those stay last, as is customary.
        for i, h in enumerate(self.headers):
            if h[0] == "content-length" or h[0] == "content-type":
                return i
        return len(self.headers)

    def pop_first_value(self, name: str) -> str | None:
        """Remove and return the first value of a list header (Via, Route). The other values of
        that line are kept as they were written."""
        key = header_key(name)
        headers = self.headers
        i = 0
        while i < len(headers):
            h = headers[i]
            if h[0] == key:
                first, rest = (h[2].strip(), "") if key in NEVER_SPLIT else _split_first(h[2])
                if not first:
                    if not rest:
                        del headers[i]
                        continue
                    first, rest = _split_first(rest)
                if rest:
                    headers[i] = [key, h[1], rest]
                else:
                    del headers[i]
                return first
            i += 1
        return None

    def first_value(self, name: str) -> str | None:
        key = header_key(name)
        for h in self.headers:
            if h[0] == key:
                v = h[2]
                if "," in v and key not in NEVER_SPLIT:
                    vals = split_list(v)
                    if vals:
                        return vals[0]
                else:
                    v = v.strip()
                    if v:
                        return v
        return None

    # --- common headers ----------------------------------------------------------------------
    @property
    def call_id(self) -> str:
        return (self.get("call-id") or "").strip()

    @property
    def cseq(self) -> tuple[int, str]:
        v = self.get("cseq")
        if v is None:
            raise ParseError("missing CSeq")
        hit = self._cached("cseq", v)
        if hit is None:
            hit = parse_cseq(v)
            self._cache["cseq"] = (v, hit)
        return hit  # type: ignore[no-any-return]

    @property
    def top_via(self) -> Via:
        """The first Via value, parsed. A copy: editing it does not edit the message."""
        for h in self.headers:
            if h[0] == "via":
                raw = h[2]
                hit = self._cached("via", raw)
                if hit is None:
                    v = self.first_value("via")
                    if v is None:
                        break
                    hit = parse_via(v)
                    self._cache["via"] = (raw, hit)
                return Via(hit.transport, hit.host, hit.port, dict(hit.params), hit.protocol)
        raise ParseError("missing Via")

    def _name_addr(self, key: str) -> NameAddr | None:
        v = self.get(key)
        if not v:
            return None
        hit = self._cached(key, v)
        if hit is None:
            hit = parse_name_addr(v)
            self._cache[key] = (v, hit)
        return hit  # type: ignore[no-any-return]

    @property
    def from_tag(self) -> str | None:
        na = self._name_addr("from")
        return na.tag if na else None

    @property
    def to_tag(self) -> str | None:
        na = self._name_addr("to")
        return na.tag if na else None

    # --- serialisation -------------------------------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        """Bytes on the wire. Content-Length is always rewritten to the body's length."""
        body = self.body
        parts = [self.start_line()]
        append = parts.append
        cl_done = False
        for key, name, value in self.headers:
            if key == "content-length":
                if cl_done:
                    continue
                cl_done = True
                append(f"{name}: {len(body)}")
            else:
                append(f"{name}: {value}")
        if not cl_done:
            append(f"Content-Length: {len(body)}")
        append("\r\n")
        return "\r\n".join(parts).encode("utf-8", "surrogateescape") + body

    def __bytes__(self) -> bytes:
        return self.serialize()

    def iter_headers(self) -> Iterator[tuple[str, str]]:
        for _, name, value in self.headers:
            yield name, value


class SipRequest(SipMessage):
    __slots__ = ("method", "uri")

    def __init__(
        self, method: str, uri: str, headers: list[list[str]] | None = None, body: bytes = b""
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"

    def copy(self) -> SipRequest:
        out = SipRequest(self.method, self.uri, self.headers.copy(), self.body)
        out._cache = dict(self._cache)  # same strings, so the entries stay valid
        return out

    @property
    def parsed_uri(self) -> SipUri:
        """The Request-URI, parsed (cached while ``uri`` is unchanged)."""
        uri = self.uri
        hit = self._cached(" ruri", uri)
        if hit is None:
            hit = parse_uri(uri)
            self._cache[" ruri"] = (uri, hit)
        return hit  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<SipRequest {self.method} {self.uri} call-id={self.call_id!r}>"


class SipResponse(SipMessage):
    __slots__ = ("reason", "status")

    def __init__(
        self, status: int, reason: str, headers: list[list[str]] | None = None, body: bytes = b""
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    def copy(self) -> SipResponse:
        out = SipResponse(self.status, self.reason, self.headers.copy(), self.body)
        out._cache = dict(self._cache)
        return out

    def __repr__(self) -> str:
        return f"<SipResponse {self.status} {self.reason} call-id={self.call_id!r}>"


def parse_cseq(value: str) -> tuple[int, str]:
    parts = value.split(" ") if "\t" not in value else value.replace("\t", " ").split(" ")
    if len(parts) != 2:
        parts = [p for p in parts if p]
    if len(parts) != 2 or not _is_digits(parts[0]) or not is_token(parts[1]):
        raise ParseError(f"bad CSeq {value[:40]!r}")
    if len(parts[0]) > 10 or int(parts[0]) >= 2**32:  # RFC 3261 §20.16: a 32-bit unsigned integer
        raise ParseError("CSeq number out of range")
    return int(parts[0]), parts[1]


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedHead:
    """What could be read of a message that failed validation: enough to answer it, maybe."""

    request: SipRequest | None


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def find_head_end(data: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """Where the head ends: (length of the head without its last line end, offset of the body),
    or None when there is no empty line yet. Accepts CRLF and bare LF line ends. ``start`` lets a
    stream reader resume where it stopped looking (it must back off 3 bytes itself)."""
    m = _BLANK_LINE_RE.search(data, start)
    if m is None:
        return None
    end = m.start()
    if end > 0 and data[end - 1] == 13:  # CR
        end -= 1
    return end, m.end()


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """Split a message into its head (start line + headers) and what follows the blank line."""
    found = find_head_end(data)
    if found is None:
        raise ParseError("no end of headers")
    return data[: found[0]], data[found[1] :]


def _head_lines(text: str) -> list[str]:
    """Lines of a head: CRLF (the norm) or bare LF; a CR elsewhere is an error (header smuggling)."""
    lines = text.split("\r\n")
    for line in lines:
        if "\n" in line or "\r" in line:
            break
    else:
        return lines
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.endswith("\r"):
            line = lines[i] = line[:-1]
        if "\r" in line:
            raise ParseError("bare CR in the message head")
    return lines


# Validated header names: raw name (as written before the colon) -> (key, name as kept).
_NAME_CACHE: dict[str, tuple[str, str]] = {}
_NAME_CACHE_MAX = 4096


def _header_name(raw: str) -> tuple[str, str]:
    name = raw.rstrip(" \t")
    if _TOKEN_RE.fullmatch(name) is None:
        if not name:
            raise ParseError(f"header line without a name: {raw[:40]!r}")
        raise ParseError(f"bad header name {name[:40]!r}")
    found = (header_key(name), name)
    if len(_NAME_CACHE) < _NAME_CACHE_MAX:
        _NAME_CACHE[raw] = found
    return found


def parse_headers(head_lines: list[str]) -> list[list[str]]:
    """Header lines (without the start line) into ``[key, name, value]``; folded lines joined with
    one SP (RFC 3261 §7.3.1)."""
    headers: list[list[str]] = []
    append = headers.append
    cache = _NAME_CACHE
    folded: list[str] | None = None
    for line in head_lines:
        c = line[:1]
        if c == " " or c == "\t":
            if not headers:
                raise ParseError("continuation line before any header")
            if folded is None:
                folded = [headers[-1][2]]
            folded.append(line.strip(" \t"))
            continue
        if folded is not None:
            headers[-1][2] = " ".join(p for p in folded if p)
            folded = None
        if not line:
            continue
        raw, sep, value = line.partition(":")
        if not sep:
            raise ParseError(f"header line without a name: {line[:40]!r}")
        found = cache.get(raw)
        if found is None:
            found = _header_name(raw)
        append([found[0], found[1], value.strip(" \t")])
    if folded is not None:
        headers[-1][2] = " ".join(p for p in folded if p)
    if len(headers) > MAX_HEADERS:
        raise ParseError("too many header fields", 400)
    return headers


def parse_message(data: bytes, *, datagram: bool = True, max_size: int = MAX_MESSAGE_SIZE) -> SipMessage:
    """Parse one complete message. On a datagram a missing Content-Length means "the rest", and
    bytes after Content-Length are ignored (RFC 4475 §3.1.1.8). Messages over ``max_size``
    raise ParseError 513."""
    if len(data) > max_size:
        raise ParseError("message too large", 513)
    if data[:1] in (b"\r", b"\n"):  # CRLFs before the start line are ignored (RFC 3261 §7.5)
        data = data.lstrip(b"\r\n")
    found = find_head_end(data)
    if found is None:
        raise ParseError("no end of headers")
    text = _decode(data[: found[0]])
    body_start = found[1]
    lines = _head_lines(text)
    if len(lines) > MAX_HEADERS * 4:  # folded lines included; bounds the work on a header flood
        raise ParseError("too many header lines", 400)
    msg = _start_line(lines[0])
    del lines[0]
    headers = msg.headers = parse_headers(lines)
    # One pass: where the headers we check are, and duplicates of single-valued ones.
    first: dict[str, int] = {}
    vias: list[str] = []
    contacts: list[str] = []
    cl_text: str | None = None
    for i, h in enumerate(headers):
        k = h[0]
        if k == "via":
            vias.append(h[2])
        elif k == "contact":
            contacts.append(h[2])
        elif k in _SINGLE:
            if k in first:
                if k != "content-length":
                    raise ParseError(f"more than one {canonical_name(k)}")
                if h[2] != cl_text:
                    raise ParseError("conflicting Content-Length headers")
                continue
            first[k] = i
            if k == "content-length":
                cl_text = h[2]
    # Content-Length framing and checks.
    if cl_text is not None:
        if not _is_digits(cl_text) or len(cl_text) > 9:
            raise ParseError(f"bad Content-Length {cl_text[:20]!r}")
        end = body_start + int(cl_text)
        if end > len(data):
            raise ParseError("Content-Length larger than the message")
        msg.body = data[body_start:end]
    else:
        if not datagram and len(data) > body_start:
            raise ParseError("missing Content-Length on a stream")
        msg.body = data[body_start:]
    _validate(msg, first, vias, contacts)
    return msg


_SINGLE = frozenset({"call-id", "cseq", "from", "to", "max-forwards", "content-length"})


def _start_line(line: str) -> SipMessage:
    if line.startswith("SIP/"):
        parts = line.split(" ", 2)
        if len(parts) < 2:
            raise ParseError("bad status line")
        if parts[0] != SIP_VERSION:
            raise ParseError(f"unsupported version {parts[0][:20]!r}", 505)
        code = parts[1]
        if len(code) != 3 or not _is_digits(code) or not 100 <= int(code) <= 699:
            raise ParseError(f"bad status code {code[:20]!r}")
        return SipResponse(int(code), parts[2] if len(parts) > 2 else "")
    parts = line.split(" ")
    if len(parts) != 3:
        # Extra SP between or after the elements (RFC 4475 §3.1.2.9, §3.1.2.10): accepted; the
        # request line is re-written with single SPs when the request is forwarded.
        parts = [p for p in parts if p]
        if len(parts) != 3:
            raise ParseError(f"bad request line {line[:80]!r}")
    method, uri, version = parts
    if _TOKEN_RE.fullmatch(method) is None:
        raise ParseError(f"bad method {method[:20]!r}")
    if version != SIP_VERSION:
        upper = version.upper()
        if upper == SIP_VERSION:
            pass
        elif upper.startswith("SIP/"):
            raise ParseError(f"unsupported version {version[:20]!r}", 505)
        else:
            raise ParseError(f"bad request line {line[:80]!r}")
    return SipRequest(method, uri)


REQUIRED_HEADERS = ("via", "from", "to", "call-id", "cseq")


def _validate(msg: SipMessage, first: dict[str, int], vias: list[str], contacts: list[str]) -> None:
    headers = msg.headers
    if not vias:
        raise ParseError("missing Via")
    for k in ("from", "to", "call-id", "cseq"):
        if k not in first:
            raise ParseError(f"missing {canonical_name(k)}")
    cache = msg._cache
    raw = headers[first["cseq"]][2]
    cseq = parse_cseq(raw)
    cache["cseq"] = (raw, cseq)
    method = cseq[1]
    if isinstance(msg, SipRequest):
        if method != msg.method:
            raise ParseError("CSeq method does not match the request method")
        i = first.get("max-forwards")
        if i is not None:
            mf = headers[i][2]
            if not _is_digits(mf) or len(mf) > 9 or int(mf) > 255:
                raise ParseError(f"bad Max-Forwards {mf[:20]!r}")
        try:
            ruri = parse_uri(msg.uri)
            cache[" ruri"] = (msg.uri, ruri)
        except UriError as exc:
            if exc.status_hint == 416 and is_token(msg.uri.split(":", 1)[0]):
                raise ParseError(exc.reason, 416) from None
            raise ParseError(f"bad Request-URI: {exc.reason}") from None
        if ruri.headers or msg.uri.endswith("?"):
            # RFC 3261 §19.1.1: headers are not allowed in a Request-URI (RFC 4475 §3.1.2.11).
            raise ParseError("header component in the Request-URI")
    if not headers[first["call-id"]][2]:
        raise ParseError("empty Call-ID")
    # From and To: name-addr syntax only (the proxy reads their tags, never routes on their URIs).
    if isinstance(msg, SipResponse):
        # A proxy routes a response by its top Via alone and relays the rest untouched: check
        # that Via strictly, leave From/To/Contact and the lower Vias to the endpoints.
        value = vias[0]
        top = _split_strict(value, "Via")[0] if "," in value else value
        cache["via"] = (value, parse_via(top, strict=True))
        return
    for k in ("from", "to"):
        raw = headers[first[k]][2]
        cache[k] = (raw, parse_name_addr(raw, strict=True))
    for n, value in enumerate(vias):
        for m, v in enumerate(_split_strict(value, "Via") if "," in value else [value]):
            via = parse_via(v, strict=True)
            if n == 0 and m == 0:
                cache["via"] = (value, via)
    for value in contacts:
        if value == "*":
            continue
        for v in _split_strict(value, "Contact") if "," in value else [value]:
            parse_name_addr(v, strict=True)


def _split_strict(value: str, what: str) -> list[str]:
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


def try_parse_for_reply(data: bytes) -> SipRequest | None:
    """After a parse failure, read as much as is needed to answer 400: a request with Via, From,
    To, Call-ID and CSeq that can be copied into a response (every Via; the first of the others,
    those present). None when there is nothing to answer: a response, an ACK, a start line that
    is not a request, or no usable top Via (sent-by unreadable)."""
    try:
        if len(data) > MAX_MESSAGE_SIZE:
            data = data[:MAX_MESSAGE_SIZE]
        data = data.lstrip(b"\r\n")
        found = find_head_end(data)
        head = data[: found[0]] if found is not None else data
        text = _decode(head)
        lines = text.replace("\r\n", "\n").split("\n")
        if not lines or lines[0].startswith("SIP/"):
            return None
        parts = [p for p in lines[0].split(" ") if p]
        method = parts[0] if parts and is_token(parts[0]) else ""
        if not method or method == "ACK":
            return None
        req = SipRequest(method, parts[1] if len(parts) > 1 else "")
        wanted = ("via", "from", "to", "call-id", "cseq")
        seen: set[str] = set()
        headers = req.headers
        keep = False  # whether a continuation line belongs to a header we kept
        for line in lines[1 : MAX_HEADERS * 4]:
            if not line:
                continue
            if line[0] in " \t":
                if keep:
                    h = headers[-1]
                    h[2] = f"{h[2]} {line.strip()}".strip()
                continue
            name, sep, value = line.partition(":")
            name = name.strip()
            keep = False
            if not sep or not is_token(name):
                continue
            key = header_key(name)
            if key in wanted and (key == "via" or key not in seen):
                seen.add(key)
                headers.append([key, canonical_name(key), value.strip()])
                keep = True
        top = req.first_value("via")
        if top is None:
            return None
        parse_via(top)
        return req
    except (ParseError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Building responses
# ---------------------------------------------------------------------------------------------

REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    302: "Moved Temporarily",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    487: "Request Terminated",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    603: "Decline",
}


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    extra: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> SipResponse:
    """A response to ``request`` (RFC 3261 §8.2.6): Via, From, To, Call-ID, CSeq copied."""
    headers: list[list[str]] = []
    for h in request.headers:
        k = h[0]
        if k == "via" or k == "from" or k == "call-id" or k == "cseq":
            headers.append(list(h))
        elif k == "to":
            value = h[2]
            if to_tag and status > 100 and ";tag=" not in value.replace(" ", "").lower():
                value = f"{value};tag={to_tag}"
            headers.append([k, h[1], value])
    resp = SipResponse(status, reason or REASON_PHRASES.get(status, "Unknown"), headers, body)
    for name, value in extra or ():
        resp.add(name, value)
    return resp
