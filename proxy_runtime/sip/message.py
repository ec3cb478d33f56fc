"""SIP messages: requests and responses as ordered header lines plus a body; edit, copy, serialise.

Sans-I/O. Header lines are kept as received (name spelling, value text, order), so a message relayed
unchanged is relayed byte for byte; header names are matched case-insensitively with compact forms
expanded (RFC 3261 §7.3.3). Values are parsed only when asked for (Via, CSeq, name-addr), with the
grammar of :mod:`proxy_runtime.sip.grammar`, and cached while the header is unchanged.

This module owns the message objects only: turning bytes into them is
:mod:`proxy_runtime.sip.parse`; building a response to a request is :mod:`proxy_runtime.sip.build`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import (
    NEVER_SPLIT,
    SIP_VERSION,
    NameAddr,
    Via,
    canonical_name,
    header_key,
    parse_cseq,
    parse_name_addr,
    parse_via,
    split_first,
    split_list,
)
from proxy_runtime.sip.uri import SipUri, parse_uri


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
                first, rest = (h[2].strip(), "") if key in NEVER_SPLIT else split_first(h[2])
                if not first:
                    if not rest:
                        del headers[i]
                        continue
                    first, rest = split_first(rest)
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
