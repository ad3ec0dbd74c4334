"""The ZeroMQ server: a ROUTER socket, a loop that never dies on a bad message, one model worker.

The main thread owns the ROUTER socket. It answers the quick operations itself (``hello``, ``info``,
``ping``, ``cancel``, ``shutdown``), so heartbeats are answered while the model works, and queues the
long ones (``classify``, ``rank``, ``localize``, ``embed``) for the worker thread (capped in count and in
bytes: ``busy`` beyond). The worker hands progress and replies to the main thread through an
:class:`Outbox` (a deque and a pipe made at start: the reply path opens nothing), because a ZeroMQ socket
must only be used by the thread that owns it. A watchdog replaces a worker thread that died and answers its
job. Replies to a peer that does not read are held up to a byte cap, then dropped, and its queued work is
skipped; connections are capped and idle ones reaped (:mod:`backend.connections`).
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq

from shared_protocol import PROTOCOL_VERSION, ErrorCode, Limits, ProtocolError, Reply, Request, decode_request
from shared_protocol.endpoints import DEFAULT_ADDRESS, access_refusal, is_loopback
from shared_protocol.framing import DEFAULT_LIMITS
from shared_protocol.ops import OPS

from . import __version__
from .connections import ConnectionGuard, harden_router

log = logging.getLogger("backend.server")
DEFAULT_BIND = DEFAULT_ADDRESS


class Job:
    """One queued or running long request, as the service sees it."""

    def __init__(self, request: Request, peer: bytes, send: Callable[[bytes, Reply], None], local: bool = False):
        self.request = request
        self.peer = peer
        self._send = send
        self.local = local  # the client is on this machine (loopback TCP, ipc): it may name its own paths
        self.cancelled = threading.Event()
        self.size = 0  # bytes of the request (its share of the queue's byte cap)
        self._last_progress = 0.0

    def check_cancelled(self) -> None:
        """Raise ``cancelled`` if the client cancelled this request (call between batches)."""
        if self.cancelled.is_set():
            raise ProtocolError(ErrorCode.CANCELLED, f"{self.request.op} was cancelled",
                                request_id=self.request.id)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (rate-limited to 10 per second) and honour a pending cancel."""
        self.check_cancelled()
        now = time.monotonic()
        if now - self._last_progress >= 0.1 or fraction >= 1.0:
            self._last_progress = now
            self._send(self.peer, Reply.progress_update(self.request.id, self.request.op, fraction, message))


class Service:
    """What the server serves. The model-backed implementation lives in :mod:`backend.service`."""

    def info(self, remote: bool = False) -> Dict[str, Any]:
        """What ``info`` adds; ``remote``: the asker may be on another machine (no local file paths then)."""
        return {}

    def admit(self, request: Request) -> None:
        """Refuse (raise a ``ProtocolError``) a request before it is queued, e.g. when over a memory budget."""

    def handle(self, job: Job) -> Reply:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"{job.request.op} is not served here")

    def close(self) -> None:
        pass


SNDHWM = 8  # messages ZeroMQ queues for one peer before a send would block: beyond, the server's own backlog
WATCHDOG_S = 0.5
POLL_MS = 50  # the loop wakes at least this often (the connection guard's scans, the watchdog)


def peer_is_local(bind: str, frame: Any) -> bool:
    """Whether the client that sent ``frame`` is on this machine: an ipc/inproc bind, or a TCP peer address
    on the loopback interface (ZeroMQ's ``Peer-Address`` message property). Unknown counts as remote."""
    if bind.partition("://")[0] in ("ipc", "inproc"):
        return True
    try:
        return ipaddress.ip_address(frame.get("Peer-Address").split("%")[0]).is_loopback
    except Exception:
        return False


@dataclass
class ServerConfig:
    bind: str = DEFAULT_BIND
    token: Optional[str] = None
    limits: Limits = DEFAULT_LIMITS
    max_queue: int = 64  # queued long requests
    max_queue_bytes: int = 2 << 30  # their arrays and headers, in bytes
    max_connections: int = 1000
    idle_timeout_s: float = 600.0  # a connection that sent nothing this long is closed (0: never)
    peer_backlog_bytes: int = 256 << 20  # replies held for one peer that is not reading, before dropping them
    backlog_age_s: float = 30.0  # a reply its peer did not take within this is dropped (the peer stopped reading)
    curve_keys: Optional[str] = None  # a key folder (backend.curve): CURVE encryption and client allow-list


def check_access(config: ServerConfig) -> Optional[str]:
    """Refuse a reachable bind that nobody guards; a warning text for a token-only remote bind, else None."""
    refusal = access_refusal(config.bind, config.token, config.curve_keys)
    if refusal:
        raise ValueError(refusal)
    if is_loopback(config.bind) or config.curve_keys:
        return None
    return (f"{config.bind} is reachable from the network and guarded by a token only: the token and every "
            "image travel in clear. Use --curve-keys DIR across networks you do not trust.")


