"""Emergency calls are never refused for a drain or for load: with ``emergency_action = route``
they still go to the emergency route, with ``reject`` they get the emergency answer (no
Retry-After, which would tell the switch to keep away from the proxy)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy_runtime.core.proxy import CLEARIP, ProxyCore
from proxy_runtime.settings import load
from proxy_runtime.sip.message import SipRequest, SipResponse
from tests.unit.test_proxy_core import SWITCH, Net, invite, to_clearip

ROUTE = "sip:911@192.0.2.99:5060"


def make_core(**overrides: object) -> tuple[ProxyCore, Net]:
    s = load(environ={}, overrides={"allow": ["10.0.0.0/8", "192.0.2.0/24"], "timeout": 5})
    s = replace(s, **overrides)  # type: ignore[arg-type]
    net = Net()
    core = ProxyCore(s, net, advertise="203.0.113.7", ports={"udp": 5060, "tcp": 5060}, instance="t35t")
    core.set_clearip_up(True, 0.0)
    return core, net


@pytest.mark.parametrize("state", ["draining", "full"])
def test_an_emergency_call_is_routed_while_draining_or_full(state: str) -> None:
    core, net = make_core(emergency_action="route", emergency_route=ROUTE, max_in_flight=1)
    if state == "draining":
        core.start_drain()
    else:
        to_clearip(core, net)  # the one call max_in_flight allows
        net.take()
        core.receive(invite(branch="z9hG4bKsw2").replace(b"call-1", b"call-2"), SWITCH, 0.1)
        assert 503 in [m.status for _, m in net.take() if isinstance(m, SipResponse)]  # an ordinary call
    core.receive(invite("911", branch="z9hG4bKsw9").replace(b"call-1", b"call-9"), SWITCH, 0.2)
    out = net.take()
    finals = [m.status for _, m in out if isinstance(m, SipResponse)]
    assert finals == [100]
    assert [m.uri for t, m in out if isinstance(m, SipRequest) and t.host == "192.0.2.99"] == [ROUTE]
    assert not [t for t, _ in out if t.transport == CLEARIP]


def test_a_rejected_emergency_call_gets_no_retry_after_while_draining() -> None:
    core, net = make_core(max_in_flight=1)
    core.start_drain()
    core.receive(invite("911"), SWITCH, 0.0)
    finals = [m for _, m in net.take() if isinstance(m, SipResponse) and m.status >= 200]
    assert [m.status for m in finals] == [503]
    assert finals[0].get("retry-after") is None
