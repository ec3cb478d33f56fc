"""The routing policy: DESIGN §2's table, serial-fork rules, best response, who may send to us.

Owns: pure decisions about one message or one set of responses, and two small matchers built from
settings (emergency numbers, the source allow-list). Must not touch: calls, transactions, timers or
the network; :mod:`~proxy_runtime.core.call` and :mod:`~proxy_runtime.core.proxy` call these.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import NameAddr, parse_name_addr
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.uri import SipUri, UriError, parse_uri


def clearip_outcome(status: int) -> ClearIpOutcome:
    return {
        302: ClearIpOutcome.REDIRECT_302,
        503: ClearIpOutcome.UNAVAILABLE_503,
        404: ClearIpOutcome.NOT_FOUND_404,
        603: ClearIpOutcome.BLOCKED_603,
        403: ClearIpOutcome.FORBIDDEN_403,
    }.get(status, ClearIpOutcome.OTHER)


def carrier_targets(response: SipResponse) -> list[SipUri]:
    """The 302's Contacts as SIP URIs, highest q first, ties in listed order (a stable sort).

    Contacts that are not sip:/sips: URIs, or have q=0, are skipped. URI headers (``?...``) and
    the ``method`` parameter are dropped, as a redirect target is used as a Request-URI.
    """
    parsed: list[tuple[float, int, SipUri]] = []
    for i, value in enumerate(response.values("contact")):
        if value == "*":
            continue
        try:
            na = parse_name_addr(value)
            uri = parse_uri(na.uri)
        except (ParseError, UriError):
            continue
        q = na.q
        if q <= 0:
            continue
        params = {k: v for k, v in uri.params.items() if k != "method"}
        parsed.append((-q, i, SipUri(uri.scheme, uri.user, uri.password, uri.host, uri.port, params, "")))
    parsed.sort(key=lambda t: (t[0], t[1]))
    return [t[2] for t in parsed]


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


def should_advance(status: int, *, advance_on_4xx: bool) -> bool:
    """Serial fork: after a final ``status`` from a carrier, try the next Contact?

    Advance on 408 and 5xx (503 included); never on 2xx or 6xx; other 4xx per the setting.
    """
    if status < 300 or status >= 600:
        return False
    if status == 408 or 500 <= status < 600:
        return True
    if 300 <= status < 400:
        return False
    return advance_on_4xx


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
