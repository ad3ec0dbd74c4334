"""The ZeroMQ server: a ROUTER socket, a loop that never dies on a bad message, one model worker.

The main thread owns the ROUTER socket. It answers the quick operations itself (``hello``, ``info``,
``ping``, ``cancel``, ``shutdown``), so heartbeats are answered while the model works, and queues the
long ones (``classify``, ``rank``, ``localize``, ``embed``) for the worker thread. The worker sends
progress and replies back to the main thread over an ``inproc`` PUSH/PULL pair, because a ZeroMQ socket
must only be used by the thread that owns it.
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq

from shared_protocol import PROTOCOL_VERSION, ErrorCode, Limits, ProtocolError, Reply, Request, decode_request
from shared_protocol.framing import DEFAULT_LIMITS
from shared_protocol.ops import OPS

from . import __version__

log = logging.getLogger("backend.server")
DEFAULT_BIND = "tcp://127.0.0.1:5555"


class Job:
    """One queued or running long request, as the service sees it."""

    def __init__(self, request: Request, peer: bytes, send: Callable[[bytes, Reply], None], local: bool = False):
        self.request = request
        self.peer = peer
        self._send = send
        self.local = local  # the client is on this machine (loopback TCP, ipc): it may name its own paths
        self.cancelled = threading.Event()
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

    def info(self) -> Dict[str, Any]:
        return {}

    def handle(self, job: Job) -> Reply:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"{job.request.op} is not served here")

    def close(self) -> None:
        pass


def peer_is_local(bind: str, frame: Any) -> bool:
    """Whether the client that sent ``frame`` is on this machine: an ipc/inproc bind, or a TCP peer address
    on the loopback interface (ZeroMQ's ``Peer-Address`` message property). Unknown counts as remote."""
    if bind.partition("://")[0] in ("ipc", "inproc"):
        return True
    try:
        return ipaddress.ip_address(frame.get("Peer-Address").split("%")[0]).is_loopback
    except Exception:
        return False


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// addresses on the loopback interface."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', interface names and host names may reach the network


@dataclass
class ServerConfig:
    bind: str = DEFAULT_BIND
    token: Optional[str] = None
    limits: Limits = DEFAULT_LIMITS
    max_queue: int = 64


class Server:
    """Serve a :class:`Service` on a ROUTER socket until ``shutdown`` or :meth:`stop`."""

    def __init__(self, service: Service, config: Optional[ServerConfig] = None,
                 context: Optional[zmq.Context] = None):
        config = config or ServerConfig()
        if not is_loopback(config.bind) and not config.token:
            raise ValueError(f"refusing to bind {config.bind} without an access token: a non-loopback address "
                             "is reachable from the network. Pass --token (or set BACKEND_TOKEN), or bind "
                             "tcp://127.0.0.1.")
        self.service = service
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=config.max_queue)
        self._jobs: Dict[Tuple[bytes, str], Job] = {}
        self._jobs_lock = threading.Lock()
        self._outbox_addr = f"inproc://backend-outbox-{uuid.uuid4().hex}"
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, config.limits.max_frame_bytes)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client may reuse an identity
        self._outbox = self._ctx.socket(zmq.PULL)
        self._outbox.bind(self._outbox_addr)
        self._router.bind(config.bind)
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._local = threading.local()
        self._worker = threading.Thread(target=self._work, name="backend-worker", daemon=True)
        self.started = time.time()
        self.counts: Dict[str, int] = {"requests": 0, "errors": 0}

    # -- replies from any thread -------------------------------------------------------------------
    def _push(self, peer: bytes, reply: Reply) -> None:
        """Queue a reply for the main thread (used by the worker thread)."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self._outbox_addr)
            self._local.push = sock
        sock.send_multipart([peer, *reply.encode()], copy=False)

    def _send(self, peer: bytes, reply: Reply) -> None:
        """Send on the ROUTER (main thread only). A peer that went away is silently dropped."""
        if reply.status == "error":
            self.counts["errors"] += 1
        try:
            frames = reply.encode()
        except Exception as exc:  # a result that cannot be encoded is a bug in the service
            log.exception("cannot encode reply to %s", reply.op)
            frames = Reply.failure(reply.id, reply.op, ProtocolError(
                ErrorCode.INTERNAL, f"reply could not be encoded: {exc}")).encode()
        self._router.send_multipart([peer, *frames], copy=False)

    # -- the loop ----------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self._worker.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._outbox, zmq.POLLIN)
        log.info("serving on %s", self.endpoint)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self._outbox in events:
                    while True:  # forward everything the worker produced
                        try:
                            frames = self._outbox.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._router.send_multipart(frames, copy=False)
                if self._router in events:
                    try:
                        frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        continue
                    try:
                        self._on_message(frames)
                    except Exception:  # never let one message kill the loop
                        log.error("unexpected error while handling a message:\n%s", traceback.format_exc())
        finally:
            self._shutdown_worker()
            self._router.close(linger=200)
            self._outbox.close(linger=0)
            self.service.close()
            log.info("server stopped")

    def stop(self) -> None:
        self._stop.set()

    def _on_message(self, frames: List[Any]) -> None:
        peer = frames[0].bytes
        body = frames[1:]
        self.counts["requests"] += 1
        if not body:
            self._send(peer, Reply.failure(None, None, ProtocolError(ErrorCode.BAD_FRAME, "message has no header")))
            return
        try:
            request = decode_request(body, self.config.limits, expected_token=self.config.token)
        except ProtocolError as exc:
            self._send(peer, Reply.failure(exc.details.get("request_id"), exc.details.get("op"), exc))
            return
        try:
            reply = self._dispatch(peer, request, peer_is_local(self.config.bind, frames[1]))
        except ProtocolError as exc:
            reply = Reply.failure(request.id, request.op, exc)
        except Exception as exc:
            log.error("internal error in %s:\n%s", request.op, traceback.format_exc())
            reply = Reply.failure(request.id, request.op, ProtocolError(ErrorCode.INTERNAL, str(exc)))
        if reply is not None:
            self._send(peer, reply)

    def _dispatch(self, peer: bytes, request: Request, local: bool = False) -> Optional[Reply]:
        op = request.op
        if op == "ping":
            return Reply.ok(request.id, op, {"pong": True, "time": time.time()})
        if op in ("hello", "info"):
            return Reply.ok(request.id, op, self.info())
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
        job = Job(request, peer, self._push, local)
        with self._jobs_lock:
            self._jobs[(peer, request.id)] = job
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._jobs_lock:
                self._jobs.pop((peer, request.id), None)
            raise ProtocolError(ErrorCode.BUSY, f"the backend has {self.config.max_queue} requests queued; "
                                "try again shortly")
        return None  # the worker replies

    def info(self) -> Dict[str, Any]:
        info = {
            "protocol": PROTOCOL_VERSION,
            "backend_version": __version__,
            "server": {"endpoint": self.endpoint, "uptime_s": round(time.time() - self.started, 3),
                       "queued": self._queue.qsize(), "auth": bool(self.config.token), **self.counts},
            "limits": self.config.limits.to_dict(),
            "operations": sorted(OPS),
        }
        info.update(self.service.info())
        return info

    # -- the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            request = job.request
            try:
                job.check_cancelled()
                reply = self.service.handle(job)
            except ProtocolError as exc:
                reply = Reply.failure(request.id, request.op, exc)
            except MemoryError:
                reply = Reply.failure(request.id, request.op, ProtocolError(
                    ErrorCode.TOO_LARGE, "the backend ran out of memory for this request; send less at once"))
            except Exception as exc:
                log.error("internal error in %s:\n%s", request.op, traceback.format_exc())
                reply = Reply.failure(request.id, request.op, ProtocolError(
                    ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            finally:
                with self._jobs_lock:
                    self._jobs.pop((job.peer, request.id), None)
            if reply.status == "error":
                self.counts["errors"] += 1  # (statistics: a rare lost update between threads is harmless)
            try:
                self._push(job.peer, reply)
            except Exception:
                log.error("cannot send reply:\n%s", traceback.format_exc())
                self._push(job.peer, Reply.failure(request.id, request.op, ProtocolError(
                    ErrorCode.INTERNAL, "the reply could not be encoded")))
        push = getattr(self._local, "push", None)
        if push is not None:
            push.close()

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
