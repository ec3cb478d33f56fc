"""Every shape of ClearIP's answer (issue 12, items 1-4), in the routing parse and in the core on a
fake clock: headers inside each Contact URI (RFC 3261 §19.1.1) applied per branch, 300 followed
like 302 (``redirect_codes``), 607/608 relayed and never advanced, a redirect without a usable
Contact answered 503 and counted as its own outcome."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from urllib.parse import quote

import pytest

from proxy_runtime.core import routing
from proxy_runtime.core.proxy import CLEARIP, ProxyCore, Target
from proxy_runtime.metrics import names
from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.settings import load
from proxy_runtime.sip.message import SipRequest, SipResponse
from proxy_runtime.sip.parse import parse_message
from tests.unit.test_proxy_core import (
    IDENTITY_1,
    IDENTITY_2,
    SWITCH,
    Net,
    clearip_reply,
    response_to,
    to_clearip,
)

CARRIER_A = Target("udp", "192.0.2.10", 5060)
CARRIER_B = Target("udp", "198.51.100.20", 5080)
# What ClearIP puts in a Contact URI: the PASSporT with its ;info=<...>;alg;ppt escaped.
ID_A = (
    "eyJhbGciOiJFUzI1NiJ9.eyJhdHRlc3QiOiJBIn0.c2lnLUE;info=<https://cert.example/a.pem>;alg=ES256;ppt=shaken"
)
ID_B = 'eyJhbGciOiJFUzI1NiJ9.eyJhdHRlc3QiOiJCIn0.c2lnLUI;info=<https://cert.example/b.pem>;alg=ES256;ppt="shaken"'
ID_DIV = 'eyJhbGciOiJFUzI1NiJ9.eyJkaXYiOnt9fQ.c2lnLUQ;info=<https://cert.example/d.pem>;alg=ES256;ppt="div"'
PAI_B = "<sip:+12125550100@clearip.example;user=phone>"


def esc(value: str) -> str:
    """Escape a header value for a URI's ``?headers`` part as ClearIP does (``+`` stays as is)."""
    return quote(value, safe="+")


def contact(target: Target, q: float, headers: Sequence[tuple[str, str]] = ()) -> str:
    tp = "" if target.transport == "udp" else f";transport={target.transport}"
    part = "&".join(f"{n}={esc(v)}" for n, v in headers)
    return f"<sip:+15551234567@{target.host}:{target.port}{tp}{'?' + part if part else ''}>;q={q:g}"


