"""The routing policy: DESIGN §2's table, serial-fork rules, best response, who may send to us.

Owns: pure decisions about one message or one set of responses, and two small matchers built from
settings (emergency numbers, the source allow-list). Must not touch: calls, transactions, timers or
the network; :mod:`~proxy_runtime.core.call` and :mod:`~proxy_runtime.core.proxy` call these.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import NameAddr, header_key, is_token, parse_name_addr
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.uri import SipUri, UriError, parse_uri, parse_uri_headers

REACHABLE_TRANSPORTS = frozenset({"udp", "tcp", "tls"})

NEVER_FROM_URI = frozenset(
    {
        # RFC 3261 §19.1.5 "obviously dangerous" ones, and Route (never an unwitting agent).
        "from",
        "call-id",
        "cseq",
        "via",
        "record-route",
        "route",
        # The dialog and the hop: the proxy and the caller own these.
        "to",
        "contact",
        "max-forwards",
        "proxy-require",
        "require",
        "path",
        "service-route",
        # §19.1.5: would falsely advertise the caller's capabilities or location.
        "accept",
        "accept-encoding",
        "accept-language",
        "allow",
        "organization",
        "supported",
        "user-agent",
        # Framing and the body: the INVITE keeps the caller's body (the special hname "body" too).
        "content-length",
        "content-type",
        "content-encoding",
        "content-disposition",
        "content-language",
        "mime-version",
        "body",
        # Credentials never come from a redirect.
        "authorization",
        "proxy-authorization",
    }
)
"""Header names (lookup keys) a redirect Contact's URI may carry but the proxy never applies:
they are ignored and counted (``RedirectHeadersIgnored``)."""


def clearip_outcome(status: int) -> ClearIpOutcome:
    return _OUTCOMES.get(status, ClearIpOutcome.OTHER)


_OUTCOMES = {
    300: ClearIpOutcome.REDIRECT_300,
    301: ClearIpOutcome.REDIRECT_301,
    302: ClearIpOutcome.REDIRECT_302,
    503: ClearIpOutcome.UNAVAILABLE_503,
    404: ClearIpOutcome.NOT_FOUND_404,
    603: ClearIpOutcome.BLOCKED_603,
    607: ClearIpOutcome.UNWANTED_607,
    608: ClearIpOutcome.REJECTED_608,
    403: ClearIpOutcome.FORBIDDEN_403,
}


@dataclass(frozen=True, slots=True)
class RedirectTarget:
    """One usable Contact of a redirect: the URI to send to (no ``?headers``, no ``method``), the
    headers its URI carried for that branch's INVITE (unescaped, in order), and the names of those
    it carried that the proxy refused (:data:`NEVER_FROM_URI`, a value with CR/LF/NUL, or an empty
    value)."""

    uri: SipUri
    headers: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Redirect:
    """A redirect's Contacts: the usable ones, highest q first (ties in listed order), and why each
    other one was dropped (fixed phrases: they end up in a ``Reason`` header)."""

    targets: tuple[RedirectTarget, ...]
    dropped: tuple[str, ...]

    @property
    def why_unusable(self) -> str:
        """Why no Contact was usable, for the caller's ``Reason`` (distinct causes, in order)."""
        causes = list(dict.fromkeys(self.dropped)) or ["no Contact"]
        return ", ".join(causes)


def redirect_targets(response: SipResponse) -> Redirect:
    """The redirect's Contacts (RFC 3261 §8.1.3.4) as carrier targets, highest q first, ties in
    listed order (a stable sort).

    Dropped, with the cause: ``*``, what does not parse (a port over 65535 included), schemes other
    than sip:/sips: (tel:, http:...), port 0, transports the proxy cannot send on (``ws``, ``sctp``),
    a malformed ``?headers`` part (the branch would leave without its Identity), and q=0. Each
    target's URI keeps its parameters but loses its headers part and ``method`` (RFC 3261 §19.1.5:
    it becomes a Request-URI); the headers become that branch's header fields."""
    parsed: list[tuple[float, int, RedirectTarget]] = []
    dropped: list[str] = []
    for i, value in enumerate(response.values("contact")):
        if value == "*":
            dropped.append("Contact *")
            continue
        try:
            na = parse_name_addr(value)
        except ParseError:
            dropped.append("unparsable Contact")
            continue
        try:
            uri = parse_uri(na.uri)
        except UriError as exc:
            bad_scheme = exc.status_hint == 416
            dropped.append("Contact scheme not sip or sips" if bad_scheme else "unparsable Contact")
            continue
        if uri.port == 0:
            dropped.append("Contact port 0")
            continue
        if uri.transport not in REACHABLE_TRANSPORTS:
            dropped.append("Contact transport not udp, tcp or tls")
            continue
        try:
            pairs = parse_uri_headers(uri.headers)
        except UriError:
            dropped.append("malformed headers in Contact URI")
            continue
        if na.q <= 0:
            dropped.append("Contact q=0")
            continue
        headers: list[tuple[str, str]] = []
        ignored: list[str] = []
        for name, hvalue in pairs:
            value = hvalue.strip()
            if (
                header_key(name) in NEVER_FROM_URI
                or not is_token(name)
                or _UNSAFE_VALUE.search(hvalue)
                # An empty value (``?Identity=``) would replace the 302's or the caller's header
                # of that name with an empty one (invalid for Identity, RFC 8224 §4): the call
                # would leave unsigned. Ignored and counted, like a refused name.
                or not value
            ):
                ignored.append(name)
            else:
                headers.append((name, value))
        params = {k: v for k, v in uri.params.items() if k != "method"}
        target = SipUri(uri.scheme, uri.user, uri.password, uri.host, uri.port, params, "")
        parsed.append((-na.q, i, RedirectTarget(target, tuple(headers), tuple(ignored))))
    parsed.sort(key=lambda t: (t[0], t[1]))
    return Redirect(tuple(t[2] for t in parsed), tuple(dropped))


