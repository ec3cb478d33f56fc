"""RFC 4475 torture messages: every one parsed as the RFC says, or rejected with the right status.

Each .dat file in tests/data/rfc4475/ is the RFC's own message, byte for byte. The expectations table
below is the conformance statement (also in docs/PARSER.md); a test fails if a file is added
without an entry, and the whole module fails (never skips) when a file is missing.
"""

from __future__ import annotations

import pytest

from proxy_runtime.sip.build import make_response
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.framing import StreamFramer
from proxy_runtime.sip.grammar import header_key, parse_name_addr, parse_via
from proxy_runtime.sip.message import SipMessage, SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message, try_parse_for_reply
from proxy_runtime.sip.uri import parse_uri
from tests.data import rfc4475_files, rfc4475_message

# name -> (RFC section, expected outcome): "ok" parses; an int is the ParseError status_hint;
# "drop" is an invalid response (never answered).
EXPECTED: dict[str, tuple[str, int | str]] = {
    # 3.1.1 valid messages
    "wsinv": ("3.1.1.1", "ok"),
    "intmeth": ("3.1.1.2", "ok"),
    "esc01": ("3.1.1.3", "ok"),
    "escnull": ("3.1.1.4", "ok"),
    "esc02": ("3.1.1.5", "ok"),
    "lwsdisp": ("3.1.1.6", "ok"),
    "longreq": ("3.1.1.7", "ok"),
    "dblreq": ("3.1.1.8", "ok"),
    "semiuri": ("3.1.1.9", "ok"),
    "transports": ("3.1.1.10", "ok"),
    "mpart01": ("3.1.1.11", "ok"),
    "unreason": ("3.1.1.12", "ok"),
    "noreason": ("3.1.1.13", "ok"),
    # 3.1.2 invalid messages
    "badinv01": ("3.1.2.1", 400),
    "clerr": ("3.1.2.2", 400),
    "ncl": ("3.1.2.3", 400),
    "scalar02": ("3.1.2.4", 400),
    "scalarlg": ("3.1.2.5", "drop"),
    "quotbal": ("3.1.2.6", 400),
    "ltgtruri": ("3.1.2.7", 400),
    "lwsruri": ("3.1.2.8", 400),
    "lwsstart": ("3.1.2.9", "ok"),  # RFC allows ignoring the extra SP; we re-write the line
    "trws": ("3.1.2.10", "ok"),  # idem
    "escruri": ("3.1.2.11", 400),
    "baddate": ("3.1.2.12", "ok"),  # RFC allows accepting; the proxy never reads Date
    "regbadct": ("3.1.2.13", 400),
    "badaspec": ("3.1.2.14", 400),
    "baddn": ("3.1.2.15", 400),
    "badvers": ("3.1.2.16", 505),
    "mismatch01": ("3.1.2.17", 400),
    "mismatch02": ("3.1.2.18", 400),
    "bigcode": ("3.1.2.19", "drop"),
    # 3.2 transaction layer
    "badbranch": ("3.2.1", "ok"),
    # 3.3 application layer
    "insuf": ("3.3.1", 400),
    "unkscm": ("3.3.2", 416),
    "novelsc": ("3.3.3", 416),
    "unksm2": ("3.3.4", "ok"),
    "bext01": ("3.3.5", "ok"),
    "invut": ("3.3.6", "ok"),
    "regaut01": ("3.3.7", "ok"),
    "multi01": ("3.3.8", 400),
    "mcl01": ("3.3.9", 400),
    "bcast": ("3.3.10", "ok"),
    "zeromf": ("3.3.11", "ok"),
    "cparam01": ("3.3.12", "ok"),
    "cparam02": ("3.3.13", "ok"),
    "regescrt": ("3.3.14", "ok"),
    "sdp01": ("3.3.15", "ok"),
    # 3.4 backward compatibility
    "inv2543": ("3.4.1", "ok"),
    # Not an RFC message: from the RFC's archive. No Via, a header line without a colon.
    "test": ("archive", 400),
}

# Messages already canonical (CRLF, "Name: value", exact Content-Length): relayed byte for byte.
CANONICAL = {
    "badbranch",
    "baddate",
    "bcast",
    "bext01",
    "cparam01",
    "cparam02",
    "esc02",
    "invut",
    "lwsdisp",
    "mpart01",
    "noreason",
    "sdp01",
    "unksm2",
    "unreason",
    "zeromf",
}

# Invalid requests that cannot be answered: no Via at all.
UNANSWERABLE = {"test"}

# Raises (the module fails at collection) when any file is missing: never an empty, passing list.
ALL = [p.stem for p in rfc4475_files()]
VALID = [n for n in ALL if EXPECTED[n][1] == "ok"]
INVALID = [n for n in ALL if EXPECTED[n][1] != "ok"]


