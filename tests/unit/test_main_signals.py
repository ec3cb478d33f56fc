"""The process's signal handlers are in place before anything listens.

A supervisor or an operator acts as soon as the proxy is reachable (the control socket exists,
the "ready" line is logged). A SIGUSR1 (toggle a trace) or SIGHUP (reload) that arrives in between
would otherwise meet the default action, and SIGUSR1's default kills the process (seen once in CI:
the proxy exited -10 right after its control socket appeared).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from proxy_runtime.__main__ import run_proxy
from proxy_runtime.operations.control import ENV_SOCKET
from proxy_runtime.settings import Settings, load, validate
from proxy_runtime.transport.server import ProxyServer

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def test_handlers_are_installed_before_the_listeners_open_and_removed_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[signal.Signals, Any] = {}

    async def start(self: ProxyServer) -> None:
        for sig in SIGNALS:
            seen[sig] = signal.getsignal(sig)
        raise OSError("address in use (test)")

    monkeypatch.setattr(ProxyServer, "start", start)
    settings = validate(Settings(proxy_id="x", metrics="off"))
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}

    assert asyncio.run(run_proxy(settings)) == 1

    assert set(seen) == set(SIGNALS)
    for sig in SIGNALS:
        assert seen[sig] not in (signal.SIG_DFL, signal.SIG_IGN, before[sig]), sig
        assert signal.getsignal(sig) == before[sig], f"{sig.name} left installed after the run"


def test_a_sigterm_during_start_up_still_stops_the_proxy_once_it_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGTERM that lands while the listeners open is not lost: the proxy drains and stops."""
    real_start = ProxyServer.start

    async def start(self: ProxyServer) -> None:
        # Without a handler SIGTERM would end the test run itself, so this checks first.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0)  # let the loop run the handler
        await real_start(self)

    monkeypatch.setattr(ProxyServer, "start", start)
    monkeypatch.setenv(ENV_SOCKET, "off")
    settings = load(
        None,
        environ={},
        overrides={
            "proxy_id": "x",
            "metrics": "off",
            "udp": ["127.0.0.1:0"],
            "clearip": "sip:127.0.0.1:9;transport=tcp",  # nothing listens: the link just retries
            "drain_timeout": 1.0,
        },
    )

    async def bounded() -> int:
        return await asyncio.wait_for(run_proxy(settings), timeout=20)

    assert asyncio.run(bounded()) == 0
