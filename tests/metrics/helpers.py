from __future__ import annotations

import asyncio
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
