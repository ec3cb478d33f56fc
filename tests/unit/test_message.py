"""message.py's API: header access and editing, structured values, limits, responses."""

from __future__ import annotations

import pytest

from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.grammar import (
    COMPACT_FORMS,
    MAX_HEADERS,
    canonical_name,
    header_key,
    parse_cseq,
    parse_name_addr,
    parse_via,
    split_list,
)
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message, split_head, try_parse_for_reply

IDENTITY = (
    "eyJhbGciOiJFUzI1NiIsInBwdCI6InNoYWtlbiIsInR5cCI6InBhc3Nwb3J0In0.eyJhdHRlc3QiOiJBIn0."
    "c2lnbmF0dXJlLCB3aXRoLCBjb21tYXM;info=<https://cert.example.org/a,b.pem>;alg=ES256;ppt=shaken"
)


def build(*headers: str, body: bytes = b"", start: str = "INVITE sip:bob@example.com SIP/2.0") -> bytes:
    base = [
        "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1",
        "From: <sip:alice@example.com>;tag=a",
        "To: <sip:bob@example.com>",
        "Call-ID: c1@192.0.2.1",
        "CSeq: 1 INVITE",
        "Max-Forwards: 70",
    ]
    lines = [start, *base, *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def request(*headers: str, body: bytes = b"") -> SipRequest:
    msg = parse_message(build(*headers, body=body))
    assert isinstance(msg, SipRequest)
    return msg


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("compact", "full"), sorted(COMPACT_FORMS.items()))
def test_every_compact_form_expands(compact: str, full: str) -> None:
    assert header_key(compact) == full
    assert header_key(compact.upper()) == full
    if full in ("via", "from", "to", "call-id", "content-length"):
        return  # exercised by the torture messages (v:, f:, t:, i:, l:)
    msg = request(f"{compact.upper()}: value-of-{full}")
    assert msg.get(full) == f"value-of-{full}"
    assert msg.get(compact) == f"value-of-{full}"


def test_identity_compact_form_y() -> None:
    msg = request(f"y: {IDENTITY}")
    assert msg.get("Identity") == IDENTITY
    assert msg.values("identity") == [IDENTITY]
    assert msg.serialize().count(b"\r\ny: ") == 1


def test_names_are_case_insensitive_and_kept_as_written() -> None:
    msg = request("x-CuStOm: 1", "P-Asserted-Identity: <sip:+1@x>")
    assert msg.get("X-CUSTOM") == msg.get("x-custom") == "1"
    assert b"\r\nx-CuStOm: 1\r\n" in msg.serialize()
    assert msg.has("p-asserted-identity")


def test_canonical_names() -> None:
    assert canonical_name("call-id") == "Call-ID"
    assert canonical_name("cseq") == "CSeq"
    assert canonical_name("www-authenticate") == "WWW-Authenticate"
    assert canonical_name("p-asserted-identity") == "P-Asserted-Identity"
    assert canonical_name("identity") == "Identity"


# --- values --------------------------------------------------------------------------------------


def test_multi_values_across_lines_and_commas() -> None:
    msg = request(
        "Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>",
        "Route: <sip:p3.example.com;lr>",
        'Contact: "Doe, John" <sip:j@a.example.com>;q=0.5, <sip:j@b.example.com,x>;q=1',
    )
    assert msg.values("route") == [
        "<sip:p1.example.com;lr>",
        "<sip:p2.example.com;lr>",
        "<sip:p3.example.com;lr>",
    ]
    contacts = msg.values("contact")
    assert contacts == ['"Doe, John" <sip:j@a.example.com>;q=0.5', "<sip:j@b.example.com,x>;q=1"]
    assert [parse_name_addr(c).q for c in contacts] == [0.5, 1.0]
    vias = request("Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK2, SIP/2.0/TCP 192.0.2.3;branch=z9hG4bK3")
    assert len(vias.values("via")) == 3


def test_identity_is_never_split() -> None:
    msg = request(f"Identity: {IDENTITY}", f"Identity: {IDENTITY}")
    assert msg.get_all("identity") == [IDENTITY, IDENTITY]
    assert msg.get("identity") == IDENTITY
    # Relayed byte for byte.
    assert f"\r\nIdentity: {IDENTITY}\r\n".encode() in msg.serialize()