def redirect_with(req: SipRequest, contacts: list[str], *, status: int = 302, extra: str = "") -> bytes:
    reason = {300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily"}[status]
    head = f"Identity: {IDENTITY_1}\r\nIdentity: {IDENTITY_2}\r\n{extra}"
    head += "".join(f"Contact: {c}\r\n" for c in contacts)
    return response_to(req, status, reason, head, to_tag="cip")


def make_core(**overrides: object) -> tuple[ProxyCore, Net, MetricsRecorder]:
    s = load(environ={}, overrides={"allow": ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24"], "timeout": 5})
    if overrides:
        s = replace(s, **overrides)  # type: ignore[arg-type]
    net = Net()
    rec = MetricsRecorder(proxy_id="t")
    core = ProxyCore(
        s, net, advertise="203.0.113.7", ports={"udp": 5060, "tcp": 5060}, instance="t35t", recorder=rec
    )
    core.set_clearip_up(True, 0.0)
    return core, net, rec


def invites_to(out: list[tuple[Target, SipRequest | SipResponse]]) -> list[tuple[Target, SipRequest]]:
    return [
        (t, m)
        for t, m in out
        if isinstance(m, SipRequest) and m.method == "INVITE" and t.transport != CLEARIP
    ]


def finals_up(out: list[tuple[Target, SipRequest | SipResponse]]) -> list[SipResponse]:
    return [m for t, m in out if t == SWITCH and isinstance(m, SipResponse) and m.status >= 200]


# --- the routing parse -------------------------------------------------------------------------


def parse_redirect(*contacts: str) -> routing.Redirect:
    head = "".join(f"Contact: {c}\r\n" for c in contacts)
    raw = (
        "SIP/2.0 302 Moved Temporarily\r\nVia: SIP/2.0/TLS 203.0.113.7;branch=z9hG4bKx\r\n"
        "From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n"
        f"{head}Content-Length: 0\r\n\r\n"
    ).encode()
    resp = parse_message(raw, datagram=False)
    assert isinstance(resp, SipResponse)
    return routing.redirect_targets(resp)


def test_contact_uri_headers_are_unescaped_in_order_and_leave_the_request_uri() -> None:
    r = parse_redirect(
        contact(CARRIER_A, 0.9, [("Identity", ID_A), ("Identity", ID_DIV), ("P-Asserted-Identity", PAI_B)])
    )
    assert r.dropped == ()
    (t,) = r.targets
    assert str(t.uri) == "sip:+15551234567@192.0.2.10:5060"  # no '?', '+' kept
    assert t.headers == (("Identity", ID_A), ("Identity", ID_DIV), ("P-Asserted-Identity", PAI_B))
    assert t.ignored == ()


def test_plus_in_a_uri_header_stays_a_plus() -> None:
    # unquote_plus would turn these '+' into spaces: the PAI's number would be lost.
    r = parse_redirect("<sip:+15551234567@192.0.2.10?P-Asserted-Identity=%3Csip:+12125550100@x.example%3E>")
    assert r.targets[0].headers == (("P-Asserted-Identity", "<sip:+12125550100@x.example>"),)


def test_headers_never_taken_from_a_uri_are_ignored_and_named() -> None:
    bad = [
        ("Via", "SIP/2.0/UDP 6.6.6.6;branch=z9hG4bKevil"),
        ("i", "forged-call-id"),  # compact Call-ID
        ("CSeq", "9 INVITE"),
        ("From", "<sip:evil@x>;tag=1"),
        ("To", "<sip:evil@x>;tag=2"),
        ("Route", "<sip:6.6.6.6;lr>"),
        ("Record-Route", "<sip:6.6.6.6;lr>"),
        ("Max-Forwards", "255"),
        ("Contact", "<sip:6.6.6.6>"),
        ("Content-Length", "0"),
        ("Content-Type", "text/plain"),
        ("body", "v=0"),
        ("X-Evil", "a\r\nVia: SIP/2.0/UDP 6.6.6.6"),  # CR/LF: a header of its own
    ]
    r = parse_redirect(contact(CARRIER_A, 0.9, [("Identity", ID_A), *bad]))
    (t,) = r.targets
    assert t.headers == (("Identity", ID_A),)
    assert list(t.ignored) == [n for n, _ in bad]


@pytest.mark.parametrize(
    ("contacts", "cause"),
    [
        ((), "no Contact"),
        (("*",), "Contact *"),
        (("<sip:+1555@192.0.2.10",), "unparsable Contact"),
        (("<tel:+15551234567>",), "Contact scheme not sip or sips"),
        (("<https://carrier.example/route>",), "Contact scheme not sip or sips"),
        (("<sip:+1555@192.0.2.10:0>",), "Contact port 0"),
        (("<sip:+1555@192.0.2.10:65536>",), "unparsable Contact"),
        (("<sip:+1555@192.0.2.10:5060;transport=ws>",), "Contact transport not udp, tcp or tls"),
        (("<sip:+1555@192.0.2.10?Identity>",), "malformed headers in Contact URI"),
        (("<sip:+1555@192.0.2.10>;q=0",), "Contact q=0"),
        (("<tel:+1555>", "<sip:+1555@192.0.2.10:0>"), "Contact scheme not sip or sips, Contact port 0"),
    ],
)
def test_unusable_contacts_are_dropped_with_their_cause(contacts: tuple[str, ...], cause: str) -> None:
    r = parse_redirect(*contacts)
    assert r.targets == ()
    assert r.why_unusable == cause


def test_usable_contacts_survive_beside_unusable_ones_in_q_order() -> None:
    r = parse_redirect("<tel:+1555>", contact(CARRIER_A, 0.5), "<sip:x@192.0.2.9:0>", contact(CARRIER_B, 0.9))
    assert [t.uri.host for t in r.targets] == [CARRIER_B.host, CARRIER_A.host]
    assert r.dropped == ("Contact scheme not sip or sips", "Contact port 0")


# --- the core: per-branch headers --------------------------------------------------------------


def test_each_branch_carries_its_own_contacts_headers_and_the_next_one_after_an_advance() -> None:
    core, net, _ = make_core()
    req = to_clearip(core, net)
    contacts = [
        contact(CARRIER_A, 0.9, [("Identity", ID_A), ("Identity", ID_DIV)]),
        contact(CARRIER_B, 0.8, [("Identity", ID_B), ("P-Asserted-Identity", PAI_B)]),
    ]
    pai_302 = "<sip:+12125550100@clearip.example>"
    clearip_reply(core, redirect_with(req, contacts, extra=f"P-Asserted-Identity: {pai_302}\r\n"), 0.05)
    ((t1, first),) = invites_to(net.take())
    assert (t1.host, t1.port) == (CARRIER_A.host, CARRIER_A.port)
    assert first.uri == "sip:+15551234567@192.0.2.10:5060"
    # The Contact's Identity headers win over the 302's (and the switch's), in the URI's order;
    # the 302's PAI stays, as this Contact names none.
    assert first.get_all("identity") == [ID_A, ID_DIV]
    assert first.get_all("p-asserted-identity") == [pai_302]
    core.receive(response_to(first, 503, "Service Unavailable"), CARRIER_A, 0.1)
    ((t2, second),) = invites_to(net.take())
    assert (t2.host, t2.port) == (CARRIER_B.host, CARRIER_B.port)
    assert second.uri == "sip:+15551234567@198.51.100.20:5080"
    assert second.get_all("identity") == [ID_B]  # never the first Contact's
    assert second.get_all("p-asserted-identity") == [PAI_B]
    assert b"?" not in second.serialize().split(b"\r\n", 1)[0]


def test_a_trailing_ampersand_in_a_contacts_headers_still_carries_its_identity() -> None:
    core, net, _ = make_core()
    req = to_clearip(core, net)
    trailing = (
        f"<sip:+15551234567@192.0.2.10:5060?Identity={esc(ID_A)}&P-Asserted-Identity={esc(PAI_B)}&>;q=0.9"
    )
    clearip_reply(core, redirect_with(req, [trailing]), 0.05)
    ((t, fwd),) = invites_to(net.take())
    assert (t.host, t.port) == (CARRIER_A.host, CARRIER_A.port)
    assert fwd.get_all("identity") == [ID_A]
    assert fwd.get_all("p-asserted-identity") == [PAI_B]


# --- the core: the serial fork's bounds ---------------------------------------------------------


def _fail_each(
    core: ProxyCore, net: Net, start: float, step: float, status: int = 503
) -> tuple[list[Target], list[int]]:
    """Answer every carrier INVITE with ``status`` ``step`` s after it left: the carriers tried, in
    order, and the final statuses sent to the switch."""
    tried: list[Target] = []
    now = start
    while True:
        out = net.take()
        invites = invites_to(out)
        if not invites:
            return tried, [r.status for r in finals_up(out)]
        ((t, fwd),) = invites
        tried.append(t)
        now += step
        core.receive(
            response_to(fwd, status, "Not Found" if status == 404 else "Service Unavailable"), t, now
        )


def _carriers(n: int) -> list[Target]:
    return [Target("udp", f"192.0.2.{10 + i}", 5060) for i in range(n)]


def test_at_most_max_contacts_of_a_redirect_are_tried() -> None:
    core, net, _ = make_core(max_contacts=3)
    req = to_clearip(core, net)
    carriers = _carriers(5)
    clearip_reply(core, redirect_with(req, [contact(c, 0.9 - i / 10) for i, c in enumerate(carriers)]), 0.05)
    assert _fail_each(core, net, 0.05, 0.1) == (carriers[:3], [503])


def test_no_new_attempt_starts_after_the_fork_window(caplog: pytest.LogCaptureFixture) -> None:
    """A PASSporT is stale after 60 s (RFC 8224 §6.2.2): past `fork_window` after ClearIP was asked
    no new Contact starts, and the call ends 503 (not the carriers' best response, a 404 here,
    which would stop the switch), so the switch route-advances and gets a fresh PASSporT."""
    core, net, _ = make_core(fork_window=12.0)
    req = to_clearip(core, net)
    carriers = _carriers(6)
    clearip_reply(core, redirect_with(req, [contact(c, 0.9 - i / 10) for i, c in enumerate(carriers)]), 0.05)
    # ClearIP was asked at 0. Each carrier answers 404 after 5 s: attempts start at 0.05, 5.05,
    # 10.05; the third fails at 15.05, past 0 + 12, so no fourth.
    with caplog.at_level("INFO"):
        assert _fail_each(core, net, 0.05, 5.0, status=404) == (carriers[:3], [503])
    assert any("fork window (12 s) passed" in r.getMessage() for r in caplog.records), caplog.text


def test_the_fork_window_counts_from_when_clearip_was_asked() -> None:
    """The PASSporT's iat is set when ClearIP signs, which may be up to `timeout` before its answer
    arrives: the window starts when the proxy asked, never later."""
    core, net, _ = make_core(fork_window=10.0)
    req = to_clearip(core, net)  # asked at 0
    carriers = _carriers(4)
    # ClearIP answers late (4 s); carriers fail after 3 s: attempts at 4, 7, 10; the third fails at
    # 13, past 0 + 10 (counted from the answer it would still be inside 4 + 10).
    clearip_reply(core, redirect_with(req, [contact(c, 0.9 - i / 10) for i, c in enumerate(carriers)]), 4.0)
    assert _fail_each(core, net, 4.0, 3.0) == (carriers[:3], [503])


def test_a_contact_without_uri_headers_gets_the_302s() -> None:
    core, net, _ = make_core()
    req = to_clearip(core, net)
    clearip_reply(core, redirect_with(req, [contact(CARRIER_A, 0.9)]), 0.05)
    ((_, fwd),) = invites_to(net.take())
    assert fwd.get_all("identity") == [IDENTITY_1, IDENTITY_2]


def test_ignored_uri_headers_are_counted_and_change_nothing() -> None:
    core, net, rec = make_core()
    req = to_clearip(core, net)
    headers = [("Identity", ID_A), ("Via", "SIP/2.0/UDP 6.6.6.6;branch=z9hG4bKevil"), ("Call-ID", "forged")]
    clearip_reply(core, redirect_with(req, [contact(CARRIER_A, 0.9, headers)]), 0.05)
    ((_, fwd),) = invites_to(net.take())
    assert fwd.get_all("identity") == [ID_A]
    assert fwd.call_id == req.call_id == "call-1@10.0.0.5"
    assert "6.6.6.6" not in fwd.serialize().decode()
    assert rec.close_interval(60.0).count(names.REDIRECT_HEADERS_IGNORED) == 2


def test_an_empty_uri_header_value_is_ignored_and_never_wipes_the_302s_identity() -> None:
    """``?Identity=`` (an empty value, RFC 3261 §19.1.1 allows it in the URI) would replace the
    302's PASSporTs with an empty ``Identity:`` header, invalid under RFC 8224, and the call would
    leave unsigned. An empty (or blank) value is ignored and counted; the others still apply."""
    r = parse_redirect(
        contact(CARRIER_A, 0.9, [("Identity", ""), ("P-Asserted-Identity", PAI_B), ("Subject", " ")])
    )
    (t,) = r.targets
    assert t.headers == (("P-Asserted-Identity", PAI_B),)
    assert t.ignored == ("Identity", "Subject")
    core, net, rec = make_core()
    req = to_clearip(core, net)
    clearip_reply(
        core,
        redirect_with(req, [contact(CARRIER_A, 0.9, [("Identity", ""), ("P-Asserted-Identity", PAI_B)])]),
        0.05,
    )
    ((_, fwd),) = invites_to(net.take())
    assert fwd.get_all("identity") == [IDENTITY_1, IDENTITY_2]
    assert fwd.get_all("p-asserted-identity") == [PAI_B]
    assert rec.close_interval(60.0).count(names.REDIRECT_HEADERS_IGNORED) == 1


# --- the core: which redirects are followed ----------------------------------------------------


def test_300_multiple_choices_is_followed_like_302() -> None:
    core, net, rec = make_core()
    req = to_clearip(core, net)
    clearip_reply(core, redirect_with(req, [contact(CARRIER_A, 0.9, [("Identity", ID_A)])], status=300), 0.05)
    out = net.take()
    assert [m.method for t, m in out if t.transport == CLEARIP and isinstance(m, SipRequest)] == ["ACK"]
    ((_, fwd),) = invites_to(out)
    assert fwd.get_all("identity") == [ID_A]
    assert not finals_up(out)
    core.receive(response_to(fwd, 200, "OK", "Contact: <sip:callee@192.0.2.10>\r\n"), CARRIER_A, 0.2)
    assert rec.close_interval(60.0).count(names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome.REDIRECT_300]) == 1


def test_a_redirect_code_not_in_the_setting_is_relayed() -> None:
    core, net, _ = make_core(redirect_codes=(302,))
    req = to_clearip(core, net)
    clearip_reply(core, redirect_with(req, [contact(CARRIER_A, 0.9)], status=300), 0.05)
    out = net.take()
    assert not invites_to(out)
    assert [m.status for m in finals_up(out)] == [300]


# --- the core: 607 / 608 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "phrase", "outcome"), [(607, "Unwanted", "607"), (608, "Rejected", "608")]
)
def test_clearip_607_608_relayed_unchanged_and_counted(status: int, phrase: str, outcome: str) -> None:
    core, net, rec = make_core()
    req = to_clearip(core, net)
    extra = (
        f'Reason: SIP;cause={status};text="{phrase}"\r\n'
        "Call-Info: <https://redress.clearip.example/v1/ref/7f3a>;purpose=jwscallinfo\r\n"
    )
    clearip_reply(core, response_to(req, status, phrase, extra), 0.05)
    out = net.take()
    assert not invites_to(out)
    (final,) = finals_up(out)
    assert final.start_line() == f"SIP/2.0 {status} {phrase}"
    assert final.get_all("reason") == [f'SIP;cause={status};text="{phrase}"']
    assert final.get_all("call-info") == ["<https://redress.clearip.example/v1/ref/7f3a>;purpose=jwscallinfo"]
    assert rec.close_interval(60.0).count(names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome(outcome)]) == 1


