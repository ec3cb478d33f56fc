"""TLS on both sides, with a test CA made at test time (tests/integration/conftest.py ``pki``).

This SIPp (Debian sip-tester 3.6.1) is built without OpenSSL (``-t l1`` is refused), so the TLS
switch is a small Python SIP client (harness.SipStreamClient), and the TLS ClearIP is a Python TLS
server relaying byte for byte to the usual SIPp ClearIP UAS over TCP (harness.TlsRelay)."""

from __future__ import annotations

import ssl
import uuid
import warnings

import pytest

from tests.integration.flows import CALLED, CLEARIP_KEYS, IDENTITY_1, IDENTITY_2, first_invite
from tests.integration.harness import (
    CALLER_IDENTITY,
    HOST,
    Lab,
    Pki,
    SipMessage,
    Sipp,
    SipStreamClient,
    TlsRelay,
    contact_list,
    make_test_pki,
)

pytestmark = pytest.mark.sipp


def _tls_invite(client: SipStreamClient, proxy_port: int, call_id: str, branch: str) -> str:
    lp = client.local_port
    sdp = "v=0\no=switch 1 1 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 40000 RTP/AVP 0\n"
    client.send(
        f"INVITE sip:{CALLED}@{HOST}:{proxy_port};transport=tls SIP/2.0\n"
        f"Via: SIP/2.0/TLS {HOST}:{lp};branch=z9hG4bK{branch};rport\n"
        "Max-Forwards: 70\n"
        f"From: <sip:+12025550100@{HOST}>;tag=tls-sw-1\n"
        f"To: <sip:{CALLED}@{HOST}>\n"
        f"Call-ID: {call_id}\n"
        "CSeq: 1 INVITE\n"
        f"Contact: <sip:switch@{HOST}:{lp};transport=tls>\n"
        f"Identity: {CALLER_IDENTITY}\n"
        "Content-Type: application/sdp\n"
        "Content-Length: {len}\n\n" + sdp
    )
    return f"<sip:{CALLED}@{HOST}>"


def _in_dialog(client: SipStreamClient, method: str, cseq: int, ok: SipMessage, call_id: str) -> None:
    lp = client.local_port
    contact = (ok.get("Contact") or "").strip()
    target = contact[contact.find("<") + 1 : contact.find(">")] if "<" in contact else contact
    routes = "".join(f"Route: {rr}\n" for rr in reversed(ok.all("Record-Route")))
    client.send(
        f"{method} {target} SIP/2.0\n"
        f"Via: SIP/2.0/TLS {HOST}:{lp};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\n"
        "Max-Forwards: 70\n"
        f"From: <sip:+12025550100@{HOST}>;tag=tls-sw-1\n"
        f"To: {ok.get('To')}\n"
        f"Call-ID: {call_id}\n"
        f"CSeq: {cseq} {method}\n" + routes + "Content-Length: 0\n\n"
    )


def test_switch_over_tls_call_with_identity_at_the_carrier(lab: Lab, pki: Pki) -> None:
    carrier = lab.carrier("carrier1", "carrier_answer.xml", "udp")
    keys = dict(CLEARIP_KEYS, contacts=contact_list([(CALLED, carrier, 1.0)]))
    clearip = lab.clearip("clearip_302.xml", keys)
    proxy = lab.proxy(clearip.port, tls=True, tls_cert=pki.server_cert, tls_key=pki.server_key)
    client = SipStreamClient(proxy.tls_port, tls_ca=pki.ca_cert)
    lab.add_closer(client)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
    call_id = f"{uuid.uuid4()}@tls-switch"
    _tls_invite(client, proxy.tls_port, call_id, "tlsinv1")
    final = client.recv_until(lambda m: not m.is_request and m.status >= 200, timeout=8)
    d = lab.describe
    assert final is not None and final.status == 200, f"{final}\n{[str(m) for m in client.log]}\n{d()}"
    assert final.all("Record-Route"), d()
    _in_dialog(client, "ACK", 1, final, call_id)
    _in_dialog(client, "BYE", 2, final, call_id)
    bye_ok = client.recv_until(lambda m: not m.is_request and m.cseq == (2, "BYE"), timeout=5)
    assert bye_ok is not None and bye_ok.status == 200, f"{[str(m) for m in client.log]}\n{d()}"
    lab.settle(clearip, carrier)
    at_carrier = first_invite(carrier)
    assert at_carrier.all("Identity") == [IDENTITY_1, IDENTITY_2], d()
    assert carrier.received("ACK") and carrier.received("BYE"), d()


