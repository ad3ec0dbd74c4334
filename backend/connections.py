"""Bounding the server's connections: a cap on open connections, idle ones reaped, the fd limit raised.

ZeroMQ gives no handle on one connection of a ROUTER socket, but its monitor reports each accepted
connection's file descriptor. :class:`ConnectionGuard` keeps those, reads each one's idle time from the
kernel (``TCP_INFO``: milliseconds since data last arrived) and ends a connection with ``shutdown(2)`` on its
descriptor: ZeroMQ then sees the peer hang up and cleans up (and frees whatever the peer left unfinished).
Over the cap, the connection idle the longest goes first; a client waiting for a reply sends heartbeats
every second, so it is never the idlest. ZMTP heartbeats and the handshake timeout end silent peers. A
connection whose received bytes run ahead of its complete messages by more than the largest message allowed
(an unfinished multipart message, which ZeroMQ buffers without limit) is closed too.
"""
from __future__ import annotations

import logging
import resource
import socket
import struct
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("backend.connections")
TCP_INFO_LEN = 136
LAST_DATA_RECV_OFFSET = 52  # struct tcp_info: 8 one-byte fields, then u32 rto ... last_data_recv at byte 52
BYTES_RECEIVED_OFFSET = 128  # u64 tcpi_bytes_received (Linux 4.1+)
UNFINISHED_SLACK = 1 << 20  # handshakes, heartbeats and framing the byte count of complete messages leaves out
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise the soft limit on open files towards the hard limit (at most ``wanted``); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", target, exc)
    return int(soft)


def tcp_info(fd: int) -> Optional[Tuple[int, int]]:
    """(milliseconds since data last arrived, bytes received) of the TCP connection on ``fd``; None when not
    TCP (ipc://) or gone."""
    try:
        sock = socket.socket(fileno=fd)  # no dup: nothing new is opened
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        received = struct.unpack_from("<Q", info, BYTES_RECEIVED_OFFSET)[0] if len(info) >= 136 else 0
        return struct.unpack_from("<I", info, LAST_DATA_RECV_OFFSET)[0], received
    except (OSError, struct.error):
        return None
    finally:
        sock.detach()


def idle_ms(fd: int) -> Optional[int]:
    """Milliseconds since the TCP connection on ``fd`` last received data; None when not TCP."""
    info = tcp_info(fd)
    return None if info is None else info[0]


def wire_bytes(frames: Sequence[Any], curve: bool = False) -> int:
    """Bytes a message took on the wire under ZMTP 3 (a 2- or 9-byte frame header; with CURVE each frame is a
    MESSAGE command: 33 more bytes)."""
    total = 0
    for f in frames:
        size = memoryview(getattr(f, "buffer", f)).nbytes + (33 if curve else 0)
        total += size + (2 if size < 256 else 9)
    return total


