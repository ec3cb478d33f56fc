"""Every shape of ClearIP's answer seen in the field (DESIGN §2, issue 12 items 1-4), with SIPp as the
switch, ClearIP and carriers over real UDP and TCP on 127.0.0.1. Each asserts what each peer got,
byte for byte where it matters: the Request-URI, each Identity in order, the PAI."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration.flows import (
    CALLED,
    CLEARIP_KEYS,
    IDENTITY_1,
    IDENTITY_2,
    PAI_OUTBOUND,
    Call,
    acked,
    direct_to_proxy,
    elapsed_to_final,
    first_invite,
)
from tests.integration.harness import CALLER_IDENTITY, HOST, Lab, Sipp, make_identity

pytestmark = pytest.mark.sipp

BOTH = pytest.mark.parametrize("transport", ["udp", "tcp"])

# What ClearIP puts inside each Contact URI: its own PASSporTs for that route, and a PAI.
ID_A1 = make_identity("contact-a-1", size=900)
ID_A2 = make_identity("contact-a-div", ppt="div", quoted_ppt=True, size=880)
ID_B = make_identity("contact-b-1", quoted_ppt=True, size=910)
PAI_B = '"[V] Alice Caller" <sip:+12025550100@clearip.example;user=phone;verstat=TN-Validation-Passed>'


def uri_contact(carrier: Sipp, q: float, headers: Sequence[tuple[str, str]] = ()) -> str:
    """A Contact whose URI carries ``headers`` escaped as RFC 3261 §19.1.1 says (``+`` stays)."""
    tp = ";transport=tcp" if carrier.transport == "tcp" else ""
    part = "&".join(f"{name}={quote(value, safe='+')}" for name, value in headers)
    return f"<sip:{CALLED}@{HOST}:{carrier.port}{tp}{'?' + part if part else ''}>;q={q:g}"


def redirected_call(
    lab: Lab,
    *,
    switch_transport: str,
    carriers: Sequence[tuple[str, str]],
    contacts: Callable[[list[Sipp]], str],
    clearip_scenario: str = "clearip_302.xml",
    switch_scenario: str = "uac_call.xml",
    proxy_kw: dict[str, Any] | None = None,
) -> Call:
    """Carriers (scenario, transport) → ClearIP answering with ``contacts(carriers)`` → proxy → switch."""
    peers = [lab.carrier(f"carrier{i + 1}", sc, tp) for i, (sc, tp) in enumerate(carriers)]
    keys = dict(CLEARIP_KEYS, contacts=contacts(peers))
    clearip = lab.clearip(clearip_scenario, keys)
    proxy = lab.proxy(clearip.port, **(proxy_kw or {}))
    switch = lab.switch(switch_scenario, proxy, switch_transport)
    lab.settle(clearip, *peers, timeout=5.0)
    return Call(proxy, clearip, peers, switch)


# --- 1. headers inside the Contact URI ----------------------------------------------------------


@BOTH
def test_contact_uri_headers_become_that_branchs_headers_and_the_next_contact_brings_its_own(
    lab: Lab, transport: str
) -> None:
    """Contact 1 (q=0.9) carries two Identity headers and forbidden ones; its carrier answers 503.
    Contact 2 (q=0.8) carries one Identity and a PAI; its carrier answers. The 302 itself also has
    two Identity headers and a PAI: each Contact's own win for its branch."""
    other = "tcp" if transport == "udp" else "udp"
    forbidden = [("Via", "SIP/2.0/UDP 192.0.2.66;branch=z9hG4bKforged"), ("Call-ID", "forged@192.0.2.66")]
    call = redirected_call(
        lab,
        switch_transport=transport,
        carriers=[("carrier_503.xml", transport), ("carrier_answer.xml", other)],
        contacts=lambda p: ", ".join(
            [
                uri_contact(p[0], 0.9, [("Identity", ID_A1), ("Identity", ID_A2), *forbidden]),
                uri_contact(p[1], 0.8, [("Identity", ID_B), ("P-Asserted-Identity", PAI_B)]),
            ]
        ),
    )
    d = lab.describe
    first, second = call.carriers
    assert call.switch_final().status == 200, d()
    assert call.switch.exit_code == 0, d()
    assert acked(call.clearip, call.clearip.sent(302)[0]), d()
    inv1, inv2 = first_invite(first), first_invite(second)
    # Request-URIs without the headers part.
    assert inv1.request_uri == f"sip:{CALLED}@{HOST}:{first.port}" + (
        ";transport=tcp" if transport == "tcp" else ""
    ), d()
    assert inv2.request_uri == f"sip:{CALLED}@{HOST}:{second.port}" + (
        ";transport=tcp" if other == "tcp" else ""
    ), d()
    # Branch 1: the Contact's two Identity headers, unescaped, byte for byte, in order; the 302's PAI.
    assert inv1.all("Identity") == [ID_A1, ID_A2], d()
    assert inv1.all("P-Asserted-Identity") == [PAI_OUTBOUND], d()
    # Forbidden ones were not applied: the dialog's Call-ID, the proxy's Via on top.
    assert inv1.call_id == call.switch.sent("INVITE")[0].call_id, d()
    assert "192.0.2.66" not in inv1.raw.decode(), d()
    # Branch 2 (the route advance): its own Identity and PAI, nothing of branch 1's nor the 302's.
    assert inv2.all("Identity") == [ID_B], d()
    assert inv2.all("P-Asserted-Identity") == [PAI_B], d()
    for raw in (inv1.raw.decode(), inv2.raw.decode()):
        assert CALLER_IDENTITY not in raw and IDENTITY_1 not in raw and IDENTITY_2 not in raw, d()
    assert second.received("BYE"), d()
    # Ignored, and said so in the log (once a minute) besides the RedirectHeadersIgnored count.
    assert "ignored headers in ClearIP's redirect Contacts" in call.proxy.log_text(), d()


