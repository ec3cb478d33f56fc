"""Building responses to requests (RFC 3261 §8.2.6): the reason phrases the proxy uses and
:func:`make_response`. Sans-I/O; it must not parse bytes (that is :mod:`proxy_runtime.sip.parse`).
"""

from __future__ import annotations

from proxy_runtime.sip.message import SipRequest, SipResponse

REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    302: "Moved Temporarily",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    487: "Request Terminated",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    603: "Decline",
}


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    extra: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> SipResponse:
    """A response to ``request`` (RFC 3261 §8.2.6): Via, From, To, Call-ID, CSeq copied."""
    headers: list[list[str]] = []
    for h in request.headers:
        k = h[0]
        if k == "via" or k == "from" or k == "call-id" or k == "cseq":
            headers.append(list(h))
        elif k == "to":
            value = h[2]
            if to_tag and status > 100 and ";tag=" not in value.replace(" ", "").lower():
                value = f"{value};tag={to_tag}"
            headers.append([k, h[1], value])
    resp = SipResponse(status, reason or REASON_PHRASES.get(status, "Unknown"), headers, body)
    for name, value in extra or ():
        resp.add(name, value)
    return resp