def test_identity_with_a_stray_comma_is_still_one_value() -> None:
    odd = "abc,def.ghi;info=<https://x/c.pem>;alg=ES256"
    msg = request(f"Identity: {odd}", "Date: Sat, 13 Nov 2010 23:29:00 GMT", "X-Ext: a, b")
    assert msg.values("identity") == [odd]
    assert msg.first_value("identity") == odd
    assert msg.values("date") == ["Sat, 13 Nov 2010 23:29:00 GMT"]
    assert msg.values("x-ext") == ["a", "b"]  # extensions: lists unless known otherwise
    assert msg.pop_first_value("identity") == odd
    assert not msg.has("identity")


def test_split_list_quotes_escapes_and_brackets() -> None:
    assert split_list('"a,\\"b" <sip:x>, <sip:y;p=1,2>') == ['"a,\\"b" <sip:x>', "<sip:y;p=1,2>"]
    assert split_list(" a , , b ,") == ["a", "b"]
    assert split_list("") == []
    assert split_list('"unterminated, quote') == ['"unterminated, quote']


def test_get_get_all_has() -> None:
    msg = request("Supported: timer", "Supported: 100rel")
    assert msg.get("supported") == "timer"
    assert msg.get_all("supported") == ["timer", "100rel"]
    assert msg.get("absent") is None
    assert msg.get_all("absent") == []
    assert not msg.has("absent")


def test_set_replaces_all_at_the_first_place() -> None:
    msg = request("Supported: timer", "X-A: 1", "Supported: 100rel")
    msg.set("supported", "path")
    names = [h[0] for h in msg.headers]
    assert msg.get_all("supported") == ["path"]
    assert names.index("supported") < names.index("x-a")
    msg.set("X-New", "v")
    assert msg.headers[-1][1:] == ["X-New", "v"]


def test_add_first_and_last() -> None:
    msg = request("Record-Route: <sip:a;lr>")
    msg.add("Record-Route", "<sip:b;lr>", first=True)
    msg.add("record-route", "<sip:c;lr>")
    assert msg.get_all("record-route") == ["<sip:b;lr>", "<sip:a;lr>", "<sip:c;lr>"]
    msg.add("Via", "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp", first=True)
    assert msg.top_via.host == "proxy.example.com"
    msg.add("identity", IDENTITY)
    line = next(h for h in msg.headers if h[0] == "identity")
    assert line[1] == "Identity"
    # New headers go before Content-Length.
    assert msg.serialize().index(b"Identity:") < msg.serialize().index(b"Content-Length:")


def test_remove() -> None:
    msg = request("Identity: a", "y: b")
    assert msg.remove("IDENTITY") == 2
    assert not msg.has("identity")
    assert msg.remove("identity") == 0


def test_pop_first_value_keeps_the_rest_as_written() -> None:
    msg = request("Route: <sip:p1;lr>,<sip:p2;lr> ,  <sip:p3;lr>", "Route: <sip:p4;lr>")
    assert msg.pop_first_value("route") == "<sip:p1;lr>"
    assert msg.get_all("route") == ["<sip:p2;lr> ,  <sip:p3;lr>", "<sip:p4;lr>"]
    assert msg.pop_first_value("route") == "<sip:p2;lr>"
    assert msg.pop_first_value("route") == "<sip:p3;lr>"
    assert msg.pop_first_value("route") == "<sip:p4;lr>"
    assert msg.pop_first_value("route") is None
    assert not msg.has("route")


def test_pop_first_value_quoted_comma() -> None:
    msg = request('Contact: "a, b" <sip:x@y>, <sip:z@w>')
    assert msg.pop_first_value("contact") == '"a, b" <sip:x@y>'
    assert msg.get("contact") == "<sip:z@w>"


def test_first_value() -> None:
    msg = request("Via: SIP/2.0/UDP h2;branch=z9hG4bK2, SIP/2.0/UDP h3;branch=z9hG4bK3")
    assert msg.first_value("via") == "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1"
    assert msg.first_value("absent") is None


# --- Via -----------------------------------------------------------------------------------------