def load(name: str) -> bytes:
    return rfc4475_message(name)


def parse_ok(name: str) -> SipMessage:
    return parse_message(load(name))


def req(name: str) -> SipRequest:
    msg = parse_ok(name)
    assert isinstance(msg, SipRequest)
    return msg


def test_every_file_has_an_expectation() -> None:
    assert len(ALL) == 50
    assert set(ALL) == set(EXPECTED)


# --- the outcome of each message ----------------------------------------------------------------


@pytest.mark.parametrize("name", VALID)
def test_valid_messages_parse(name: str) -> None:
    msg = parse_ok(name)
    for h in ("via", "from", "to", "call-id", "cseq"):
        assert msg.has(h)
    assert msg.top_via.host
    if isinstance(msg, SipRequest):
        assert msg.cseq[1] == msg.method


@pytest.mark.parametrize("name", INVALID)
def test_invalid_messages_are_rejected_with_the_status(name: str) -> None:
    expected = EXPECTED[name][1]
    with pytest.raises(ParseError) as err:
        parse_message(load(name))
    if expected == "drop":
        assert load(name).startswith(b"SIP/2.0 ")
    else:
        assert err.value.status_hint == expected


@pytest.mark.parametrize("name", INVALID)
def test_invalid_requests_can_be_answered_when_they_have_a_via(name: str) -> None:
    data = load(name)
    answerable = try_parse_for_reply(data)
    if EXPECTED[name][1] == "drop" or name in UNANSWERABLE:
        assert answerable is None
        return
    assert answerable is not None
    assert answerable.top_via.host
    status = EXPECTED[name][1]
    assert isinstance(status, int)
    resp = make_response(answerable, status)
    wire = resp.serialize()
    assert wire.startswith(f"SIP/2.0 {status} ".encode())
    # The response carries what the request had of Via, From, To, Call-ID and CSeq.
    present = _header_keys(data)
    for key in ("via", "from", "to", "call-id", "cseq"):
        assert resp.has(key) == (key in present), key


