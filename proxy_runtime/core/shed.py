"""The stateless overload refusal path: new INVITEs answered 503 + Retry-After while shedding.

Owns: the :class:`~.overload.OverloadControl` (fed the adapter's queue-delay signal), the To tag
of our refusals (so their ACKs are absorbed), reading a new INVITE from its bytes (the parsed
path for anything unusual), the refusal's metrics record and its once-a-second log line.
Must not touch: calls, relays, timers or transactions (it only asks whether an INVITE's server
transaction already exists, so retransmissions of admitted calls are never refused), the
network (it sends through the ``send`` callable it is given) or a clock (``now`` comes in).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container

from proxy_runtime.core.overload import (
    OverloadControl,
    ack_for_refusal,
    emergency_digits,
    overload_settings,
    refusal,
    refusal_candidate,
    refusal_tag,
    scan_invite,
)
from proxy_runtime.core.stamp import SendFn, Target, response_target, server_key, stamp_via
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.metrics.records import CallRecord
from proxy_runtime.settings import Settings
from proxy_runtime.sip.errors import ParseError
from proxy_runtime.sip.message import SipRequest

log = logging.getLogger("clearip.proxy")


class Shedder:
    """Call :meth:`receive` with every datagram before it is parsed: True when it was consumed
    (an ACK for one of our refusals, or a new INVITE refused), False to handle it as usual."""

    def __init__(
        self,
        settings: Settings,
        *,
        instance: str,
        send: SendFn,
        server_txns: Container[object],
        is_emergency: Callable[[SipRequest], bool],
        recorder: MetricsRecorder | None,
    ) -> None:
        self.control = OverloadControl(overload_settings(settings))
        self.tag = refusal_tag(instance)
        self._tag_bytes = self.tag.encode()
        self._send = send
        self._server_txns = server_txns
        self._is_emergency = is_emergency
        self._emergency_digits = emergency_digits(settings.emergency_numbers)
        self._no_request = SipRequest("INVITE", "")  # for server_key / stamp_via on a scanned Via
        self._last_log = -1e9
        self._recorder = recorder

    def update_settings(self, settings: Settings) -> None:
        self.control.update_settings(overload_settings(settings))
        self._emergency_digits = emergency_digits(settings.emergency_numbers)

    def receive(self, data: bytes, source: Target, now: float) -> bool:
        if data[:4] == b"ACK " and ack_for_refusal(data, self._tag_bytes):
            return True  # the ACK for a stateless overload refusal: nothing waits for it
        return data[:7] == b"INVITE " and self.control.shedding and self._refused(data, source, now)

    def _refused(self, data: bytes, source: Target, now: float) -> bool:
        """Refuse a new call when the controller says so. Retransmissions of admitted calls,
        in-dialog requests and emergency calls go on. The common INVITE is read from its bytes;
        anything unusual takes the reply-only parser."""
        retry_after = self.control.settings.retry_after
        scanned = scan_invite(data, self._emergency_digits)
        try:
            if scanned is not None:
                via = scanned.via
                if server_key(self._no_request, via, "INVITE") in self._server_txns:
                    return False
                if self.control.admit(now):
                    return False
                stamp_via(self._no_request, via, source)  # received= / rport on the Via alone
                target = response_target(via, source)
                out = scanned.refusal(via, self.tag, retry_after)
                call_id = scanned.call_id.decode("utf-8", "replace")
            else:
                found = refusal_candidate(data)
                if found is None:
                    return False
                req, via = found
                if server_key(req, via, "INVITE") in self._server_txns or self._is_emergency(req):
                    return False
                if self.control.admit(now):
                    return False
                stamp_via(req, via, source)
                target = response_target(req.top_via, source)
                out = refusal(req, retry_after, self.tag)
                call_id = req.call_id
        except ParseError:
            return False  # the full parse answers it
        self._send(target, out, None)
        self._account(call_id, now)
        return True

    def _account(self, call_id: str, now: float) -> None:
        if self._recorder is not None:
            self._recorder.record_call(
                CallRecord(
                    call_id=call_id,
                    clearip_outcome=None,
                    clearip_latency_ms=None,
                    carrier_attempts=0,
                    route_advances=0,
                    final_status=503,
                    post_dial_delay_ms=None,
                    emergency=False,
                    proxy_failed=True,
                    overload_rejected=True,
                    reason="proxy overloaded (queue delay)",
                ),
                log_line=False,
            )
        if now - self._last_log >= 1.0:
            self._last_log = now
            ol = self.control
            log.warning(
                "overload: requests wait %.0f ms before they are read; refusing %.0f%% of new calls "
                "with 503 (%d refused since start)",
                ol.delay * 1000,
                ol.refuse * 100,
                ol.refused,
            )
