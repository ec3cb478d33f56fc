"""The stream connection's own guards: the malformed-message budget per window (fake clock), an
owner exception contained on a real loopback connection, and TLS spoken to a plain TCP port."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import pytest

from proxy_runtime.sip.framing import FramingError
from proxy_runtime.transport.stream import ERROR_BUDGET, ERROR_WINDOW, ErrorBudget, StreamConnection

DAY = 86400.0


def test_budget_closes_after_ten_errors_within_the_window() -> None:
    b = ErrorBudget()
    assert not any(b.spend(0.1 * i) for i in range(ERROR_BUDGET - 1))
    assert b.spend(0.1 * ERROR_BUDGET)


def test_budget_never_runs_out_for_errors_spread_over_days() -> None:
    b = ErrorBudget()
    # One malformed message an hour for a week: a long-lived trunk keeps its connection.
    assert not any(b.spend(h * 3600.0) for h in range(7 * 24))
    # Even a burst of nine, then one more after the window, stays under it.
    t = 8 * DAY
    assert not any(b.spend(t + i) for i in range(ERROR_BUDGET - 1))
    assert not b.spend(t + ERROR_WINDOW + 10)


class _Owner:
    """Accepts every connection; raises on a message containing b"BOOM"; records the rest."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.closed: list[StreamConnection] = []

    def stream_opened(self, conn: StreamConnection) -> bool:
        return True

    def stream_message(self, conn: StreamConnection, data: bytes) -> None:
        if b"BOOM" in data:
            raise RuntimeError("a bug in the core")
        self.messages.append(data)

    def stream_framing_error(self, conn: StreamConnection, exc: FramingError) -> None:
        pass

    def stream_closed(self, conn: StreamConnection, exc: Exception | None) -> None:
        self.closed.append(conn)


def _msg(tag: str) -> bytes:
    return f"OPTIONS sip:x SIP/2.0\r\nCall-ID: {tag}\r\nContent-Length: 0\r\n\r\n".encode()


def test_an_owner_exception_costs_one_message_not_the_connection_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[list[bytes], bool, bool]:
        loop = asyncio.get_running_loop()
        owner = _Owner()
        conns: list[StreamConnection] = []

        def factory() -> StreamConnection:
            c = StreamConnection(owner, "clearip", outbound=True, max_size=65535, clock=loop.time)
            conns.append(c)
            return c

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_msg("one") + _msg("BOOM-1") + _msg("two"))
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(_msg("BOOM-2") + _msg("three"))
        await writer.drain()
        await asyncio.sleep(0.1)
        open_after = not conns[0].closed and not writer.is_closing()
        writer.write(b"\r\n\r\n")  # still answering keep-alives: the connection is alive
        await writer.drain()
        pong = await asyncio.wait_for(reader.readexactly(2), 1.0)
        writer.close()
        server.close()
        await server.wait_closed()
        return owner.messages, open_after, pong == b"\r\n"

    with caplog.at_level(logging.ERROR, logger="clearip.transport"):
        messages, open_after, ponged = asyncio.run(scenario())
    assert [m.split(b"Call-ID: ")[1].split(b"\r\n")[0] for m in messages] == [b"one", b"two", b"three"]
    assert open_after and ponged
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # the second one is only counted
    assert errors[0].exc_info is not None and "a bug in the core" in str(errors[0].exc_info[1])


def test_tls_to_the_plain_tcp_port_is_refused_at_once() -> None:
    async def scenario() -> tuple[float, BaseException | None]:
        loop = asyncio.get_running_loop()
        owner = _Owner()
        server = await loop.create_server(
            lambda: StreamConnection(owner, "tcp", outbound=False, max_size=65535, clock=loop.time),
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        t0 = time.monotonic()
        err: BaseException | None = None
        try:
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 3.0)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            err = exc
        took = time.monotonic() - t0
        server.close()
        await server.wait_closed()
        return took, err

    took, err = asyncio.run(scenario())
    assert err is not None and not isinstance(err, TimeoutError), err
    # Closed at once (not held until the client's 3 s timeout); 2 s is a loaded machine's slack.
    assert took < 2.0, took