def test_parse_via_forms() -> None:
    v = parse_via("SIP/2.0/UDP [2001:db8::1]:5070;rport;branch=z9hG4bKx;received=192.0.2.9")
    assert (v.transport, v.host, v.port) == ("UDP", "2001:db8::1", 5070)
    assert v.params == {"rport": None, "branch": "z9hG4bKx", "received": "192.0.2.9"}
    assert v.sent_by == ("2001:db8::1", 5070)
    assert str(v) == "SIP/2.0/UDP [2001:db8::1]:5070;rport;branch=z9hG4bKx;received=192.0.2.9"
    lws = parse_via("SIP / 2.0 / tcp  Host.Example.COM : 5080 ; branch = z9hG4bKy ; rport")
    assert (lws.transport, lws.host, lws.port, lws.branch) == ("TCP", "host.example.com", 5080, "z9hG4bKy")
    assert lws.params["rport"] is None
    assert parse_via("SIP/2.0/TLS h").sent_by == ("h", 5061)
    assert parse_via("SIP/2.0/UDP [::1]").sent_by == ("::1", 5060)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
        "HTTP/1.1/TCP h",
        "SIP/2.0/UDP h:99999",
        "SIP/2.0/UDP h:x",
        "SIP/2.0/UDP h:\u00b2",
        "SIP/2.0/UDP [::1",
        "SIP/2.0/UDP [::1]x",
        "SIP/2.0/UDP h\u00e9st",
        "SIP/2.0/U<DP h",
    ],
)
def test_parse_via_rejects(bad: str) -> None:
    with pytest.raises(ParseError):
        parse_via(bad)


def test_parse_via_strict_rejects_empty_params() -> None:
    assert parse_via("SIP/2.0/UDP h;;branch=z9hG4bK1").branch == "z9hG4bK1"
    for bad in ("SIP/2.0/UDP h;;branch=z9hG4bK1", "SIP/2.0/UDP h;branch=", "SIP/2.0/UDP h:"):
        with pytest.raises(ParseError):
            parse_via(bad, strict=True)


# --- name-addr -----------------------------------------------------------------------------------


def test_parse_name_addr_forms() -> None:
    na = parse_name_addr('"Alice \\"A\\" <x>" <sip:alice@example.com;transport=tcp>;tag=9;q=0.7')
    assert na.display == '"Alice \\"A\\" <x>"'
    assert na.uri == "sip:alice@example.com;transport=tcp"
    assert na.params == {"tag": "9", "q": "0.7"}
    assert (na.tag, na.q, na.bracketed) == ("9", 0.7, True)
    unquoted = parse_name_addr("Bob Smith <sip:bob@example.com>")
    assert (unquoted.display, unquoted.uri) == ("Bob Smith", "sip:bob@example.com")
    spec = parse_name_addr("sip:carol@example.com;tag=x;q=0.1")
    assert (spec.display, spec.uri, spec.params, spec.bracketed) == (
        None,
        "sip:carol@example.com",
        {"tag": "x", "q": "0.1"},
        False,
    )
    assert str(spec) == "sip:carol@example.com;tag=x;q=0.1"
    assert str(na) == '"Alice \\"A\\" <x>" <sip:alice@example.com;transport=tcp>;tag=9;q=0.7'
    assert parse_name_addr("<sip:x@y>;q=bad").q == 1.0


@pytest.mark.parametrize(
    "bad",
    ['"unterminated <sip:x@y>', "<sip:x@y", "<>", "", "sip:a b@c"],
)
def test_parse_name_addr_rejects(bad: str) -> None:
    with pytest.raises(ParseError):
        parse_name_addr(bad)


@pytest.mark.parametrize(
    "bad",
    ["Doe, John <sip:x@y>", "< sip:x@y >", "sip:x@y?Route=a", "<sip:x@y>;;tag=1", "<sip:x@y> junk"],
)
def test_parse_name_addr_strict_rejects(bad: str) -> None:
    parse_name_addr(bad)  # lenient mode reads it
    with pytest.raises(ParseError):
        parse_name_addr(bad, strict=True)


def test_cseq() -> None:
    assert parse_cseq("0009 INVITE") == (9, "INVITE")
    assert parse_cseq("1\tBYE") == (1, "BYE")
    for bad in ("", "1", "x INVITE", "4294967296 INVITE", "1 INVITE extra", "\u00b2 INVITE", "1 IN<VITE"):
        with pytest.raises(ParseError):
            parse_cseq(bad)