def hang_up(fd: int) -> bool:
    """``shutdown(2)`` the connection on ``fd`` (ZeroMQ keeps the descriptor and closes it itself)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.detach()


def harden_router(router: zmq.Socket, handshake_s: float = 10.0, heartbeat_s: float = 10.0) -> None:
    """Socket options that end silent or half-open peers (ZMTP handshake timeout and heartbeats)."""
    router.setsockopt(zmq.HANDSHAKE_IVL, int(handshake_s * 1000))
    router.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
    router.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(3 * heartbeat_s * 1000))
    router.setsockopt(zmq.TCP_KEEPALIVE, 1)


class ConnectionGuard:
    """Counts the ROUTER's connections through its monitor, caps them, reaps idle ones and cuts unfinished input.

    The per-connection checks read ``TCP_INFO`` for every open connection; a scan is scheduled so that it takes
    at most 1/``SCAN_SHARE`` of the main thread (every 50 ms with a few connections, less often with many).
    """

    MIN_INTERVAL_S = 0.05
    SCAN_SHARE = 20

    def __init__(self, router: zmq.Socket, max_connections: int, idle_timeout_s: float,
                 max_message_bytes: int = 0, curve: bool = False):
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.max_message_bytes = max_message_bytes  # 0: unfinished input is not watched
        self.curve = curve
        self.monitor = router.get_monitor_socket(EVENTS)
        self.open: Dict[int, float] = {}  # fd -> accepted at (monotonic)
        self.completed: Dict[int, int] = {}  # fd -> wire bytes of the complete messages it delivered
        self.evicted = 0
        self.reaped = 0
        self.cut_unfinished = 0
        self.scan_interval_s = self.MIN_INTERVAL_S
        self._next_scan = time.monotonic() + self.MIN_INTERVAL_S

    def on_events(self) -> None:
        """Drain the monitor; then, over the cap, close the connections idle the longest, in one pass."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            fd = int(event.get("value", -1))
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.open[fd] = time.monotonic()
            else:
                self.open.pop(fd, None)
                self.completed.pop(fd, None)
        if len(self.open) > self.max_connections:
            self._evict(len(self.open) - self.max_connections)

    def on_message(self, frames: Sequence[Any]) -> None:
        """Count a complete message against the connection it came from (ZeroMQ's ``SRCFD``)."""
        try:
            fd = int(frames[-1].get(zmq.SRCFD))
        except (zmq.ZMQError, AttributeError, TypeError, ValueError):
            return
        self.completed[fd] = self.completed.get(fd, 0) + wire_bytes(frames[1:], self.curve)

    def _close(self, fd: int) -> bool:
        self.open.pop(fd, None)
        self.completed.pop(fd, None)
        return hang_up(fd)

    def _evict(self, count: int) -> None:
        idle = {fd: idle_ms(fd) for fd in self.open}
        # the longest idle by the kernel's clock first; without it (ipc://), the oldest connections
        order = sorted(self.open, key=lambda fd: (idle[fd] if idle[fd] is not None else -1, -self.open[fd]),
                       reverse=True)
        closed = sum(self._close(fd) for fd in order[:count])
        self.evicted += closed
        log.warning("over %d connections: closed the %d idle longest", self.max_connections, closed)

    def scan(self) -> None:
        """When due: close connections idle over ``idle_timeout_s``, and connections whose bytes received,
        less their complete messages, exceed the largest message allowed (a multipart message that never ends:
        ZeroMQ would buffer it without limit, since its queues count finished messages only)."""
        now = time.monotonic()
        if now < self._next_scan:
            return
        started = time.perf_counter()
        idle_limit_ms = self.idle_timeout_s * 1000 if self.idle_timeout_s > 0 else None
        for fd in list(self.open):
            info = tcp_info(fd)
            if info is None:
                continue
            idle, received = info
            unfinished = received - self.completed.get(fd, 0)
            if idle_limit_ms is not None and idle > idle_limit_ms:
                self.reaped += self._close(fd)
            elif self.max_message_bytes and unfinished > (self.max_message_bytes + UNFINISHED_SLACK
                                                          + received // 100):
                if self._close(fd):
                    self.cut_unfinished += 1
                    log.warning("closed a connection sending %d bytes of unfinished message (limit %d)",
                                unfinished, self.max_message_bytes)
        cost = time.perf_counter() - started
        self.scan_interval_s = max(self.MIN_INTERVAL_S, self.SCAN_SHARE * cost)
        self._next_scan = now + self.scan_interval_s

    def stats(self) -> Dict[str, Any]:
        return {"connections": len(self.open), "max_connections": self.max_connections,
                "idle_timeout_s": int(self.idle_timeout_s), "evicted": self.evicted, "reaped": self.reaped,
                "cut_unfinished": self.cut_unfinished, "scan_interval_ms": round(self.scan_interval_s * 1000, 1)}

    def close(self) -> None:
        self.monitor.close(linger=0)
