"""SIP/SIPS URI parsing (RFC 3261 §19.1)."""

from __future__ import annotations

import pytest

from proxy_runtime.sip.uri import SipUri, UriError, parse_uri, parse_uri_headers


def test_full_uri() -> None:
    u = parse_uri(
        "SIP:Alice:secret@Atlanta.Example.COM:5070;Transport=TCP;lr;maddr=239.255.255.1?subject=hi&x=y"
    )
    assert (u.scheme, u.user, u.password, u.host, u.port) == (
        "sip",
        "Alice",
        "secret",
        "atlanta.example.com",
        5070,
    )
    assert u.params == {"transport": "TCP", "lr": None, "maddr": "239.255.255.1"}
    assert u.headers == "subject=hi&x=y"
    assert (u.transport, u.default_port, u.is_lr, u.hostport) == (
        "tcp",
        5060,
        True,
        "atlanta.example.com:5070",
    )


def test_defaults_and_sips() -> None:
    assert parse_uri("sip:example.com").transport == "udp"
    s = parse_uri("sips:[2001:DB8::1]")
    assert (s.host, s.port, s.transport, s.default_port, s.hostport) == (
        "2001:db8::1",
        None,
        "tls",
        5061,
        "[2001:db8::1]",
    )
    assert parse_uri("sip:h;transport=tls").transport == "tls"
    assert parse_uri("sips:h;transport=tcp").transport == "tls"
    assert parse_uri("sip:[::1]:5062").port == 5062


def test_user_part_with_reserved_characters() -> None:
    u = parse_uri("sip:user;par=u%40example.net@example.com")
    assert (u.user, u.host, u.params) == ("user;par=u%40example.net", "example.com", {})
    assert parse_uri("sip:%61lice@h").user_unescaped == "alice"
    assert parse_uri("sip:+1-212-555-1234@h;user=phone").params == {"user": "phone"}


def test_str_round_trip() -> None:
    for text in (
        "sip:alice@atlanta.example.com",
        "sips:bob:pw@[2001:db8::1]:5061;transport=tls?subject=x",
        "sip:h;lr;ftag=abc",
        "sip:user;par=u%40example.net@example.com",
    ):
        assert str(parse_uri(text)) == text
        assert parse_uri(str(parse_uri(text))) == parse_uri(text)


def test_with_params_is_a_copy() -> None:
    u = parse_uri("sip:h;lr")
    v = u.with_params(transport="tcp")
    assert v.params == {"lr": None, "transport": "tcp"}
    assert u.params == {"lr": None}
    assert isinstance(v, SipUri)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sip:",
        "sip:@h",
        "sip:u@",
        "sip:h:",
        "sip:h:99999",
        "sip:h:123456",
        "sip:h:\u00b2",
        "sip:h:x",
        "sip:[::1",
        "sip:[::1]x",
        "sip:[zz]",
        "sip:h\u00e9",
        "sip:a b@h",
        "sip:<h>",
        'sip:"h"',
        "sip:h\x00",
        "sip:h;=v",
        "sip:u@h@i",
    ],
)
def test_rejects(bad: str) -> None:
    with pytest.raises(UriError) as err:
        parse_uri(bad)
    assert err.value.status_hint == 400


@pytest.mark.parametrize("other", ["tel:+12125551234", "mailto:a@b", "soap.beep://h:3002", "urn:service:sos"])
def test_other_schemes_are_416(other: str) -> None:
    with pytest.raises(UriError) as err:
        parse_uri(other)
    assert err.value.status_hint == 416


def test_uri_headers_are_split_and_unescaped_in_order() -> None:
    u = parse_uri(
        "sip:+15551234567@198.51.100.7?Identity=eyJ.x.y%3Binfo%3D%3Chttps://c.example/a.pem%3E&Identity=b&Subject="
    )
    assert u.headers.startswith("Identity=eyJ")
    assert parse_uri_headers(u.headers) == [
        ("Identity", "eyJ.x.y;info=<https://c.example/a.pem>"),
        ("Identity", "b"),
        ("Subject", ""),
    ]
    # '+' is a literal in SIP URIs (RFC 3261 §19.1.2), never a space as in HTML forms.
    assert parse_uri_headers("P-Asserted-Identity=%3Csip:+1202@x%3E") == [
        ("P-Asserted-Identity", "<sip:+1202@x>")
    ]
    assert parse_uri_headers("") == []


@pytest.mark.parametrize("headers", ["Identity", "=x", "%20=x", "Identity=%FF%FE"])
def test_malformed_uri_headers_raise(headers: str) -> None:
    with pytest.raises(UriError):
        parse_uri_headers(headers)


@pytest.mark.parametrize(
    "headers",
    ["Identity=a&", "&Identity=a", "Identity=a&&P-Asserted-Identity=%3Csip:+1202@x%3E&"],
)
def test_empty_uri_header_elements_are_skipped(headers: str) -> None:
    # A generator that ends each header with '&' (seen in the field) means nothing different;
    # refusing it would drop the Contact, and with a single Contact the call.
    pairs = parse_uri_headers(headers)
    assert pairs[0] == ("Identity", "a")
    assert all(name for name, _ in pairs)
    assert len(pairs) == headers.count("=")


def test_parsed_values_compare_by_value_and_print_their_fields() -> None:
    # Plain classes (for mypyc), with what a dataclass would have given them.
    from proxy_runtime.sip.grammar import parse_name_addr, parse_via

    assert parse_uri("sip:+1@a.example;lr") == parse_uri("sip:+1@A.example;lr")
    assert parse_uri("sip:+1@a.example;lr") != parse_uri("sip:+1@a.example")
    assert parse_uri("sip:a@b") != "sip:a@b"
    assert repr(parse_uri("sip:a@b:5")) == (
        "SipUri(scheme='sip', user='a', password=None, host='b', port=5, params={}, headers='')"
    )
    via = "SIP/2.0/UDP h:1;branch=z9hG4bKx"
    assert parse_via(via) == parse_via(via) and parse_via(via) != parse_via(via + "y")
    assert repr(parse_via(via)).startswith("Via(transport='UDP', host='h', port=1, ")
    assert parse_name_addr("<sip:a@b>;tag=1") == parse_name_addr("<sip:a@b>;tag=1")
    assert parse_name_addr("<sip:a@b>;tag=1") != parse_name_addr("<sip:a@b>;tag=2")
    with pytest.raises(TypeError):
        hash(parse_uri("sip:a@b"))  # a dict inside: unhashable, as the dataclass was