# A header value is one line of text: an escaped CR, LF or NUL would smuggle in a header of its own.
_UNSAFE_VALUE = re.compile(r"[\x00\r\n]")


def copy_headers(source: SipResponse, target: SipRequest, names: Iterable[str]) -> None:
    """Copy each named header (every line of it) from the 302 into the INVITE, replacing the
    INVITE's own. A header the 302 lacks leaves the INVITE's own untouched."""
    for name in names:
        lines = source.get_all(name)
        if not lines:
            continue
        target.remove(name)
        for value in lines:
            target.add(name, value)


def apply_uri_headers(target: SipRequest, headers: Iterable[tuple[str, str]]) -> None:
    """Put a Contact's URI headers into its branch's INVITE: each name present replaces every line
    of that name the INVITE had (the caller's own, or the 302's copied ones: the Contact's win for
    its branch); several of one name (``?Identity=a&Identity=b``) keep their order."""
    replaced: set[str] = set()
    for name, value in headers:
        key = header_key(name)
        if key not in replaced:
            replaced.add(key)
            target.remove(key)
        target.add(name, value)


def should_advance(status: int, *, advance_on_4xx: bool) -> bool:
    """Serial fork: after a final ``status`` from a carrier, try the next Contact?

    Advance on 3xx, 408 and 5xx (503 included); never on 2xx or 6xx; other 4xx per the setting.
    A carrier's 3xx is a failed branch (DESIGN §2: "on failure it advances to the next"): the
    proxy never recurses on a carrier's Contacts (a branch there would be a route ClearIP did not
    choose) and never relays the 3xx (the switch could call the carrier directly, unsigned).
    """
    if status < 300 or status >= 600:
        return False
    if status < 400 or status == 408 or 500 <= status < 600:
        return True
    return advance_on_4xx


def drop_server_retry_after(resp: SipResponse) -> SipResponse:
    """A 503 the proxy relays from ClearIP or a carrier, without its ``Retry-After`` (in place).

    On a 503, ``Retry-After`` says the *server* is unavailable (RFC 3261 §21.5.4); the switch
    would read it as saying so of its next hop, the proxy, and stop sending it every call for that
    long, where only ClearIP or one carrier said so, for this call's route (RFC 3261 §16.7 step 6:
    a proxy must not forward a 503 unless all it would proxy would get one). The 503 itself is
    kept so the switch route-advances; its other headers (``Reason``...) are untouched. On other
    statuses (404, 480, 486, 500, 600, 603) ``Retry-After`` is about this request or callee and is
    relayed. The proxy's own 503s (overload, drain) carry their own ``Retry-After``."""
    if resp.status == 503:
        resp.remove("retry-after")
    return resp


def best_response(responses: Sequence[SipResponse]) -> SipResponse | None:
    """RFC 3261 §16.7 step 6: a 6xx if any, else the lowest class, preferring in 4xx the more
    informative codes (401/407/415/420/484) and otherwise the first received of that class."""
    if not responses:
        return None
    six = [r for r in responses if r.status >= 600]
    if six:
        return six[0]
    lowest = min(r.status // 100 for r in responses)
    candidates = [r for r in responses if r.status // 100 == lowest]
    for preferred in (401, 407, 415, 420, 484):
        for r in candidates:
            if r.status == preferred:
                return r
    return candidates[0]


class EmergencyMatcher:
    """Emergency numbers matched on the Request-URI user part, with or without +1 / 1."""

    __slots__ = ("_numbers",)

    def __init__(self, numbers: Iterable[str]) -> None:
        self._numbers = frozenset(self._normalise(n) for n in numbers)

    @staticmethod
    def _normalise(number: str) -> str:
        digits = "".join(c for c in number if c.isdigit() or c == "+")
        if digits.startswith("+1"):
            digits = digits[2:]
        elif digits.startswith("+"):
            digits = digits[1:]
        return digits

    def matches(self, user: str | None) -> bool:
        if not user:
            return False
        number = user.split(";", 1)[0]  # drop telephone-subscriber params (;phone-context=...)
        if any(c not in "+0123456789-.() " for c in number):
            return False
        n = self._normalise(number)
        if n in self._numbers:
            return True
        # "1911" dialled with the trunk prefix but without '+'.
        return len(n) > 1 and n.startswith("1") and n[1:] in self._numbers


def dialled_number(request: SipRequest) -> str | None:
    try:
        return request.parsed_uri.user_unescaped
    except UriError:
        return None


def parse_contact(value: str) -> NameAddr:
    return parse_name_addr(value)


class AllowList:
    """Trusted sources (DESIGN §3): an address inside one of the allowed networks. IPv4-mapped IPv6
    addresses count as their IPv4 address. Verdicts are cached per host (bounded: cleared past
    10,000 hosts), as every message in asks."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        ok = self._cache.get(host)
        if ok is None:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                ok = False
            else:
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                ok = any(ip in net for net in self._networks)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[host] = ok
        return ok
