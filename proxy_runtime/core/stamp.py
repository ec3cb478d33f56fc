"""What the proxy writes on the messages it forwards, and how it knows itself: addresses and stamps.

Owns: :class:`Target` (where a message goes), the server-transaction key (RFC 3261 §17.2.3), where
responses go (§18.2.2, RFC 3581), received=/rport on the caller's Via, our own Via and
Record-Route values (double Record-Route, RFC 5658), Max-Forwards on forwarded copies (§16.6), the
next hop of a request (loose routing, §16.12), recognising our own addresses and Route entries, and
loop detection (§16.3 step 4) with the branch values that carry its hash.

Must not touch: transactions, calls, timers or the network. Everything here is a pure function of
its arguments or of :class:`Stamper`'s fixed identity (advertised address, ports, instance id).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import Via, parse_name_addr, parse_via, split_list
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.sip.uri import SipUri, UriError, parse_uri

CLEARIP = "clearip"  # the transport name of the persistent ClearIP connection


class Target(NamedTuple):
    """Where a message goes or came from. ``conn_id`` names a stream connection (0: any/new).

    A named tuple rather than a frozen dataclass: one is built for every message in and out, and a
    frozen dataclass's ``__init__`` costs several times more."""

    transport: str  # "udp" | "tcp" | "tls" | "clearip"
    host: str
    port: int
    conn_id: int = 0

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"


SendFn = Callable[[Target, bytes, object], None]


def server_key(req: SipMessage, via: Via, method: str) -> tuple[str, str, str]:
    """RFC 3261 §17.2.3: branch + sent-by + method (ACK and CANCEL look up the INVITE's).
    Without the magic cookie (RFC 2543 clients), Call-ID, From tag and CSeq number stand in."""
    branch = via.branch
    host, port = via.sent_by
    sent_by = f"{host}:{port}"
    if branch.startswith("z9hG4bK"):
        return (branch, sent_by, method)
    cseq = req.get("cseq") or ""
    return (f"2543|{req.call_id}|{req.from_tag}|{cseq.split()[0] if cseq else ''}|{branch}", sent_by, method)


def target_for(uri: SipUri) -> Target:
    """The next hop a URI names (``maddr`` first, RFC 3261 §19.1.1); no DNS: hosts stay names."""
    host = (uri.params.get("maddr") or uri.host).lower()
    # An explicit port 0 stays 0 (the adapter fails it at once); only a missing one defaults.
    return Target(uri.transport, host, uri.default_port if uri.port is None else uri.port)


def next_hop(req: SipRequest) -> Target:
    """Loose routing (RFC 3261 §16.12): the top Route if any, else the Request-URI."""
    route = req.first_value("route")
    uri = parse_uri(parse_name_addr(route).uri) if route else req.parsed_uri
    return target_for(uri)


def response_target(via: Via, source: Target) -> Target:
    """RFC 3261 §18.2.2 with RFC 3581: streams answer on the connection (``conn_id``), and once
    it has closed on a new connection to the source IP at the Via's sent-by port (the source
    port was the client's ephemeral one); UDP to the source IP, at the rport when the client
    asked for it, else at the Via's port."""
    if source.transport == CLEARIP:
        return source
    if source.transport != "udp":
        return Target(source.transport, source.host, via.sent_by[1], source.conn_id)
    rport = via.params.get("rport")
    if rport:
        if not (len(rport) <= 5 and rport.isdigit() and rport.isascii() and 0 < int(rport) < 65536):
            raise ParseError(f"bad Via rport {rport[:20]!r}")  # RFC 3581: rport [= 1*DIGIT]
        return Target("udp", source.host, int(rport))
    if "rport" in via.params:
        return Target("udp", source.host, source.port)
    return Target("udp", source.host, via.port or 5060)