def test_a_trailing_ampersand_after_the_contacts_headers_still_signs_the_call(lab: Lab) -> None:
    """A Contact whose headers part ends with '&' (a generator that ends every header with it):
    the only Contact, so refusing it would fail the call; its Identity and PAI go on the INVITE."""
    call = redirected_call(
        lab,
        switch_transport="udp",
        carriers=[("carrier_answer.xml", "udp")],
        contacts=lambda p: uri_contact(
            p[0], 1.0, [("Identity", ID_B), ("P-Asserted-Identity", PAI_B)]
        ).replace(">;q=", "&>;q="),
    )
    d = lab.describe
    assert "&>;q=" in (call.clearip.sent(302)[0].get("Contact") or ""), d()
    assert call.switch_final().status == 200, d()
    (carrier,) = call.carriers
    inv = first_invite(carrier)
    assert inv.request_uri == f"sip:{CALLED}@{HOST}:{carrier.port}", d()
    assert inv.all("Identity") == [ID_B], d()
    assert inv.all("P-Asserted-Identity") == [PAI_B], d()


# --- 2. 300 Multiple Choices ---------------------------------------------------------------------


@BOTH
def test_300_multiple_choices_with_identity_in_the_contact_is_followed(lab: Lab, transport: str) -> None:
    call = redirected_call(
        lab,
        switch_transport=transport,
        carriers=[("carrier_answer.xml", transport)],
        contacts=lambda p: uri_contact(p[0], 1.0, [("Identity", ID_B)]),
        clearip_scenario="clearip_300.xml",
    )
    d = lab.describe
    assert call.switch_final().status == 200, d()
    assert [m.status for m in call.switch.final_responses()] == [200], (
        "the 300 must not reach the switch\n" + d()
    )
    assert acked(call.clearip, call.clearip.sent(300)[0]), d()
    inv = first_invite(call.carrier)
    assert (
        inv.request_uri.startswith(f"sip:{CALLED}@{HOST}:{call.carrier.port}") and "?" not in inv.request_uri
    ), d()
    assert inv.all("Identity") == [ID_B], d()
    assert call.carrier.received("BYE"), d()


def test_300_is_relayed_when_redirect_codes_leaves_it_out(lab: Lab) -> None:
    call = redirected_call(
        lab,
        switch_transport="udp",
        carriers=[("carrier_answer.xml", "udp")],
        contacts=lambda p: uri_contact(p[0], 1.0, [("Identity", ID_B)]),
        clearip_scenario="clearip_300.xml",
        switch_scenario="uac_expect_final.xml",
        proxy_kw={"extra": ["--redirect-code", "302"]},
    )
    d = lab.describe
    assert [m.status for m in call.switch.final_responses()] == [300], d()
    assert call.carrier.received() == [], d()


# --- 3. 607 Unwanted and 608 Rejected ------------------------------------------------------------


