"""The ClearIP gate, sans-I/O: is the link up, may this call ask ClearIP, who waits for the link.

Every call that needs ClearIP passes here before its INVITE goes out (DESIGN §2, docs/FAULTS.md):

- **The link.** Whether the adapter's ClearIP connection is up (``up``, the ``ClearIpConnected``
  gauge). A call that finds it down is *held* while the adapter connects now, whatever its
  reconnect backoff (the need-link action); when the link comes up the held calls go to ClearIP,
  when the connect fails they get 503 at once. Without an adapter that can connect (``need_link``
  None) nobody is held and such a call gets 503 at once.
- **ClearIP's refusal** of this proxy (403: not whitelisted), logged loudly once a minute.
- **The brownout breaker** (:class:`~.breaker.Breaker`): its word on each call (send, probe,
  reject, counted as ``ClearIpBreakerRejected``), fed with ClearIP's answers and timeouts, and its
  state published as the ``ClearIpBreakerOpen`` gauge and one log line per move.

Owns: the link flag, the held calls (by server transaction key), the breaker and its publication,
the need-link action, the 403 alarm.

Must not touch: what a held call does when it is released (the call decides, through
:meth:`~.call.Call.ask_clearip` and :meth:`~.call.Call.link_failed`), the calls table and the calls
in flight on a lost link (the dispatcher ends those), transactions, timers, the network or the
clock (``now`` is always an argument).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from proxy_runtime.core.breaker import Admission, Breaker, BreakerState, breaker_settings
from proxy_runtime.core.call import Call
from proxy_runtime.metrics import names
from proxy_runtime.metrics.recorder import MetricsRecorder
from proxy_runtime.settings import Settings

# The dispatcher's logger: the breaker's lines read as they did when ProxyCore wrote them.
log = logging.getLogger("clearip.proxy")


class ClearIpGate:
    """The ClearIP link, the calls held for it and the brownout breaker (see the module's docstring)."""

    __slots__ = (
        "_advertise",
        "_breaker_moves",
        "_held",
        "_last_403_log",
        "_need_link",
        "_recorder",
        "breaker",
        "up",
    )

    def __init__(
        self,
        settings: Settings,
        recorder: MetricsRecorder | None,
        need_link: Callable[[], None] | None,
        *,
        advertise: str,
    ) -> None:
        # The core's one action besides sending: "a call needs the ClearIP link, connect now".
        # The adapter connects and answers with link_changed(True) or unreachable().
        self._need_link = need_link
        self._recorder = recorder
        self._held: dict[object, Call] = {}  # calls waiting for the link, by server transaction key
        self.breaker = Breaker(breaker_settings(settings))
        self._breaker_moves = 0
        self.up = False
        self._advertise = advertise  # this proxy's public address, as ClearIP's whitelist sees it
        self._last_403_log = -1e9

    def update(self, settings: Settings) -> None:
        """Hot reload: the breaker's settings (turning it off closes it)."""
        self.breaker.update(breaker_settings(settings))
        self._publish_breaker()

    # =========================================================================================
    # The link and who waits for it
    # =========================================================================================
    @property
    def can_wait(self) -> bool:
        """Whether a call that finds the link down may be held (an adapter can connect now)."""
        return self._need_link is not None

    def hold(self, call: Call) -> None:
        """Hold ``call`` until the link is up (or the connect fails) and ask the adapter for it."""
        self._held[call.st.key] = call
        if self._need_link is not None:
            self._need_link()

    def forget(self, call: Call) -> None:
        """``call`` ended (answered, cancelled, its wait for the link ran out): not held any more."""
        self._held.pop(call.st.key, None)

    def link_changed(self, up: bool, now: float) -> bool:
        """The ClearIP connection went up or down. Up: the held calls go to ClearIP now. Returns
        True when the link was lost (the dispatcher then ends every call waiting on ClearIP)."""
        was = self.up
        self.up = up
        if self._recorder is not None:
            self._recorder.set_gauge(names.CLEARIP_CONNECTED, 1.0 if up else 0.0)
        if up:
            held, self._held = self._held, {}
            for call in held.values():
                call.ask_clearip(now)
        return was and not up

    def unreachable(self, now: float) -> None:
        """The adapter's connect failed: every held call gets 503 now ("ClearIP down" at once)."""
        for call in list(self._held.values()):
            call.link_failed(now)

    # =========================================================================================
    # The brownout breaker
    # =========================================================================================
    def admit(self, now: float) -> Admission:
        """The breaker's word on a call that needs ClearIP."""
        admission = self.breaker.admit(now)
        self._publish_breaker()  # the cool-off may have ended: half-open
        if admission is Admission.REJECT and self._recorder is not None:
            self._recorder.incr(names.CLEARIP_BREAKER_REJECTED)
        return admission

    def answered(self, now: float) -> None:
        """ClearIP answered a call (any final): the breaker closes."""
        self.breaker.on_answer(now)
        self._publish_breaker()

    def timed_out(self, now: float, *, probe: bool) -> None:
        """ClearIP did not answer a call within ``timeout``."""
        self.breaker.on_timeout(now, probe=probe)
        self._publish_breaker()

    def forbidden(self, now: float) -> None:
        """ClearIP answered 403: this proxy is not whitelisted. Logged loudly, once a minute."""
        if now - self._last_403_log >= 60:
            self._last_403_log = now
            log.error(
                "ClearIP answered 403 Forbidden: this proxy's public address (%s) is not whitelisted "
                "in the ClearIP account; calls are being refused",
                self._advertise,
            )

    def _publish_breaker(self) -> None:
        """The breaker's state as the ClearIpBreakerOpen gauge, and a log line, when it moved."""
        b = self.breaker
        if b.transitions == self._breaker_moves:
            return
        self._breaker_moves = b.transitions
        if self._recorder is not None:
            self._recorder.set_gauge(names.CLEARIP_BREAKER_OPEN, 1.0 if b.tripped else 0.0)
        st = b.settings
        if b.state is BreakerState.OPEN:
            log.warning(
                "ClearIP breaker open: ClearIP did not answer %d calls in a row; answering 503 at once "
                "for %g s",
                st.threshold,
                st.cool_off,
            )
        elif b.state is BreakerState.HALF_OPEN:
            log.warning(
                "ClearIP breaker half-open: one call in %d goes to ClearIP as a probe", st.probe_every
            )
        else:
            log.warning("ClearIP breaker closed: ClearIP answers again")
