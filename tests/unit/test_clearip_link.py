"""The ClearIP link's connect-now on real loopback sockets: a grown backoff never delays a connect
a call asked for, and every failed attempt is reported (so the calls held for it get 503 at once)."""

from __future__ import annotations

import asyncio
import socket

from proxy_runtime.sip.framing import FramingError
from proxy_runtime.transport.clearip import ClearIpLink
from proxy_runtime.transport.stream import StreamConnection


class _Owner:
    def __init__(self) -> None:
        self.link: ClearIpLink | None = None

    def stream_opened(self, conn: StreamConnection) -> bool:
        return True

    def stream_message(self, conn: StreamConnection, data: bytes) -> None:
        pass

    def stream_framing_error(self, conn: StreamConnection, exc: FramingError) -> None:
        pass

    def stream_closed(self, conn: StreamConnection, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.connection_lost()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connect_now_cuts_a_grown_backoff_short_and_failures_are_reported() -> None:
    async def scenario() -> tuple[list[str], float, float, int]:
        loop = asyncio.get_running_loop()
        port = _free_port()
        owner = _Owner()
        states: list[bool] = []
        failures: list[str] = []
        failed, upped = asyncio.Event(), asyncio.Event()

        def on_state(up: bool) -> None:
            states.append(up)
            if up:
                upped.set()

        def on_failed(error: str) -> None:
            failures.append(error)
            failed.set()

        link = ClearIpLink(
            owner,
            host="127.0.0.1",
            port=port,
            ssl_context=None,
            server_name="127.0.0.1",
            keepalive_interval=30.0,
            reconnect_max=60.0,
            max_size=65535,
            on_state=on_state,
            on_connect_failed=on_failed,
        )
        owner.link = link
        link.start()
        await asyncio.wait_for(link.first_attempt_done.wait(), 2)
        # Calls keep asking while ClearIP refuses: each ask is an attempt now, each reported.
        for _ in range(6):
            failed.clear()
            link.connect_now()
            await asyncio.wait_for(failed.wait(), 1)
        attempts_reported = len(failures)
        # The backoff has grown to 0.25 * 2**7 = 32 s: without connect-now nothing would try again.
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", port)
        t0 = loop.time()
        link.connect_now()
        await asyncio.wait_for(upped.wait(), 5)
        took = loop.time() - t0
        up_calls = states.count(True)
        link.connect_now()  # up: nothing to do
        await asyncio.sleep(0.05)
        await link.stop()
        server.close()
        await server.wait_closed()
        return failures, took, float(attempts_reported), up_calls

    failures, took, reported, ups = asyncio.run(scenario())
    assert reported == 7 and all("Refused" in f for f in failures), failures
    # At once (a loopback connect; ~ms when quiet), where the grown backoff would wait 32 s; 2 s is
    # what a loaded 2-core machine may add.
    assert took < 2.0, took
    assert ups == 1