# --- parsing rules -------------------------------------------------------------------------------


def test_content_length_is_always_rewritten() -> None:
    msg = request(body=b"v=0\r\n")
    msg.body = b"longer body"
    wire = msg.serialize()
    assert wire.endswith(b"Content-Length: 11\r\n\r\nlonger body")
    msg.remove("content-length")
    assert msg.serialize().endswith(b"\r\nContent-Length: 11\r\n\r\nlonger body")
    dup = SipRequest("OPTIONS", "sip:x", [["content-length", "l", "5"], ["content-length", "l", "5"]])
    assert dup.serialize().count(b"l: 0") == 1


def test_body_from_content_length_and_datagram_rest() -> None:
    data = build(body=b"hello")
    assert parse_message(data + b"trailing junk").body == b"hello"
    no_cl = data.replace(b"Content-Length: 5\r\n", b"")
    assert parse_message(no_cl).body == b"hello"
    with pytest.raises(ParseError):
        parse_message(no_cl, datagram=False)
    with pytest.raises(ParseError):
        parse_message(data.replace(b"Content-Length: 5", b"Content-Length: 6"))


def test_bare_lf_message_is_accepted_and_normalised() -> None:
    data = build(body=b"x").replace(b"\r\n", b"\n")
    msg = parse_message(data)
    assert msg.body == b"x"
    assert msg.serialize() == build(body=b"x")


def test_bare_cr_in_a_header_is_rejected() -> None:
    with pytest.raises(ParseError):
        parse_message(build("X-A: a\rInjected: b"))


def test_leading_crlf_is_ignored() -> None:
    assert parse_message(b"\r\n\r\n" + build()).call_id == "c1@192.0.2.1"


def test_size_cap() -> None:
    data = build("X-Pad: " + "a" * 2000)
    assert parse_message(data, max_size=len(data)).get("x-pad")
    with pytest.raises(ParseError) as err:
        parse_message(data, max_size=len(data) - 1)
    assert err.value.status_hint == 513


def test_header_cap() -> None:
    ok = build(*[f"X-H{i}: {i}" for i in range(MAX_HEADERS - 7)])
    assert len(parse_message(ok).headers) == MAX_HEADERS
    with pytest.raises(ParseError):
        parse_message(build(*[f"X-H{i}: {i}" for i in range(MAX_HEADERS)]))
    with pytest.raises(ParseError):
        parse_message(build("Via: " + ", ".join(f"SIP/2.0/UDP h{i}" for i in range(MAX_HEADERS + 1))))


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (("INVITE sip:bob@example.com SIP/2.0", "INVITE sip:bob@example.com SIP/3.0"), 505),
        (("INVITE sip:bob@example.com SIP/2.0", "INVITE tel:+15551234 SIP/2.0"), 416),
        (("INVITE sip:bob@example.com SIP/2.0", "INVITE sip:bob@example.com?X=1 SIP/2.0"), 400),
        (("INVITE sip:bob@example.com SIP/2.0", "INVITE sip:bob@ex ample.com SIP/2.0"), 400),
        (("INVITE sip:bob@example.com SIP/2.0", "INV<ITE sip:bob@example.com SIP/2.0"), 400),
        (("CSeq: 1 INVITE", "CSeq: 1 BYE"), 400),
        (("Max-Forwards: 70", "Max-Forwards: 256"), 400),
        (("Max-Forwards: 70", "Max-Forwards: -1"), 400),
        (("Call-ID: c1@192.0.2.1", "Call-ID: "), 400),
        (("Call-ID: c1@192.0.2.1", "X-Call-ID: c1"), 400),
        (("Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1", "Via: garbage"), 400),
        (("To: <sip:bob@example.com>", "To: <sip:bob@example.com>\r\nTo: <sip:eve@example.com>"), 400),
        (("To: <sip:bob@example.com>", "To: <sip:bob@example.com>\r\n ;tag=x"), None),
        (("To: <sip:bob@example.com>", "To: <sip:bob@example.com>\r\nBad Name: x"), 400),
        (("To: <sip:bob@example.com>", "To: <sip:bob@example.com>\r\nNoColon"), 400),
    ],
)
def test_request_validation(change: tuple[str, str], status: int | None) -> None:
    data = build().replace(change[0].encode(), change[1].encode())
    if status is None:
        parse_message(data)
        return
    with pytest.raises(ParseError) as err:
        parse_message(data)
    assert err.value.status_hint == status