def stamp_via(req: SipRequest, via: Via, source: Target) -> None:
    """Add received= (when the source IP differs from sent-by, RFC 3261 §18.2.1, and always when
    the client asked for rport, even if identical: RFC 3581 §4) and fill an empty rport."""
    if source.transport == CLEARIP:
        return
    changed = False
    rport = "rport" in via.params
    if rport and via.params["rport"] is None:
        via.params["rport"] = str(source.port)
        changed = True
    if rport or via.host != source.host:
        via.params["received"] = source.host
        changed = True
    if changed:
        # Rewrite the top Via value in place, keeping the header's position.
        for i, h in enumerate(req.headers):
            if h[0] == "via":
                rest = split_list(h[2])[1:]
                req.headers[i] = ["via", h[1], ", ".join([str(via), *rest])]
                break


def loop_hash(req: SipRequest) -> str:
    """What a spiral changes and a loop does not (RFC 3261 §16.6 step 8): the Request-URI, To and
    From tags, Call-ID, CSeq number and the fields that steer routing and admission (Route,
    Proxy-Require, Proxy-Authorization), as 8 hex digits.

    Always taken after our own Route entries are popped (§16.4), both for the branch we stamp and
    for the check of an incoming request (:meth:`Stamper.is_loop`): a request that left with Route
    ``carrier, us`` and comes back with ``us`` (a hairpinned dialog through a record-routing
    carrier) is a spiral, while one that comes back as it left is a loop."""
    cseq = req.get("cseq") or ""
    text = "|".join(
        (
            req.uri,
            req.to_tag or "",
            req.from_tag or "",
            req.call_id,
            cseq.split()[0] if cseq else "",
            ",".join(req.values("route")),
            ",".join(req.values("proxy-require")),
            ",".join(req.values("proxy-authorization")),
        )
    )
    return f"{zlib.crc32(text.encode('utf-8', 'surrogateescape')):08x}"


