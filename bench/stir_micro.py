"""Cost of reading the STIR/SHAKEN outcome of one call (metrics/stir.py), in microseconds.

``python -m bench.stir_micro [--calls 50000]`` times (CPU time of this process, so other load on the
machine counts less):
  * ``read_stir`` on a real-shaped outbound answer (one ~900-byte SHAKEN Identity, one ``ppt=div``),
  * ``read_stir`` on an inbound answer (a P-Asserted-Identity with ``verstat``),
  * ``MetricsRecorder.record_call`` with and without those headers (the whole per-call cost of
    metrics: counters, histograms, the JSON line formatted and handed to logging),
and prints the median of five runs per case.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import statistics
import time
from collections.abc import Callable

from proxy_runtime.metrics.names import ClearIpOutcome
from proxy_runtime.metrics.recorder import CALL_LOGGER, MetricsRecorder
from proxy_runtime.metrics.records import CallRecord
from proxy_runtime.metrics.stir import read_stir


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()


def _identity(ppt: str, attest: str | None) -> str:
    header = {"alg": "ES256", "ppt": ppt, "typ": "passport", "x5u": "https://cert.example/shaken/2f7a.pem"}
    payload: dict[str, object] = {
        "dest": {"tn": ["13105559876"]},
        "iat": 1764700000,
        "orig": {"tn": "12125551234"},
        "origid": "0b2c1c3e-5b43-4c1a-9d3a-1f2a2b3c4d5e",
    }
    if attest:
        payload["attest"] = attest
    sig = base64.urlsafe_b64encode(bytes(64)).rstrip(b"=").decode()
    return f"{_b64(header)}.{_b64(payload)}.{sig};info=<https://cert.example/shaken/2f7a.pem>;alg=ES256;ppt={ppt}"


OUTBOUND = (_identity("shaken", "A"), _identity("div", None))
INBOUND = ('"[V] Alice" <sip:+12025550100;verstat=TN-Validation-Passed@clearip.example;user=phone>',)


def _record(**kw: object) -> CallRecord:
    base: dict[str, object] = {
        "call_id": "a84b4c76e66710@10.0.0.5",
        "clearip_outcome": ClearIpOutcome.REDIRECT_302,
        "clearip_latency_ms": 12.3,
        "carrier_attempts": 1,
        "route_advances": 0,
        "final_status": 200,
        "post_dial_delay_ms": 250.0,
        "emergency": False,
        "proxy_failed": False,
        "caller": "+12125551234",
        "callee": "+13105559876",
        "reason": "302 -> carrier 200",
        "carrier": "192.0.2.10:5060",
    }
    base.update(kw)
    return CallRecord(**base)  # type: ignore[arg-type]


def _time(fn: Callable[[], object], n: int) -> float:
    runs = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        runs.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--calls", type=int, default=50_000)
    n = ap.parse_args().calls
    rec = MetricsRecorder(proxy_id="bench")
    plain, signed, verified = _record(), _record(identity=OUTBOUND), _record(pai=INBOUND)

    # The per-call line is formatted as in production (logger at INFO) and dropped by a NullHandler.
    call_log = logging.getLogger(CALL_LOGGER)
    call_log.setLevel(logging.INFO)
    call_log.propagate = False
    call_log.addHandler(logging.NullHandler())

    def whole(r: CallRecord) -> Callable[[], object]:
        return lambda: rec.record_call(r)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("read_stir: SHAKEN + div Identity (outbound)", lambda: read_stir(OUTBOUND, ())),
        ("read_stir: PAI verstat (inbound)", lambda: read_stir((), INBOUND)),
        ("record_call + line, no STIR headers", whole(plain)),
        ("record_call + line, outbound", whole(signed)),
        ("record_call + line, inbound", whole(verified)),
    ]
    print(f"{'case':48} us/call  (median of 5 x {n})")
    for name, fn in cases:
        print(f"{name:48} {_time(fn, n):7.2f}")


if __name__ == "__main__":
    main()