def test_options_over_tls_gets_200(lab: Lab, pki: Pki) -> None:
    clearip = lab.clearip("clearip_302.xml", dict(CLEARIP_KEYS, contacts=f"<sip:{HOST}:9>"))
    proxy = lab.proxy(clearip.port, tls=True, tls_cert=pki.server_cert, tls_key=pki.server_key)
    client = SipStreamClient(proxy.tls_port, tls_ca=pki.ca_cert)
    lab.add_closer(client)
    lp = client.local_port
    client.send(
        f"OPTIONS sip:{HOST}:{proxy.tls_port};transport=tls SIP/2.0\n"
        f"Via: SIP/2.0/TLS {HOST}:{lp};branch=z9hG4bKtlsopt1;rport\n"
        "Max-Forwards: 70\n"
        f"From: <sip:monitor@{HOST}>;tag=o1\n"
        f"To: <sip:{HOST}:{proxy.tls_port}>\n"
        f"Call-ID: {uuid.uuid4()}@tls-options\n"
        "CSeq: 1 OPTIONS\n"
        "Content-Length: 0\n\n"
    )
    resp = client.recv(5)
    assert resp is not None and resp.status == 200, lab.describe()
    assert clearip.received() == []


def _clearip_over_tls(lab: Lab, pki: Pki, ca_for_proxy: object) -> tuple[Sipp, Sipp, TlsRelay, object]:
    carrier = lab.carrier("carrier1", "carrier_answer.xml", "udp")
    keys = dict(CLEARIP_KEYS, contacts=contact_list([(CALLED, carrier, 1.0)]))
    clearip = lab.clearip("clearip_302.xml", keys)
    relay = TlsRelay(pki, clearip.port)
    lab.add_closer(relay)
    return carrier, clearip, relay, ca_for_proxy


def test_clearip_over_tls_with_test_ca(lab: Lab, pki: Pki) -> None:
    carrier, clearip, relay, _ = _clearip_over_tls(lab, pki, pki.ca_cert)
    proxy = lab.proxy(relay.port, clearip=f"sip:localhost:{relay.port};transport=tls", clearip_ca=pki.ca_cert)
    switch = lab.switch("uac_call.xml", proxy, "udp")
    lab.settle(clearip, carrier)
    d = lab.describe
    assert relay.connections >= 1 and not relay.handshake_errors, f"{relay.handshake_errors}\n{d()}"
    assert all(v in ("TLSv1.2", "TLSv1.3") for v in relay.tls_versions), relay.tls_versions
    assert [m.status for m in switch.final_responses()] == [200], d()
    assert first_invite(carrier).all("Identity") == [IDENTITY_1, IDENTITY_2], d()
    assert clearip.received("ACK"), d()
    assert switch.exit_code == 0, d()


def test_clearip_over_tls_with_untrusted_certificate_gives_503(lab: Lab, pki: Pki, tmp_path) -> None:
    """The proxy trusts another CA: the handshake must fail, and calls get 503 at once, not a hang."""
    other = make_test_pki(tmp_path / "other-ca")
    carrier, clearip, relay, _ = _clearip_over_tls(lab, pki, other.ca_cert)
    proxy = lab.proxy(
        None,
        wait_clearip=False,
        clearip=f"sip:localhost:{relay.port};transport=tls",
        clearip_ca=other.ca_cert,
        timeout=6.0,
    )
    switch = lab.switch("uac_expect_final.xml", proxy, "udp")
    d = lab.describe
    assert [m.status for m in switch.final_responses()] == [503], d()
    finals = switch.final_responses()
    # At once, not after the 6 s timeout: half of it is the slack a loaded machine gets.
    assert finals[0].time - switch.sent("INVITE")[0].time <= 6.0 / 2, d()
    assert clearip.received() == [], "nothing may reach ClearIP over an unverified connection\n" + d()
    assert carrier.received() == [], d()


def test_clearip_that_speaks_only_tls_1_1_is_refused_with_503(lab: Lab, pki: Pki) -> None:
    """The proxy's ClearIP client must not fall back below TLS 1.2. The ClearIP side here speaks
    TLS 1.0-1.1 only (a server that *can* negotiate them, unlike the relay above), so a proxy
    whose client accepted TLS 1.1 would connect and complete the call; it must fail the handshake
    and answer 503 instead."""
    carrier = lab.carrier("carrier1", "carrier_answer.xml", "udp")
    clearip = lab.clearip(
        "clearip_302.xml", dict(CLEARIP_KEYS, contacts=contact_list([(CALLED, carrier, 1.0)]))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    relay = TlsRelay(pki, clearip.port, versions=old)
    lab.add_closer(relay)
    proxy = lab.proxy(
        None,
        wait_clearip=False,
        clearip=f"sip:localhost:{relay.port};transport=tls",
        clearip_ca=pki.ca_cert,
        timeout=3.0,
    )
    switch = lab.switch("uac_expect_final.xml", proxy, "udp")
    d = lab.describe
    assert [m.status for m in switch.final_responses()] == [503], d()
    assert relay.connections == 0 and relay.handshake_errors, f"{relay.tls_versions}\n{d()}"
    assert clearip.received() == [] and carrier.received() == [], d()