def test_responses() -> None:
    data = b"SIP/2.0 180 Ringing\r\n" + build().split(b"\r\n", 1)[1]
    msg = parse_message(data)
    assert isinstance(msg, SipResponse)
    assert (msg.status, msg.reason) == (180, "Ringing")
    assert msg.serialize() == data
    for bad in (b"SIP/2.0 99 Low", b"SIP/2.0 700 High", b"SIP/2.0 2x0 X", b"SIP/3.0 200 OK"):
        with pytest.raises(ParseError):
            parse_message(bad + b"\r\n" + build().split(b"\r\n", 1)[1])


def test_split_head() -> None:
    assert split_head(b"A\r\nB: c\r\n\r\nbody") == (b"A\r\nB: c", b"body")
    assert split_head(b"A\nB: c\n\nbody") == (b"A\nB: c", b"body")
    with pytest.raises(ParseError):
        split_head(b"A\r\nB: c\r\n")


def test_folded_lines_are_joined_with_one_space() -> None:
    msg = request("Subject: first\r\n  second\r\n\tthird")
    assert msg.get("subject") == "first second third"


def test_common_properties() -> None:
    msg = request()
    assert msg.call_id == "c1@192.0.2.1"
    assert msg.cseq == (1, "INVITE")
    assert msg.from_tag == "a"
    assert msg.to_tag is None
    assert msg.top_via.branch == "z9hG4bK1"
    assert repr(msg).startswith("<SipRequest INVITE")
    copy = msg.copy()
    copy.set("call-id", "other")
    assert msg.call_id == "c1@192.0.2.1"
    assert bytes(msg) == msg.serialize()
    assert next(iter(msg.iter_headers())) == ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1")


# --- responses -----------------------------------------------------------------------------------


def test_make_response() -> None:
    msg = request("Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK2", "Record-Route: <sip:rr;lr>")
    resp = make_response(msg, 486, to_tag="t1", extra=[("Retry-After", "30")])
    assert (resp.status, resp.reason) == (486, "Unknown")
    assert resp.get_all("via") == msg.get_all("via")
    assert resp.to_tag == "t1"
    assert resp.get("retry-after") == "30"
    assert not resp.has("record-route")
    assert make_response(msg, 100, to_tag="t1").to_tag is None
    assert make_response(msg, 503).reason == "Service Unavailable"
    tagged = request().copy()
    tagged.set("to", "<sip:bob@example.com>;tag=keep")
    assert make_response(tagged, 200, to_tag="new").to_tag == "keep"
    again = parse_message(resp.serialize())
    assert isinstance(again, SipResponse) and again.status == 486


# --- answering what cannot be parsed -------------------------------------------------------------


def test_try_parse_for_reply() -> None:
    data = build("X: y").replace(b"CSeq: 1 INVITE", b"CSeq: 1 BYE")
    with pytest.raises(ParseError):
        parse_message(data)
    req = try_parse_for_reply(data)
    assert req is not None
    assert [h[0] for h in req.headers] == ["via", "from", "to", "call-id", "cseq"]
    assert try_parse_for_reply(data.replace(b"INVITE sip", b"ACK sip")) is None
    assert try_parse_for_reply(b"SIP/2.0 200 OK\r\n" + data.split(b"\r\n", 1)[1]) is None
    assert try_parse_for_reply(data.replace(b"Via: SIP/2.0/UDP 192.0.2.1:5060", b"Via: junk")) is None
    assert try_parse_for_reply(b"") is None
    assert try_parse_for_reply(b"\xff\xfe\x00") is None
    folded = build().replace(b"Via: SIP/2.0/UDP", b"Via:\r\n SIP/2.0/UDP")
    folded_req = try_parse_for_reply(folded)
    assert folded_req is not None and folded_req.top_via.host == "192.0.2.1"
    # Only the head is needed: a truncated message is still answerable.
    truncated = try_parse_for_reply(build()[:-30])
    assert truncated is not None