def _encode_reply(reply: Reply) -> List[Any]:
    """Frames of ``reply``; never raises: a reply that cannot be encoded becomes an ``internal`` error, and an
    error that cannot be encoded either becomes a fixed one."""
    try:
        return reply.encode()
    except Exception as exc:
        log.error("cannot encode the reply to %s: %s", reply.op, exc)
        problem = type(exc).__name__
    try:
        return Reply.failure(reply.id, reply.op, ProtocolError(
            ErrorCode.INTERNAL, f"the reply could not be encoded ({problem})")).encode()
    except Exception:
        return [json.dumps({"v": PROTOCOL_VERSION, "id": None, "op": None, "status": "error", "arrays": [],
                            "error": {"code": ErrorCode.INTERNAL, "message": "the reply could not be encoded",
                                      "details": {}}}).encode()]


def _frames_bytes(frames: List[Any]) -> int:
    total = 0
    for f in frames:
        buf = getattr(f, "buffer", f)
        total += memoryview(buf).nbytes
    return total


class Outbox:
    """Frames from the worker to the main thread: a deque and a wake-up pipe made at start, so the reply path
    opens nothing (a worker that hits EMFILE could otherwise not even answer)."""

    def __init__(self) -> None:
        self._items: "deque[List[Any]]" = deque()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def put(self, frames: List[Any]) -> None:
        self._items.append(frames)
        try:
            os.write(self._write_fd, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full of wake-ups already

    def drain(self) -> List[List[Any]]:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        out = []
        while self._items:
            out.append(self._items.popleft())
        return out

    def close(self) -> None:
        for fd in (self.read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Server:
    """Serve a :class:`Service` on a ROUTER socket until ``shutdown`` or :meth:`stop`."""

    def __init__(self, service: Service, config: Optional[ServerConfig] = None,
                 context: Optional[zmq.Context] = None):
        config = config or ServerConfig()
        warning = check_access(config)
        if warning:
            log.warning(warning)
        self.access_warning = warning
        self.service = service
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=config.max_queue)
        self._queued_bytes = 0
        self._jobs: Dict[Tuple[bytes, str], Job] = {}
        self._jobs_lock = threading.Lock()
        self._outbox = Outbox()
        self._backlog: Dict[bytes, "deque[Tuple[float, int, List[Any]]]"] = {}
        self._backlog_bytes: Dict[bytes, int] = {}
        self._stalled: Dict[bytes, float] = {}  # peers whose replies were dropped, and when
        self._curve = None
        self._router = self._ctx.socket(zmq.ROUTER)
        try:
            self._router.setsockopt(zmq.LINGER, 0)
            # one frame may not exceed the largest frame a request may hold (the decoder then says too_large)
            self._router.setsockopt(zmq.MAXMSGSIZE, config.limits.max_frame_bytes)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client may reuse an identity
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full peer raises instead of silently queueing
            self._router.setsockopt(zmq.SNDHWM, SNDHWM)
            harden_router(self._router)
            if config.curve_keys:
                from .curve import CurveAuth, load_server_keys
                self._curve = CurveAuth(self._ctx, load_server_keys(config.curve_keys))
                self._curve.apply(self._router)
            limits = config.limits
            self.connections = ConnectionGuard(self._router, config.max_connections, config.idle_timeout_s,
                                               limits.max_header_bytes + limits.max_total_bytes
                                               + 9 * (limits.max_arrays + 1), curve=self._curve is not None)
            self._router.bind(config.bind)
        except BaseException:
            self._router.close(linger=0)
            if self._curve is not None:
                self._curve.stop()
            self._outbox.close()
            raise
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._worker = self._new_worker()
        self._current: Optional[Job] = None  # the job the worker is on
        self.started = time.time()
        self.counts: Dict[str, int] = {"requests": 0, "errors": 0, "worker_restarts": 0, "replies_dropped": 0,
                                       "skipped_unread": 0}

    # -- replies -----------------------------------------------------------------------------------
    def _push(self, peer: bytes, reply: Reply) -> None:
        """Queue a reply for the main thread (the worker's path: encodes here, opens nothing, never raises)."""
        if reply.status == "error":
            self.counts["errors"] += 1  # (statistics: a rare lost update between threads is harmless)
        self._outbox.put([peer, *_encode_reply(reply)])

    def _send(self, peer: bytes, reply: Reply) -> None:
        """Send on the ROUTER (main thread only)."""
        if reply.status == "error":
            self.counts["errors"] += 1
        self._send_frames([peer, *_encode_reply(reply)])

    def _send_frames(self, frames: List[Any]) -> None:
        """Send now, or hold in the peer's byte-capped backlog while ZeroMQ's queue for it is full; a peer gone
        or not reading loses its replies (it is not waiting for them)."""
        peer = bytes(getattr(frames[0], "bytes", frames[0]))
        held = self._backlog.get(peer)
        if held:  # keep the order: behind what is already waiting
            self._hold(peer, frames)
            return
        try:
            self._router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._hold(peer, frames)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer went away
            if exc.errno != zmq.EHOSTUNREACH:
                log.warning("cannot send a reply: %s", exc)
            self.counts["replies_dropped"] += 1

    def _hold(self, peer: bytes, frames: List[Any]) -> None:
        size = _frames_bytes(frames)
        used = self._backlog_bytes.get(peer, 0)
        if used + size > self.config.peer_backlog_bytes:
            self.counts["replies_dropped"] += 1
            self._stalled[peer] = time.monotonic()
            log.warning("a peer is not reading its replies: dropped one of %d bytes (%d held)", size, used)
            return
        self._backlog.setdefault(peer, deque()).append((time.monotonic(), size, frames))
        self._backlog_bytes[peer] = used + size

    def _flush_backlogs(self) -> None:
        now = time.monotonic()
        for peer in list(self._backlog):
            held = self._backlog[peer]
            while held:
                at, size, frames = held[0]
                if now - at > self.config.backlog_age_s:  # the peer stopped reading
                    held.popleft()
                    self._backlog_bytes[peer] -= size
                    self.counts["replies_dropped"] += 1
                    self._stalled[peer] = now
                    continue
                try:
                    self._router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    self.counts["replies_dropped"] += 1
                held.popleft()
                self._backlog_bytes[peer] -= size
            if not held:
                del self._backlog[peer]
                del self._backlog_bytes[peer]
        for peer, at in list(self._stalled.items()):
            if now - at > 4 * self.config.backlog_age_s:
                del self._stalled[peer]

    def peer_is_stalled(self, peer: bytes) -> bool:
        """True while ``peer`` leaves its replies unread: its queued work is skipped, not done for no one."""
        return peer in self._stalled

    # -- the loop ----------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self._worker.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._outbox.read_fd, zmq.POLLIN)
        poller.register(self.connections.monitor, zmq.POLLIN)
        log.info("serving on %s", self.endpoint)
        next_watch = time.monotonic() + WATCHDOG_S
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if self._outbox.read_fd in events:
                    for frames in self._outbox.drain():  # forward everything the worker produced
                        self._send_frames(frames)
                if self.connections.monitor in events:
                    self.connections.on_events()
                if self._router in events:
                    for _ in range(64):  # a burst at a time, so the worker's replies are not starved
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.connections.on_message(frames)
                        try:
                            self._on_message(frames)
                        except Exception:  # never let one message kill the loop
                            log.error("unexpected error while handling a message:\n%s", traceback.format_exc())
                if self._backlog or self._stalled:
                    self._flush_backlogs()
                self.connections.scan()  # (when due: idle connections, unfinished input)
                if time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + WATCHDOG_S
                    self._watchdog()
                    if self._curve is not None:
                        self._curve.reload()
        finally:
            self._shutdown_worker()  # (what it still answers is not sent: the clients see the server go)
            self.connections.close()
            self._router.close(linger=200)
            if self._curve is not None:
                self._curve.stop()
            self._outbox.close()
            self.service.close()
            log.info("server stopped")

    def stop(self) -> None:
        self._stop.set()

    def _on_message(self, frames: List[Any]) -> None:
        peer = frames[0].bytes
        body = frames[1:]
        self.counts["requests"] += 1
        self._stalled.pop(peer, None)  # it speaks, so it reads again
        if not body:
            self._send(peer, Reply.failure(None, None, ProtocolError(ErrorCode.BAD_FRAME, "message has no header")))
            return
        try:
            request = decode_request(body, self.config.limits, expected_token=self.config.token)
        except ProtocolError as exc:
            self._send(peer, Reply.failure(exc.details.get("request_id"), exc.details.get("op"), exc))
            return
        try:
            reply = self._dispatch(peer, request, _frames_bytes(body), peer_is_local(self.config.bind, body[0]))
        except ProtocolError as exc:
            reply = Reply.failure(request.id, request.op, exc)
        except Exception as exc:
            log.error("internal error in %s:\n%s", request.op, traceback.format_exc())
            reply = Reply.failure(request.id, request.op, ProtocolError(ErrorCode.INTERNAL, str(exc)))
        if reply is not None:
            self._send(peer, reply)

    def _dispatch(self, peer: bytes, request: Request, size: int, local: bool = False) -> Optional[Reply]:
        op = request.op
        if op == "ping":
            return Reply.ok(request.id, op, {"pong": True, "time": time.time()})
        if op in ("hello", "info"):
            return Reply.ok(request.id, op, self.info(remote=not local))
        if op == "cancel":
            target = request.params["target"]
            with self._jobs_lock:
                job = self._jobs.get((peer, target))
            if job is not None:
                job.cancelled.set()
            return Reply.ok(request.id, op, {"target": target, "cancelled": job is not None})
        if op == "shutdown":
            self._stop.set()
            return Reply.ok(request.id, op, {"stopping": True})
        if not OPS[op].long_running:  # pragma: no cover - every op is handled above
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"{op} has no handler")
        self.service.admit(request)  # too_large before queueing, when its peak memory is over the budget
        job = Job(request, peer, self._push, local)
        job.size = size
        with self._jobs_lock:
            if self._queued_bytes + size > self.config.max_queue_bytes:
                raise ProtocolError(ErrorCode.BUSY, f"the backend holds {self._queued_bytes} bytes of queued "
                                    f"requests (limit {self.config.max_queue_bytes}); try again shortly",
                                    {"limit": "max_queue_bytes"})
            self._jobs[(peer, request.id)] = job
            self._queued_bytes += size
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._forget(job)
            raise ProtocolError(ErrorCode.BUSY, f"the backend has {self.config.max_queue} requests queued; "
                                "try again shortly", {"limit": "max_queue"}) from None
        return None  # the worker replies

    def _forget(self, job: Job) -> None:
        with self._jobs_lock:
            if self._jobs.pop((job.peer, job.request.id), None) is not None:
                self._queued_bytes -= job.size

    def info(self, remote: bool = False) -> Dict[str, Any]:
        info = {
            "protocol": PROTOCOL_VERSION,
            "backend_version": __version__,
            "server": {"endpoint": self.endpoint, "uptime_s": round(time.time() - self.started, 3),
                       "queued": self._queue.qsize(), "queued_bytes": self._queued_bytes,
                       "max_queue": self.config.max_queue, "max_queue_bytes": self.config.max_queue_bytes,
                       "auth": bool(self.config.token) or self._curve is not None,
                       "curve": self._curve is not None,
                       "curve_clients": self._curve.allowed() if self._curve is not None else 0,
                       "fd_limit": _fd_limit(),
                       "worker_alive": self._worker.is_alive(), **self.connections.stats(), **self.counts},
            "limits": self.config.limits.to_dict(),
            "operations": sorted(OPS),
        }
        info.update(self.service.info(remote=remote))
        return info

    # -- the worker --------------------------------------------------------------------------------
    def _new_worker(self) -> threading.Thread:
        return threading.Thread(target=self._work, name="backend-worker", daemon=True)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            self._current = job
            reply = self._run(job)
            self._current = None
            self._forget(job)
            self._push(job.peer, reply)

    def _run(self, job: Job) -> Reply:
        """One job's reply; every Exception becomes a typed error (anything stronger ends the thread, and the
        watchdog answers for it)."""
        request = job.request
        try:
            job.check_cancelled()
            if self.peer_is_stalled(job.peer):
                self.counts["skipped_unread"] += 1
                raise ProtocolError(ErrorCode.CANCELLED, "skipped: the client stopped reading its replies")
            return self.service.handle(job)
        except ProtocolError as exc:
            return Reply.failure(request.id, request.op, exc)
        except MemoryError:
            return Reply.failure(request.id, request.op, ProtocolError(
                ErrorCode.TOO_LARGE, "the backend ran out of memory for this request; send less at once"))
        except Exception as exc:
            log.error("internal error in %s:\n%s", request.op, traceback.format_exc())
            return Reply.failure(request.id, request.op, ProtocolError(
                ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _watchdog(self) -> None:
        """A worker thread that died is replaced; the job it held is answered with ``internal``."""
        if self._worker.is_alive() or self._stop.is_set():
            return
        job, self._current = self._current, None
        self.counts["worker_restarts"] += 1
        log.error("the worker thread died%s; starting a new one", f" during {job.request.op}" if job else "")
        if job is not None:
            self._forget(job)
            self._send(job.peer, Reply.failure(job.request.id, job.request.op, ProtocolError(
                ErrorCode.INTERNAL, "the backend's worker failed on this request and was restarted")))
        self._worker = self._new_worker()
        self._worker.start()

    def _shutdown_worker(self) -> None:
        with self._jobs_lock:
            for job in self._jobs.values():
                job.cancelled.set()
        while True:  # drop what is still queued
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._worker.join(timeout=30)


def _fd_limit() -> int:
    import resource
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
