"""The UDP listener (transport/udp.py) on real loopback sockets: batches, the kernel's receive
timestamp as the queue delay, oversized datagrams, sending."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from proxy_runtime.transport.udp import BATCH, RATE_WINDOW, UdpSocket, bound_socket
from tests.integration.harness import HOST


def test_batches_report_the_standing_queue_delay_and_deliver_every_datagram() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        got: list[tuple[bytes, tuple[str, int]]] = []
        delays: list[float] = []
        batches: list[int] = []
        udp = UdpSocket(
            bound_socket(HOST, 0),
            loop,
            lambda d, a: got.append((d, a)),
            max_size=1500,
            on_queue_delay=delays.append,
            on_batch_done=lambda: batches.append(len(got)),
        )
        try:
            assert udp.timestamps
            # The kernel turns on arrival stamps asynchronously when the first socket asks for
            # them (until then a datagram is stamped when read): give it a moment.
            await asyncio.sleep(0.1)
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.bind((HOST, 0))
            n = BATCH + 10
            for i in range(n):
                sender.sendto(b"m%d" % i, udp.sockname)
            sender.sendto(b"x" * 3000, udp.sockname)  # larger than max_size: seen as such
            # Block the loop: the datagrams wait in the kernel's queue, a measurable delay.
            time.sleep(0.2)  # noqa: ASYNC251
            deadline = loop.time() + 2
            while len(got) < n + 1 and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            assert [d for d, _ in got[:n]] == [b"m%d" % i for i in range(n)]
            assert len(got[n][0]) == 1501  # truncated one byte past the limit: the adapter answers 513
            assert all(a == sender.getsockname() for _, a in got)
            assert batches[0] == BATCH  # at most BATCH per wake-up, then the loop runs other work
            # The first batch stopped at BATCH with more waiting: its last datagram waited about
            # 0.2 s. The second emptied the socket: no standing queue, delay 0 (and so does the
            # read after the coalescing pause, which finds the socket empty).
            assert 0.15 < delays[0] < 2.0
            assert delays[1:] and all(d == 0.0 for d in delays[1:])
            # Sending: straight out of the same socket.
            udp.sendto(b"reply", sender.getsockname())
            sender.settimeout(2)
            data, addr = sender.recvfrom(100)
            assert data == b"reply" and addr == udp.sockname
            sender.close()
        finally:
            udp.close()
        assert udp.closed
        udp.sendto(b"late", ("127.0.0.1", 9))  # after close: ignored, no exception

    asyncio.run(scenario())


def _paced_sender(dest: tuple[str, int], n: int, gap: float) -> threading.Thread:
    """Sends ``n`` datagrams ``gap`` seconds apart from a thread (the loop keeps running)."""

    def run() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            t = time.monotonic()
            for i in range(n):
                while time.monotonic() < t:  # busy-wait: sleep() is too coarse for 0.2 ms
                    pass
                s.sendto(b"p%d" % i, dest)
                t += gap

    th = threading.Thread(target=run)
    th.start()
    return th


def test_close_datagrams_are_read_in_coalesced_batches_and_a_lone_one_at_once() -> None:
    """Datagrams 0.2 ms apart: once the rate is known (RATE_WINDOW), the socket is read at most
    about once per COALESCE, several per wake-up (without coalescing every datagram is its own
    wake-up); all are delivered in order, and one that comes after a quiet spell is read at once
    and starts no pause."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        batches: list[int] = []
        udp = UdpSocket(
            bound_socket(HOST, 0),
            loop,
            lambda d, a: got.append(d),
            max_size=1500,
            on_queue_delay=lambda d: None,
            on_batch_done=lambda: batches.append(len(got)),
        )
        try:
            n = 200
            th = _paced_sender(udp.sockname, n, 0.0002)  # 40 ms in all
            deadline = loop.time() + 5
            while len(got) < n and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            th.join()
            assert got == [b"p%d" % i for i in range(n)]
            # The first 10 ms read datagram by datagram (about 50), the next 30 ms about once per
            # ms: far fewer wake-ups than datagrams.
            assert len(batches) <= n // 2, batches
            assert udp.pauses > 0
            # A quiet spell, then one datagram: no pause is pending, so it is read on arrival,
            # and a lone datagram starts no pause (at low rates coalescing costs nothing).
            await asyncio.sleep(5 * RATE_WINDOW)
            assert not udp.paused
            before, pauses = len(batches), udp.pauses
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"lone", udp.sockname)
            deadline = loop.time() + 2
            while got[-1] != b"lone" and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            assert got[-1] == b"lone" and len(batches) == before + 1
            assert udp.pauses == pauses
        finally:
            udp.close()

    asyncio.run(scenario())