@pytest.mark.parametrize("status", [607, 608])
def test_carrier_607_608_stop_the_fork(status: int) -> None:
    core, net, _ = make_core()
    req = to_clearip(core, net)
    clearip_reply(core, redirect_with(req, [contact(CARRIER_A, 0.9), contact(CARRIER_B, 0.8)]), 0.05)
    ((_, first),) = invites_to(net.take())
    core.receive(
        response_to(first, status, "Blocked", "Call-Info: <https://c.example/r>;purpose=icon\r\n"),
        CARRIER_A,
        0.1,
    )
    out = net.take()
    assert not invites_to(out), "advanced after a 6xx"
    (final,) = finals_up(out)
    assert final.status == status and final.get("call-info") == "<https://c.example/r>;purpose=icon"


# --- the core: a redirect without a usable Contact ---------------------------------------------


@pytest.mark.parametrize(
    ("contacts", "cause"),
    [
        ([], "no Contact"),
        (["*"], "Contact *"),
        (["<sip:+1555@192.0.2.10:0>"], "Contact port 0"),
        (["<tel:+15551234567>"], "Contact scheme not sip or sips"),
        (["<sip:+1555@192.0.2.10:99999>"], "unparsable Contact"),
    ],
)
@pytest.mark.parametrize("status", [302, 300])
def test_redirect_without_a_usable_contact_is_503_with_the_cause(
    contacts: list[str], cause: str, status: int
) -> None:
    core, net, rec = make_core()
    req = to_clearip(core, net)
    clearip_reply(core, redirect_with(req, contacts, status=status), 0.05)
    out = net.take()
    assert [m.method for t, m in out if t.transport == CLEARIP and isinstance(m, SipRequest)] == ["ACK"]
    assert not invites_to(out)
    (final,) = finals_up(out)
    assert final.status == 503
    assert final.get("reason") == f'SIP;cause=503;text="ClearIP {status} without a usable Contact ({cause})"'
    assert not final.has("contact") and not final.has("identity")
    assert core.in_flight == 0
    iv = rec.close_interval(60.0)
    assert iv.count(names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome.REDIRECT_UNUSABLE]) == 1
    assert iv.count(names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome.REDIRECT_302]) == 0
    assert iv.count(names.PROXY_FAILED_CALLS) == 1


def test_301_is_followed_only_when_configured_and_counted_as_its_own_outcome() -> None:
    core, net, rec = make_core(redirect_codes=(301, 302))
    req = to_clearip(core, net)
    clearip_reply(core, redirect_with(req, [contact(CARRIER_A, 0.9, [("Identity", ID_A)])], status=301), 0.05)
    ((_, fwd),) = invites_to(net.take())
    assert fwd.get_all("identity") == [ID_A]
    core.receive(response_to(fwd, 486, "Busy Here"), CARRIER_A, 0.1)
    assert [m.status for m in finals_up(net.take())] == [486]
    assert rec.close_interval(60.0).count(names.CLEARIP_OUTCOME_METRICS[ClearIpOutcome.REDIRECT_301]) == 1
    core, net, _ = make_core()  # the default (300, 302) relays a 301
    req = to_clearip(core, net)
    clearip_reply(core, redirect_with(req, [contact(CARRIER_A, 0.9)], status=301), 0.05)
    assert [m.status for m in finals_up(net.take())] == [301]
