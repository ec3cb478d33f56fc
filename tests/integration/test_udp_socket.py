"""The UDP listener (transport/udp.py) on real loopback sockets: batches, the kernel's receive
timestamp as the queue delay, oversized datagrams, sending."""

from __future__ import annotations

import asyncio
import socket
import time

from proxy_runtime.transport.udp import BATCH, UdpSocket, bound_socket
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
            # 0.2 s. The second emptied the socket: no standing queue, delay 0.
            assert 0.15 < delays[0] < 2.0
            assert delays[1:] == [0.0]
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
