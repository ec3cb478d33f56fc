"""UDP listener: reads datagrams in batches straight from the socket, with the kernel's receive
timestamp, and hands each to the proxy core with its source address.

Why not asyncio's datagram transport: it hides how long a datagram waited in the kernel's receive
queue, and that wait is the overload signal (core/overload.py) — it rises as soon as requests come
faster than they are served, well before the buffer overflows and the kernel drops them. Reading
the socket ourselves (``loop.add_reader`` + ``recvmsg_into`` / ``recvfrom_into``) gives the
SO_TIMESTAMPNS receive time of a batch's first datagram, one reusable buffer instead of an
allocation per read, and a batch boundary, so the adapter re-arms the core's timer once per batch
instead of once per datagram. While datagrams come close together, reads are coalesced (see
COALESCE): one wake-up per millisecond at most, each reading what arrived meanwhile.

Sending goes straight to ``sendto`` (UDP never blocks in practice with an 8 MiB send buffer); when
the kernel does say EAGAIN the datagram waits in a bounded queue for the socket to become writable,
as asyncio's transport did.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable

log = logging.getLogger("clearip.udp")

# Linux's SO_TIMESTAMPNS (asm-generic and x86: 35; the cmsg type SCM_TIMESTAMPNS is the same).
# Python's socket module does not export it. The kernel turns on arrival stamps asynchronously
# when the first socket on the host asks (a deferred static key): for the first few milliseconds
# after start-up a datagram is stamped when read instead, i.e. a delay of 0. Elsewhere no
# timestamp: the queue delay is unknown and overload control falls back to max_in_flight.
SO_TIMESTAMPNS = 35 if sys.platform == "linux" else None
_TIMESPEC = struct.Struct("@qq")
BATCH = 64  # datagrams read per wake-up at most, then the loop runs timers and other sockets
# Read coalescing (like a NIC's interrupt moderation): while datagrams arrive at 2 or more per
# COALESCE on average (measured over RATE_WINDOW), the socket is read at most once per COALESCE,
# so each wake-up reads several. A wake-up (epoll, the loop's dispatch, a read that finds the queue
# empty, re-arming the core's timer, the context switch) costs tens of microseconds whatever it
# reads: measured with `python -m bench.io_micro`, one datagram per wake-up costs about 1.4 times
# what coalesced reads do. Slower traffic is read on arrival (a pause there would mostly end in an
# empty read, one more wake-up). A datagram that arrives while reading is paused waits at most
# COALESCE (1 ms) longer.
COALESCE = 0.001
RATE_WINDOW = 0.01  # the arrival rate is judged over this long (seconds)
SEND_QUEUE_MAX = 10_000  # datagrams held while the kernel says EAGAIN; beyond, dropped (UDP)


def bound_socket(host: str, port: int) -> socket.socket:
    """A UDP socket bound to ``host:port`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class UdpSocket:
    """One bound UDP socket driven by the event loop's reader callback."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_datagram: Callable[[bytes, tuple[str, int]], None],
        *,
        max_size: int = 65535,
        on_queue_delay: Callable[[float], None] | None = None,
        on_batch_done: Callable[[], None] | None = None,
        coalesce: float = COALESCE,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = loop
        self._on_datagram = on_datagram
        self._on_queue_delay = on_queue_delay
        self._on_batch_done = on_batch_done
        # One byte more than the largest message, so an oversized datagram is seen as such.
        self._buf = bytearray(max_size + 1)
        self._view = memoryview(self._buf)
        self._timestamps = False
        if SO_TIMESTAMPNS is not None and on_queue_delay is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self._timestamps = True
            except OSError:
                pass
        self._anc = socket.CMSG_SPACE(_TIMESPEC.size) if self._timestamps else 0
        self._pending: collections.deque[tuple[bytes, tuple[str, int]]] = collections.deque()
        self.closed = False
        self.dropped_sends = 0
        self._coalesce = coalesce
        self._dense = False  # datagrams came at >= 2 per COALESCE over the last rate window
        self._window_start = loop.time()
        self._window_count = 0  # datagrams read since _window_start
        self._paused: asyncio.TimerHandle | None = None
        self.pauses = 0  # coalescing pauses since start
        loop.add_reader(sock.fileno(), self._readable)

    @property
    def sockname(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return str(name[0]), int(name[1])

    @property
    def paused(self) -> bool:
        """Whether reading is paused for coalescing (see COALESCE)."""
        return self._paused is not None

    @property
    def timestamps(self) -> bool:
        """Whether the kernel stamps each datagram (the queue delay is measured)."""
        return self._timestamps

    # ---- receiving ---------------------------------------------------------------------------
    def _readable(self) -> None:
        sock = self.sock
        view = self._view
        on_datagram = self._on_datagram
        stamped = self._timestamps
        first: list[tuple[int, int, bytes]] | None = None
        drained = False
        count = 0
        try:
            for _ in range(BATCH):
                try:
                    if stamped and first is None:
                        # Only the batch's first datagram needs its arrival stamp (see _age): the
                        # others are read without ancillary data, which is cheaper.
                        n, first, _flags, addr = sock.recvmsg_into((view,), self._anc)
                    else:
                        n, addr = sock.recvfrom_into(view)
                except (BlockingIOError, InterruptedError):
                    drained = True
                    break
                except OSError as exc:  # e.g. a queued ICMP error: the next read goes on
                    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                        return
                    continue
                count += 1
                # IPv4: (host, port) as is; IPv6: (host, port, flowinfo, scope_id) -> (host, port)
                on_datagram(bytes(view[:n]), addr if len(addr) == 2 else (addr[0], addr[1]))
                if self.closed:
                    return
            if stamped:
                self._queue_delay(0.0 if drained or first is None else self._age(first))
        finally:
            if count and not self.closed:  # an empty read (after a pause) fed the core nothing
                if self._on_batch_done is not None:
                    self._on_batch_done()
                self._maybe_pause(drained, count)

    def _maybe_pause(self, drained: bool, count: int) -> None:
        """After a wake-up that emptied the socket: while datagrams come densely (2 or more per
        COALESCE over the last rate window), stop watching the socket until COALESCE has passed,
        then read whatever came meanwhile in one batch."""
        self._window_count += count
        now = self._loop.time()
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW:
            self._dense = self._window_count * self._coalesce >= 2 * elapsed
            self._window_start = now
            self._window_count = 0
        if drained and self._dense and self._coalesce > 0 and self._paused is None:
            self.pauses += 1
            self._loop.remove_reader(self.sock.fileno())
            self._paused = self._loop.call_at(now + self._coalesce, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.closed:
            return
        self._loop.add_reader(self.sock.fileno(), self._readable)
        self._readable()

    def _queue_delay(self, delay: float) -> None:
        if self._on_queue_delay is not None:
            self._on_queue_delay(delay)

    @staticmethod
    def _age(ancdata: list[tuple[int, int, bytes]]) -> float:
        """How long the datagram with this ancillary data waited (wall clock, as the kernel's
        stamp is).

        The queue delay reported per batch: 0 when the batch emptied the socket (whatever waited
        was few enough to read in one go: a collection pause or a slow start-up is not a standing
        queue); when the batch stopped at BATCH with more waiting, the wait of its first datagram,
        the oldest: how far behind the proxy is (PIE's delay of the queue that stays)."""
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(payload)
                stamped = float(sec) + float(nsec) * 1e-9
                return max(0.0, time.time() - stamped)
        return 0.0

    # ---- sending -----------------------------------------------------------------------------
    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send now; queue on EAGAIN. OSError (unreachable network, bad address) goes to the caller,
        which fails the transaction at once instead of waiting for its timer."""
        if self.closed:
            return
        if self._pending:
            self._queue(data, addr)
            return
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._queue(data, addr)
            self._loop.add_writer(self.sock.fileno(), self._writable)

    def _queue(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(self._pending) >= SEND_QUEUE_MAX:
            self.dropped_sends += 1  # the peer retransmits, or our transaction does
            return
        self._pending.append((data, addr))

    def _writable(self) -> None:
        pending = self._pending
        while pending:
            data, addr = pending[0]
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("cannot send to udp %s:%d: %s", addr[0], addr[1], exc)
            pending.popleft()
        self._loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        fd = self.sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self._pending.clear()
        self.sock.close()