def _header_keys(data: bytes) -> set[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    keys = set()
    for line in head.split("\r\n")[1:]:
        name, sep, _ = line.partition(":")
        if sep and name and name[0] not in " \t":
            keys.add(header_key(name.strip()))
    return keys


@pytest.mark.parametrize("name", ["bigcode", "scalarlg"])
def test_invalid_responses_are_not_answered(name: str) -> None:
    assert try_parse_for_reply(load(name)) is None


# --- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALID)
def test_round_trip(name: str) -> None:
    msg = parse_ok(name)
    again = parse_message(msg.serialize())
    assert again.start_line() == msg.start_line()

    def others(m: SipMessage) -> list[tuple[str, str]]:
        return [(h[1], h[2]) for h in m.headers if h[0] != "content-length"]

    assert others(again) == others(msg)
    assert again.body == msg.body
    assert again.get("content-length") == str(len(msg.body))
    assert again.serialize() == msg.serialize()


@pytest.mark.parametrize("name", sorted(CANONICAL))
def test_canonical_messages_relay_byte_for_byte(name: str) -> None:
    data = load(name)
    assert parse_message(data).serialize() == data
    assert parse_message(data, datagram=False).serialize() == data


@pytest.mark.parametrize("name", VALID)
def test_valid_messages_frame_on_a_stream(name: str) -> None:
    msg = parse_ok(name)
    wire = msg.serialize()
    framer = StreamFramer()
    framer.feed(wire + wire)
    assert framer.next_frame() == wire
    assert framer.next_frame() == wire
    assert framer.next_frame() is None


# --- specific checks, message by message ----------------------------------------------------------


def test_wsinv_short_tortuous_invite() -> None:
    m = req("wsinv")
    assert m.uri == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    assert parse_uri(m.uri).params == {"unknownparam": None}
    to = parse_name_addr(m.get("to") or "")
    assert to.uri == "sip:vivekg@chair-dnrc.example.com"
    assert to.tag == "1918181833n"
    frm = parse_name_addr(m.get("from") or "")
    assert frm.display == '"J Rosenberg \\\\\\""'
    assert frm.uri == "sip:jdrosen@example.com"
    assert frm.tag == "98asjd8"
    assert m.get("max-forwards") == "0068"
    assert m.cseq == (9, "INVITE")
    assert m.get("content-length") == "150"
    assert len(m.body) == 150
    vias = m.values("via")
    assert len(vias) == 3
    top = parse_via(vias[0])
    assert (top.transport, top.host, top.port, top.branch) == ("UDP", "192.0.2.2", None, "390skdjuw")
    second, third = parse_via(vias[1]), parse_via(vias[2])
    assert (second.transport, second.host, second.branch) == ("TCP", "spindle.example.com", "z9hG4bK9ikj8")
    assert (third.transport, third.host, third.branch) == ("UDP", "192.168.255.111", "z9hG4bK30239")
    assert m.get("subject") == ""
    assert m.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert m.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert m.get("route") == "<sip:services.example.com;lr;unknownwith=value;unknown-no-value>"
    contact = parse_name_addr(m.first_value("contact") or "")
    assert contact.display == '"Quoted string \\"\\""'
    assert contact.uri == "sip:jdrosen@example.com"
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert contact.q == 0.33


def test_intmeth_wide_range_of_valid_characters() -> None:
    m = req("intmeth")
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    uri = parse_uri(m.uri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com"
    to = parse_name_addr(m.get("to") or "")
    assert to.display is not None and "\x00" in to.display and "\x07" in to.display
    assert to.uri == "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com"
    frm = parse_name_addr(m.get("from") or "")
    assert frm.display == "token1~` token2'+_ token3*%!.-"
    assert frm.tag == "_token~1'+`*%!-."
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert m.get("extensionHeader-!.%*+_`'~") == "\ufeff\u5927\u505c\u96fb"
    assert m.top_via.branch == "z9hG4bK-.!%66*_+`'~"


def test_esc01_escaped_uris() -> None:
    m = req("esc01")
    uri = parse_uri(m.uri)
    assert uri.user_unescaped == "sips:user@example.com"
    assert uri.host == "example.net"
    to = parse_uri(parse_name_addr(m.get("to") or "").uri)
    assert to.user_unescaped == "user"
    frm = parse_uri(parse_name_addr(m.get("from") or "").uri)
    assert frm.user_unescaped == "I have spaces"
    contact = parse_uri(parse_name_addr(m.first_value("contact") or "").uri)
    assert contact.user_unescaped == "caller"
    assert contact.params == {"%6c%72": None, "n%61me": "v%61lue%25%34%31"}
    assert m.get("content-type") == "application/sdp"  # compact "C:" (upper case) expanded


def test_escnull_escaped_nulls() -> None:
    m = req("escnull")
    assert parse_uri(parse_name_addr(m.get("to") or "").uri).user_unescaped == "null-\x00-null"
    contacts = [parse_uri(parse_name_addr(c).uri) for c in m.values("contact")]
    assert [c.user_unescaped for c in contacts] == ["\x00", "\x00\x00"]


def test_esc02_percent_is_not_an_escape_in_methods_and_header_names() -> None:
    m = req("esc02")
    assert m.method == "RE%47IST%45R"  # an unknown method, not REGISTER
    assert m.values("contact") == ["<sip:alias1@host1.example.com>", "<sip:alias3@host3.example.com>"]
    assert m.get("C%6Fntact") == "<sip:alias2@host2.example.com>"  # an extension header
    assert parse_name_addr(m.get("to") or "").display == '"%Z%45"'
    assert m.top_via.branch == "z9hG4bK209%fzsnel234"


def test_lwsdisp_no_lws_between_display_name_and_angle() -> None:
    frm = parse_name_addr(req("lwsdisp").get("from") or "")
    assert (frm.display, frm.uri, frm.tag) == ("caller", "sip:caller@example.com", "323")


def test_longreq_long_values_and_many_vias() -> None:
    m = req("longreq")
    data = load("longreq")
    vias = m.values("via")
    assert len(vias) == 34  # sip33 .. sip1, then host.example.com
    assert parse_via(vias[0]).host == "sip33.example.com"
    assert parse_via(vias[-2]).host == "sip1.example.com"
    assert parse_via(vias[-1]).host == "host.example.com"
    to = parse_name_addr(m.get("to") or "")
    assert to.display is not None and len(to.display) > 100
    assert parse_uri(to.uri).port == 6000 and len(to.uri) > 200
    frm = parse_name_addr(m.get("from") or "")
    assert frm.tag is not None and len(frm.tag) > 100
    assert len(m.call_id) > 100
    assert m.get("unknown-" + "long" * 20 + "-name") is not None
    assert len(m.body) == 150
    assert m.get("content-length") == "150"
    assert len(data) > 3000


def test_dblreq_first_message_only() -> None:
    m = req("dblreq")
    assert m.method == "REGISTER"
    assert m.body == b""
    assert b"INVITE sip:joe@example.com" in load("dblreq")


def test_semiuri_semicolons_in_user_part() -> None:
    m = req("semiuri")
    uri = parse_uri(m.uri)
    assert uri.user == "user;par=u%40example.net"
    assert uri.host == "example.com"
    assert uri.params == {}
    assert m.values("accept") == [
        "application/sdp",
        "application/pkcs7-mime",
        "multipart/mixed",
        "multipart/signed",
        "message/sip",
        "message/sipfrag",
    ]


def test_transports_varied_and_unknown() -> None:
    vias = [parse_via(v) for v in req("transports").values("via")]
    assert [v.transport for v in vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert vias[2].sent_by == ("t3.example.com", 5061)


def test_mpart01_multipart_body_by_content_length() -> None:
    m = req("mpart01")
    assert len(m.body) == 553 == int(m.get("content-length") or 0)
    assert m.body.startswith(b"--7a9cbec02ceef655")
    identity = m.get("identity") or ""
    assert identity.startswith("r5mwreLuyDRYBi/0TiPwEsY3rEVsk") and identity.endswith("=")
    assert m.values("identity") == [identity]


def test_sdp01_body_length_from_content_length() -> None:
    m = req("sdp01")
    assert len(m.body) == 150
    assert m.get("accept") == "text/nobodyKnowsThis"


def test_unreason_and_noreason_responses() -> None:
    unreason = parse_ok("unreason")
    assert isinstance(unreason, SipResponse)
    assert unreason.status == 200
    assert unreason.reason.startswith("= 2**3 * 5**2 ") and "\u0441\u0442\u043e" in unreason.reason
    assert len(unreason.body) == 154
    noreason = parse_ok("noreason")
    assert isinstance(noreason, SipResponse)
    assert (noreason.status, noreason.reason) == (100, "")


def test_lwsstart_and_trws_are_forwarded_with_single_spaces() -> None:
    for name in ("lwsstart", "trws"):
        m = req(name)
        assert m.serialize().split(b"\r\n", 1)[0] == f"{m.method} {m.uri} SIP/2.0".encode()
    assert req("lwsstart").uri == "sip:user@example.com"


def test_badbranch_parses_with_the_bare_magic_cookie() -> None:
    assert req("badbranch").top_via.branch == "z9hG4bK"


def test_inv2543_without_magic_cookie_or_max_forwards() -> None:
    m = req("inv2543")
    assert m.top_via.branch == ""
    assert m.top_via.sent_by == ("iftgw.example.com", 5060)
    assert m.get("max-forwards") is None
    assert m.from_tag is None
    assert len(m.body) == len(load("inv2543").split(b"\r\n\r\n", 1)[1])


def test_zeromf_max_forwards_zero() -> None:
    assert req("zeromf").get("max-forwards") == "0"


def test_unksm2_unknown_schemes_in_headers() -> None:
    m = req("unksm2")
    assert parse_name_addr(m.get("to") or "").uri == "isbn:2983792873"
    assert parse_name_addr(m.get("from") or "").uri == "http://www.example.com"
    assert m.values("contact") == ["<name:John_Smith>"]


def test_bext01_require_values() -> None:
    m = req("bext01")
    assert m.values("proxy-require") == ["noProxiesSupportThis", "norDoAnyProxiesSupportThis"]
    assert m.values("require") == ["nothingSupportsThis", "nothingSupportsThisEither"]


def test_cparam_contact_params() -> None:
    c1 = parse_name_addr(req("cparam01").get("contact") or "")
    assert (c1.uri, c1.params, c1.bracketed) == (
        "sip:+19725552222@gw1.example.net",
        {"unknownparam": None},
        False,
    )
    c2 = parse_name_addr(req("cparam02").get("contact") or "")
    assert (c2.uri, c2.params) == ("sip:+19725552222@gw1.example.net;unknownparam", {})


def test_regescrt_escaped_header_in_contact_uri() -> None:
    contact = parse_uri(parse_name_addr(req("regescrt").get("contact") or "").uri)
    assert contact.headers == "Route=%3Csip:sip.example.com%3E"


def test_bcast_broadcast_via_parses() -> None:
    m = parse_ok("bcast")
    assert parse_via(m.values("via")[1]).host == "255.255.255.255"


def test_status_hints_for_the_proxy() -> None:
    hints = {}
    for name in INVALID:
        try:
            parse_message(load(name))
        except ParseError as exc:
            hints[name] = exc.status_hint
    assert hints["badvers"] == 505
    assert hints["unkscm"] == hints["novelsc"] == 416
    assert all(v == 400 for k, v in hints.items() if k not in ("badvers", "unkscm", "novelsc"))


def test_clerr_on_a_stream_waits_for_the_body() -> None:
    framer = StreamFramer()
    framer.feed(load("clerr"))
    assert framer.next_frame() is None  # 9999 octets announced: wait for them


def test_ncl_on_a_stream_loses_framing() -> None:
    from proxy_runtime.sip.framing import FramingError

    framer = StreamFramer()
    framer.feed(load("ncl"))
    with pytest.raises(FramingError) as err:
        framer.next_frame()
    assert err.value.status_hint == 400
    assert try_parse_for_reply(err.value.head) is not None


def test_mcl01_on_a_stream_loses_framing() -> None:
    from proxy_runtime.sip.framing import FramingError

    framer = StreamFramer()
    framer.feed(load("mcl01"))
    with pytest.raises(FramingError):
        framer.next_frame()
