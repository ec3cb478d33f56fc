"""SIP parsing: bytes into a validated :class:`~proxy_runtime.sip.message.SipRequest` or
:class:`~proxy_runtime.sip.message.SipResponse`, and the fallback that reads enough of a bad request
to answer it 400.

Sans-I/O. Errors are :class:`~proxy_runtime.sip.errors.ParseError` with the status a server should
answer (``status_hint``). This module owns the start line, line ends and folding, header names,
Content-Length framing and the checks of the headers the proxy relies on; the grammar of each
header value is :mod:`proxy_runtime.sip.grammar`'s.

Conformance choices (RFC 4475) are listed in ``docs/PARSER.md``. In short: what the proxy itself
interprets (start line, Via, From, To, Call-ID, CSeq, Max-Forwards, Content-Length, Contact) is
validated strictly, except where the RFC allows leniency and the proxy re-writes the element anyway
(extra SP in the request line); what it only relays (Date, unknown headers) is not looked at.

Every step is linear in the input: no regex can backtrack, folded lines are joined once, and
nothing re-scans what it has already read.
"""

from __future__ import annotations

import re

from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import (
    MAX_HEADERS,
    SIP_VERSION,
    TOKEN_RE,
    canonical_name,
    header_key,
    is_digits,
    is_token,
    parse_cseq,
    parse_name_addr,
    parse_via,
    split_strict,
)
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.sip.uri import UriError, parse_uri

# Absolute cap on one message (the largest ``max_message_size`` settings accept); transports apply
# their own, smaller, configured cap first (the stream framer, the UDP datagram size).
MAX_MESSAGE_SIZE = 1_048_576
_BLANK_LINE_RE = re.compile(rb"\n\r?\n")


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
    if TOKEN_RE.fullmatch(name) is None:
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
        if not is_digits(cl_text) or len(cl_text) > 9:
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
        if len(code) != 3 or not is_digits(code) or not 100 <= int(code) <= 699:
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
    if TOKEN_RE.fullmatch(method) is None:
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
            if not is_digits(mf) or len(mf) > 9 or int(mf) > 255:
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
        top = split_strict(value, "Via")[0] if "," in value else value
        cache["via"] = (value, parse_via(top, strict=True))
        return
    for k in ("from", "to"):
        raw = headers[first[k]][2]
        cache[k] = (raw, parse_name_addr(raw, strict=True))
    for n, value in enumerate(vias):
        for m, v in enumerate(split_strict(value, "Via") if "," in value else [value]):
            via = parse_via(v, strict=True)
            if n == 0 and m == 0:
                cache["via"] = (value, via)
    for value in contacts:
        if value == "*":
            continue
        for v in split_strict(value, "Contact") if "," in value else [value]:
            parse_name_addr(v, strict=True)


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
