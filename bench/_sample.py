import base64, os
def realistic_invite() -> bytes:
    ident = lambda n: base64.urlsafe_b64encode(bytes((i*7+n)%256 for i in range(600))).decode().rstrip("=")
    ids = [f"{ident(n)[:300]}.{ident(n+1)[:250]}.{ident(n+2)[:250]};info=<https://cert.example.org/sti/cert{n}.pem>;alg=ES256;ppt=shaken" for n in (1, 2)]
    sdp = ("v=0\r\no=- 1234567890 1234567890 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\n"
           "m=audio 20000 RTP/AVP 0 8 18 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:18 G729/8000\r\n"
           "a=fmtp:18 annexb=no\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n").encode()
    head = (
        "INVITE sip:+12125551234@carrier.example.net:5060;user=phone SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-524287-1---a1b2c3d4e5f6;rport\r\n"
        "Via: SIP/2.0/UDP 198.51.100.10:5060;received=198.51.100.10;branch=z9hG4bK776asdhds\r\n"
        "Max-Forwards: 69\r\n"
        "Record-Route: <sip:203.0.113.5;lr;ftag=as5d6f7g>\r\n"
        "From: \"ACME Corp\" <sip:+13035551111@switch.example.com;user=phone>;tag=as5d6f7g\r\n"
        "To: <sip:+12125551234@carrier.example.net;user=phone>\r\n"
        "Call-ID: 7c3f8a1e-4b2d-11ee-9f3a-0242ac120002@198.51.100.10\r\n"
        "CSeq: 102 INVITE\r\n"
        "Contact: <sip:+13035551111@198.51.100.10:5060;transport=udp>\r\n"
        "P-Asserted-Identity: <sip:+13035551111@switch.example.com;user=phone>\r\n"
        f"Identity: {ids[0]}\r\n"
        f"Identity: {ids[1]}\r\n"
        "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, INFO, REFER, NOTIFY\r\n"
        "Supported: replaces, timer, 100rel\r\n"
        "Session-Expires: 1800;refresher=uac\r\n"
        "Min-SE: 90\r\n"
        "User-Agent: ACME-Switch/4.2\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n"
    )
    return head.encode() + sdp
