"""Bounding the server's connections: a cap on open connections, idle ones reaped, the fd limit raised.

ZeroMQ gives no handle on one connection of a ROUTER socket, but its monitor reports each accepted
connection's file descriptor. :class:`ConnectionGuard` keeps those, reads each one's idle time from the
kernel (``TCP_INFO``: milliseconds since data last arrived) and ends a connection with ``shutdown(2)`` on its
descriptor: ZeroMQ then sees the peer hang up and cleans up (and frees whatever the peer left unfinished).
Over the cap, the connection idle the longest goes first; a client waiting for a reply sends heartbeats
every second, so it is never the idlest. ZMTP heartbeats and the handshake timeout end silent peers.
"""
from __future__ import annotations

import logging
import resource
import socket
import struct
import time
from typing import Dict, Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("backend.connections")
TCP_INFO_LEN = 104
LAST_DATA_RECV_OFFSET = 52  # struct tcp_info: 8 one-byte fields, then u32 rto ... last_data_recv at byte 52
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


def idle_ms(fd: int) -> Optional[int]:
    """Milliseconds since the TCP connection on ``fd`` last received data; None when not TCP."""
    try:
        sock = socket.socket(fileno=fd)  # no dup: nothing new is opened
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        return struct.unpack_from("<I", info, LAST_DATA_RECV_OFFSET)[0]
    except OSError:
        return None
    finally:
        sock.detach()


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
    """Counts the ROUTER's connections through its monitor, caps them and reaps idle ones."""

    def __init__(self, router: zmq.Socket, max_connections: int, idle_timeout_s: float):
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.monitor = router.get_monitor_socket(EVENTS)
        self.open: Dict[int, float] = {}  # fd -> accepted at (monotonic)
        self.evicted = 0
        self.reaped = 0
        self._next_sweep = time.monotonic() + 1.0

    def on_events(self) -> None:
        """Drain the monitor; enforce the cap on each accepted connection."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event.get("value", -1))
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.open[fd] = time.monotonic()
                if len(self.open) > self.max_connections:
                    self._evict_idlest()
            else:
                self.open.pop(fd, None)

    def _evict_idlest(self) -> None:
        idle = {fd: idle_ms(fd) for fd in self.open}
        # the longest idle by the kernel's clock; without it (ipc://), the oldest connection
        victim = max(self.open, key=lambda fd: (idle[fd] if idle[fd] is not None else -1, -self.open[fd]))
        self.open.pop(victim)
        if hang_up(victim):
            self.evicted += 1
            log.warning("over %d connections: closed the one idle longest", self.max_connections)

    def sweep(self) -> None:
        """Every second or so: close connections that received nothing for ``idle_timeout_s``."""
        now = time.monotonic()
        if now < self._next_sweep or self.idle_timeout_s <= 0:
            return
        self._next_sweep = now + 1.0
        limit_ms = self.idle_timeout_s * 1000
        for fd in list(self.open):
            idle = idle_ms(fd)
            if idle is not None and idle > limit_ms:
                self.open.pop(fd)
                if hang_up(fd):
                    self.reaped += 1

    def stats(self) -> Dict[str, int]:
        return {"connections": len(self.open), "max_connections": self.max_connections,
                "idle_timeout_s": int(self.idle_timeout_s), "evicted": self.evicted, "reaped": self.reaped}

    def close(self) -> None:
        self.monitor.close(linger=0)
