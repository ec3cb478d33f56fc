from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.metrics.records import CallRecord


def call(n: int = 0, **kw: Any) -> CallRecord:
    """A routed call: ClearIP 302 in 12.5 ms, one carrier, 200, PDD 250 ms."""
    base: dict[str, Any] = {
        "call_id": f"call-{n}@10.0.0.1",
        "clearip_outcome": ClearIpOutcome.REDIRECT_302,
        "clearip_latency_ms": 12.5,
        "carrier_attempts": 1,
        "route_advances": 0,
        "final_status": 200,
        "post_dial_delay_ms": 250.0,
        "emergency": False,
        "proxy_failed": False,
        "caller": "+12125551234",
        "callee": "+13105559876",
        "reason": "302 -> carrier 200",
    }
    base.update(kw)
    return CallRecord(**base)


async def until(cond: Callable[[], bool], limit: float = 20.0) -> None:
    """Poll ``cond`` (state owned by other tasks) until true; fail the test after ``limit`` seconds."""
    async with asyncio.timeout(limit):
        while not cond():  # noqa: ASYNC110 - polling another task's counters is the point
            await asyncio.sleep(0.01)


# An ES256 signature is 64 bytes: 86 base64url characters. Its value does not matter (never verified).
SIGNATURE = base64.urlsafe_b64encode(bytes(range(64))).rstrip(b"=").decode()
CERT = "https://cert.clearip.example/shaken/2f7a.pem"


def b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()


def passport(
    attest: str | None = "A", *, ppt: str = "shaken", param: str | None = None, **claims: Any
) -> str:
    """An RFC 8224 Identity value as ClearIP sends it: compact JWS;info=<...>;alg=ES256;ppt=..."""
    header = {"alg": "ES256", "ppt": ppt, "typ": "passport", "x5u": CERT}
    payload: dict[str, Any] = {
        "dest": {"tn": ["13105559876"]},
        "iat": 1_764_700_000,
        "orig": {"tn": "12125551234"},
        "origid": "0b2c1c3e-5b43-4c1a-9d3a-1f2a2b3c4d5e",
    }
    if attest is not None:
        payload["attest"] = attest
    if ppt == "div":
        payload.pop("origid")
        payload["div"] = {"tn": "13105550000"}
    payload.update(claims)
    return f"{b64(header)}.{b64(payload)}.{SIGNATURE};info=<{CERT}>;alg=ES256;ppt={param or ppt}"