class Stamper:
    """The proxy's identity on the wire: the address it advertises, its ports and instance id.

    Builds our Via and Record-Route values, our branch ids (``z9hG4bK`` + instance + loop hash +
    a counter) and recognises our own URIs, Route entries and Vias (loops)."""

    __slots__ = (
        "_clearip_transport",
        "_host",
        "_seq",
        "advertise",
        "branch_prefix",
        "instance",
        "own_hosts",
        "ports",
    )

    def __init__(
        self,
        *,
        advertise: str,
        ports: dict[str, int],
        own_hosts: Iterable[str],
        instance: str,
        clearip_transport: str,
    ) -> None:
        self.advertise = advertise
        self.ports = dict(ports)
        self.own_hosts = {advertise.lower(), *(h.lower() for h in own_hosts)}
        self.instance = instance  # also our To tag on the responses we make
        self.branch_prefix = "z9hG4bK" + instance
        self._seq = itertools.count(1)
        self._host = f"[{advertise}]" if ":" in advertise else advertise
        self._clearip_transport = "TLS" if clearip_transport == "tls" else "TCP"

    # --- recognising ourselves ---------------------------------------------------------------
    def is_me(self, uri: SipUri) -> bool:
        if uri.host not in self.own_hosts:
            return False
        port = uri.port or uri.default_port
        return port in self.ports.values()

    def uri_is_me(self, req: SipRequest) -> bool:
        try:
            uri = req.parsed_uri
        except UriError:
            return False
        return self.is_me(uri)

    def route_is_me(self, value: str) -> bool:
        try:
            return self.is_me(parse_uri(parse_name_addr(value).uri))
        except (ParseError, UriError):
            return False

    def is_for_me(self, req: SipRequest) -> bool:
        """An out-of-dialog request with no Route beyond us: the proxy answers it itself (OPTIONS
        health checks from switches; ClearIP only takes INVITEs)."""
        if req.to_tag is not None:
            return False
        return all(self.route_is_me(r) for r in req.values("route"))

    def pop_own_routes(self, req: SipRequest) -> None:
        """RFC 3261 §16.4: remove the top Route values that point at us (two with double RR)."""
        while True:
            top = req.first_value("route")
            if top is None or not self.route_is_me(top):
                return
            req.pop_first_value("route")

    def is_loop(self, req: SipRequest) -> bool:
        """RFC 3261 §16.3 step 4: our own Via with the same loop hash means the request came back
        unchanged (a spiral changes the Request-URI or the Route, and so the hash). Called after
        :meth:`pop_own_routes`, as the branches are stamped (see :func:`loop_hash`)."""
        prefix = self.branch_prefix
        if not any(prefix in v for v in req.get_all("via")):
            return False
        marker = f"{prefix}{loop_hash(req)}"
        for value in req.values("via"):
            if marker in value:
                try:
                    if parse_via(value).branch.startswith(marker):
                        return True
                except ParseError:
                    continue
        return False

    # --- stamping what we forward ------------------------------------------------------------
    def new_branch(self, req: SipRequest) -> str:
        return f"{self.branch_prefix}{loop_hash(req)}x{next(self._seq):x}"

    def via_for(self, transport: str, branch: str) -> str:
        t = self._clearip_transport if transport == CLEARIP else transport.upper()
        ports = self.ports
        port = ports.get(t.lower()) or ports.get("tcp") or ports.get("udp") or 5060
        return f"SIP/2.0/{t} {self._host}:{port};branch={branch}"

    def record_route(self, transport: str, *, sips: bool = False) -> str:
        """Our Record-Route value for the leg on ``transport``; a SIPS URI when that leg's
        Request-URI is one (RFC 3261 §16.6 step 4; TLS implied, no ``transport`` parameter)."""
        port = self.ports.get(transport) or self.ports.get("udp") or 5060
        if sips:
            return f"<sips:{self._host}:{port};lr>"
        tparam = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{self._host}:{port}{tparam};lr>"

    def add_record_route(
        self,
        out: SipRequest,
        inbound: str,
        outbound: str,
        *,
        inbound_sips: bool = False,
        outbound_sips: bool = False,
    ) -> None:
        """Record-Route; double (RFC 5658) when the two legs use different transports. Each entry
        is a SIPS URI when its leg's Request-URI is (``outbound_sips``: the request we send;
        ``inbound_sips``: the caller's, received over TLS); a single entry serves both legs."""
        if inbound == outbound:
            out.add(
                "Record-Route", self.record_route(outbound, sips=inbound_sips or outbound_sips), first=True
            )
            return
        out.add(
            "Record-Route",
            self.record_route(inbound, sips=inbound_sips).replace(";lr>", ";lr;r2=on>"),
            first=True,
        )
        out.add(
            "Record-Route",
            self.record_route(outbound, sips=outbound_sips).replace(";lr>", ";lr;r2=on>"),
            first=True,
        )

    def prepare_forward(self, req: SipRequest, target: Target, branch: str) -> SipRequest:
        """Copy with Max-Forwards decremented and our Via on top (RFC 3261 §16.6)."""
        out = req.copy()
        stamp_forward(out, self.via_for(target.transport, branch))
        return out

    def next_hop_from(self, route_set: list[str], remote: SipUri) -> Target:
        """The first hop of a dialog's route set (our own entries already removed), else the
        remote target; a Route we cannot parse falls back to the remote target."""
        if route_set:
            try:
                return target_for(parse_uri(parse_name_addr(route_set[0]).uri))
            except (ParseError, UriError):
                pass
        return target_for(remote)


def stamp_forward(out: SipRequest, via: str) -> None:
    """Decrement Max-Forwards (70 when absent) and put ``via`` on top, in place (§16.6 steps 3, 8)."""
    mf = out.get("max-forwards")
    out.set("Max-Forwards", str(int(mf) - 1) if mf is not None else "70")
    out.add("Via", via, first=True)


def strip_own_via(resp: SipResponse) -> SipResponse:
    """A response to pass upstream: a copy without our Via (the top one, RFC 3261 §16.7 step 3)."""
    out = resp.copy()
    out.pop_first_value("via")
    return out
