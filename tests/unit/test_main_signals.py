"""The process's signal handlers are in place before anything listens.

A supervisor or an operator acts as soon as the proxy is reachable (the control socket exists,
the "ready" line is logged). A SIGUSR1 (toggle a trace) or SIGHUP (reload) that arrives in between
would otherwise meet the default action, and SIGUSR1's default kills the process (seen once in CI:
the proxy exited -10 right after its control socket appeared).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from proxy_runtime.__main__ import load_settings, run_proxy
from proxy_runtime.operations.control import ENV_SOCKET
from proxy_runtime.settings import Settings, load, validate
from proxy_runtime.transport import gcpolicy
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


@pytest.fixture
def quiet_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_proxy without the process-wide parts that would outlive the test: the GC policy (it
    freezes the heap and switches off full collections for the whole pytest process) and the
    control socket."""

    async def no_collections(interval: float = 0.0) -> None:
        return None

    monkeypatch.setattr(gcpolicy, "apply", lambda: None)
    monkeypatch.setattr(gcpolicy, "collect_periodically", no_collections)
    monkeypatch.setenv(ENV_SOCKET, "off")


UP = {
    "proxy_id": "x",
    "metrics": "off",
    "udp": ["127.0.0.1:0"],
    "clearip": "sip:127.0.0.1:9;transport=tcp",  # nothing listens: the link just retries
    "drain_timeout": 1.0,
}


def _run(settings: Settings, config_args: argparse.Namespace | None = None) -> int:
    async def bounded() -> int:
        return await asyncio.wait_for(run_proxy(settings, config_args), timeout=20)

    return asyncio.run(bounded())


def _signal_self(sig: signal.Signals) -> None:
    # Without a handler the signal would end the test run itself, so this checks first.
    assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN), sig
    os.kill(os.getpid(), sig)


@pytest.mark.usefixtures("quiet_runtime")
def test_a_sigterm_during_start_up_still_stops_the_proxy_once_it_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGTERM that lands while the listeners open is not lost: the proxy drains and stops."""
    real_start = ProxyServer.start

    async def start(self: ProxyServer) -> None:
        _signal_self(signal.SIGTERM)
        await asyncio.sleep(0)  # let the loop run the handler
        await real_start(self)

    monkeypatch.setattr(ProxyServer, "start", start)
    assert _run(load(None, environ={}, overrides=UP)) == 0


@pytest.mark.usefixtures("quiet_runtime")
def test_a_sighup_during_start_up_reloads_the_whole_file_once_the_proxy_is_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Mid start-up the server is being built from the settings it was given: a SIGHUP then is
    applied once the proxy is up (not dropped, not half-applied), then SIGTERM stops it."""
    config = tmp_path / "proxy.toml"
    config.write_text("timeout = 7.0\nring_timeout = 90.0\n")
    real_start = ProxyServer.start
    reloaded: list[Settings] = []
    real_reload = ProxyServer.reload

    async def start(self: ProxyServer) -> None:
        _signal_self(signal.SIGHUP)
        await asyncio.sleep(0.1)  # the loop reads the signal's wake-up and runs the handler
        assert reloaded == []  # not while the server is being built
        await real_start(self)
        asyncio.get_running_loop().call_later(0.2, _signal_self, signal.SIGTERM)

    def reload(self: ProxyServer, new: Settings) -> list[str]:
        reloaded.append(new)
        return real_reload(self, new)

    monkeypatch.setattr(ProxyServer, "start", start)
    monkeypatch.setattr(ProxyServer, "reload", reload)
    monkeypatch.setenv("CLEARIP_PROXY_CONFIG", str(config))
    for key, value in UP.items():
        monkeypatch.setenv(
            f"CLEARIP_PROXY_{key.upper()}", str(value[0] if isinstance(value, list) else value)
        )
    args = argparse.Namespace(config=str(config))
    assert _run(load_settings(args), args) == 0
    assert [(s.timeout, s.ring_timeout) for s in reloaded] == [(7.0, 90.0)]