@pytest.mark.parametrize(("code", "phrase"), [(607, "Unwanted"), (608, "Rejected")])
@BOTH
def test_clearip_607_608_relayed_unchanged_and_never_routed(
    lab: Lab, transport: str, code: int, phrase: str
) -> None:
    call = direct_to_proxy(
        lab, "uac_expect_final.xml", switch_transport=transport, clearip_scenario=f"clearip_{code}.xml"
    )
    d = lab.describe
    finals = call.switch.final_responses()
    assert [m.status for m in finals] == [code], d()
    got, sent = finals[0], call.clearip.sent(code)[0]
    assert got.start_line == f"SIP/2.0 {code} {phrase}", d()
    assert got.all("Reason") == sent.all("Reason") == [f'SIP;cause={code};text="{phrase}"'], d()
    assert got.all("Call-Info") == sent.all("Call-Info") and len(got.all("Call-Info")) == 1, d()
    assert acked(call.clearip, sent), d()
    assert call.carrier.received() == [], d()
    assert f'"outcome":"{code}"' in call.proxy.log_text(), d()


@pytest.mark.parametrize("code", [607, 608])
@BOTH
def test_carrier_607_608_stop_the_fork_and_reach_the_switch_unchanged(
    lab: Lab, transport: str, code: int
) -> None:
    call = redirected_call(
        lab,
        switch_transport=transport,
        carriers=[(f"carrier_{code}.xml", transport), ("carrier_answer.xml", transport)],
        contacts=lambda p: ", ".join([uri_contact(p[0], 0.9), uri_contact(p[1], 0.8)]),
        switch_scenario="uac_expect_final.xml",
    )
    d = lab.describe
    blocking, spare = call.carriers
    finals = call.switch.final_responses()
    assert [m.status for m in finals] == [code], d()
    assert finals[0].all("Call-Info") == blocking.sent(code)[0].all("Call-Info"), d()
    assert finals[0].all("Reason") == blocking.sent(code)[0].all("Reason"), d()
    assert acked(blocking, blocking.sent(code)[0]), d()
    assert spare.received("INVITE") == [], "route-advanced after a 6xx\n" + d()


# --- 4. a redirect without a usable Contact ------------------------------------------------------

UNUSABLE = {
    "none": ("clearip_302_no_contact.xml", "", "no Contact"),
    "star": ("clearip_302.xml", "*", "Contact *"),
    "port0": ("clearip_302.xml", f"<sip:{CALLED}@{HOST}:0>", "Contact port 0"),
    "port70000": ("clearip_302.xml", f"<sip:{CALLED}@{HOST}:70000>", "unparsable Contact"),
    "tel": ("clearip_302.xml", f"<tel:{CALLED}>", "Contact scheme not sip or sips"),
    "garbage": ("clearip_302.xml", f"<sip:{CALLED}@{HOST}", "unparsable Contact"),
    "ws": (
        "clearip_302.xml",
        f"<sip:{CALLED}@{HOST}:5062;transport=ws>",
        "Contact transport not udp, tcp or tls",
    ),
}


@pytest.mark.parametrize(
    ("shape", "transport"),
    [*((s, "udp") for s in UNUSABLE), ("star", "tcp"), ("port0", "tcp"), ("none", "tcp")],
)
def test_redirect_without_a_usable_contact_ends_with_503_naming_the_cause(
    lab: Lab, shape: str, transport: str
) -> None:
    scenario, contacts, cause = UNUSABLE[shape]
    carrier = lab.carrier("carrier1", "carrier_answer.xml", "udp")  # must never be asked
    clearip = lab.clearip(scenario, dict(CLEARIP_KEYS, contacts=contacts))
    proxy = lab.proxy(clearip.port, timeout=5.0)
    switch = lab.switch("uac_expect_final.xml", proxy, transport)
    lab.settle(clearip, timeout=3.0)
    carrier.stop()
    d = lab.describe
    finals = switch.final_responses()
    assert [m.status for m in finals] == [503], "never relayed as a redirect the switch would chase\n" + d()
    assert (
        finals[0].get("Reason") == f'SIP;cause=503;text="ClearIP 302 without a usable Contact ({cause})"'
    ), d()
    assert finals[0].get("Contact") is None, d()
    # At once, not after the 5 s timeout: half of it is the slack a loaded machine gets.
    assert elapsed_to_final(switch) < 5.0 / 2, d()
    assert acked(clearip, clearip.sent(302)[0]), d()
    assert carrier.received() == [], d()
    assert re.search(r'"outcome":"redirect_unusable".*"status":503.*"proxy_failed":true', proxy.output()), d()
