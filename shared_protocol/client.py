"""The client library used by the QGIS plugin, the command line and the tests (needs pyzmq, not torch).

Transport: a DEALER socket talking to the backend's ROUTER. Each request carries an id and replies are
matched to it (stale replies from an earlier, abandoned request are dropped). While a request is in flight
the client sends heartbeat pings; when ``heartbeat_liveness`` of them go unanswered, or the request's
timeout passes, it applies the Lazy Pirate pattern: close the socket (LINGER 0), reopen it and resend an
idempotent request, up to ``retries`` times, then raise ``timeout``/``unavailable``. A request can be
cancelled from another thread through a :class:`threading.Event`.

One :class:`Client` serves one thread at a time (ZeroMQ sockets are not thread-safe): create one client
per worker thread or task.

A canvas is sent once: ``localize`` remembers (process-wide, per server address) the ``canvas_id`` the
server gave each canvas it was sent, and when the same pixels come again it sends that id instead of the
canvas, and the canvas only if the server answers that it no longer holds it (the same pixels with another
mask are another canvas).

Valid-pixel masks go as keyword arguments named like their arrays (``canvas_mask=``, ``tiles_mask=``,
``images_mask=``, ``query_images_mask=``; None leaves them out), beside the other parameters.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .endpoints import DEFAULT_ADDRESS
from .errors import ErrorCode, ProtocolError
from .curve import client_keypair_for, load_public_key
from .framing import DEFAULT_LIMITS, Limits
from .messages import PROTOCOL_VERSION, Reply, Request, decode_reply, new_request_id
from .ops import OPS, WINDOWS_ARRAY

ProgressCallback = Callable[[float, str], None]
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class CanvasIds:
    """Thread-safe, bounded memory of (server address, canvas digest) -> the server's ``canvas_id``."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self._ids: "OrderedDict[tuple, str]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(canvas: np.ndarray, mask: Optional[np.ndarray] = None) -> str:
        """SHA-256 of shape, dtype and pixels (hardware-accelerated on most CPUs: ~2 GB/s), and of the mask."""
        arr = np.ascontiguousarray(canvas)
        h = hashlib.sha256(f"{arr.shape}{arr.dtype.str}".encode())
        h.update(memoryview(arr).cast("B"))
        if mask is not None:  # the canvas_id names the canvas and its mask
            h.update(b"mask")
            h.update(memoryview(np.ascontiguousarray(mask)).cast("B"))
        return h.hexdigest()

    def get(self, address: str, digest: str) -> Optional[str]:
        with self._lock:
            found = self._ids.get((address, digest))
            if found is not None:
                self._ids.move_to_end((address, digest))
            return found

    def put(self, address: str, digest: str, canvas_id: str) -> None:
        with self._lock:
            self._ids[(address, digest)] = canvas_id
            self._ids.move_to_end((address, digest))
            while len(self._ids) > self.max_entries:
                self._ids.popitem(last=False)

    def forget(self, address: str, digest: str) -> None:
        with self._lock:
            self._ids.pop((address, digest), None)


CANVAS_IDS = CanvasIds()


class Client:
    """A reliable request/reply client for the backend."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: Optional[str] = None, timeout: float = 30.0,
                 retries: int = 2, heartbeat_interval: float = 1.0, heartbeat_liveness: int = 5,
                 limits: Limits = DEFAULT_LIMITS, context: Optional["zmq.Context"] = None,
                 name: str = "shared_protocol-client", reuse_canvas: bool = True,
                 server_public_key: Optional[Union[str, bytes]] = None,
                 client_secret_file: Optional[str] = None,
                 client_keypair: Optional[Tuple[bytes, bytes]] = None):
        """``server_public_key`` (40 Z85 characters or a ``.key`` file) turns CURVE on: the server's identity is
        pinned and everything is encrypted; the client presents ``client_keypair`` (public, secret) or the one
        in ``client_secret_file`` (``NAME.key_secret``), which the server's allow-list must hold."""
        self.address = address
        self._curve: Optional[Tuple[bytes, bytes, bytes]] = None  # (server public, client public, secret)
        if server_public_key:
            try:
                server = load_public_key(server_public_key)
                public, secret = client_keypair or client_keypair_for(client_secret_file)
            except ValueError as exc:
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"CURVE key: {exc}") from None
            self._curve = (server, public, secret)
        elif client_secret_file or client_keypair:
            raise ProtocolError(ErrorCode.BAD_PARAMS, "a client key needs the server's public key too")
        self.reuse_canvas = reuse_canvas  # localize: send a canvas the server holds by its id
        self.token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.heartbeat_interval = float(heartbeat_interval)
        self.heartbeat_liveness = int(heartbeat_liveness)
        self.limits = limits  # what this client accepts in replies
        self.server_limits: Optional[Limits] = None  # what the server accepts, learnt at hello/info
        self.name = name
        self._ctx = context or zmq.Context.instance()
        self._socket: Optional[zmq.Socket] = None
        self._monitor: Optional[zmq.Socket] = None  # handshake failures: a clear error instead of silence
        self._lock = threading.Lock()

    # -- socket management -------------------------------------------------------------------------
    def _open(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
            if self._curve is not None:
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
            self._monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
            sock.connect(self.address)
            self._socket = sock
        return self._socket

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            if self._socket is not None:
                try:
                    self._socket.disable_monitor()
                except zmq.ZMQError:
                    pass
            self._monitor.close(linger=0)
            self._monitor = None

    def _check_handshake(self, req: Request) -> None:
        """Raise ``unauthorized`` when the security handshake failed (the server refused the key, or speaks
        another mechanism): waiting would only end in a timeout."""
        while self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, f"the backend at {self.address} refused this client's "
                                    "CURVE key: it is not in the server's allow-list (python -m backend keys allow)",
                                    request_id=req.id, address=self.address, reason="curve_key_refused")
            if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                hint = ("check the server's public key, or whether the backend uses CURVE at all"
                        if self._curve is not None else "the backend uses CURVE: set its public key and a client key")
                raise ProtocolError(ErrorCode.UNAUTHORIZED, f"the security handshake with {self.address} failed: "
                                    f"{hint}", request_id=req.id, address=self.address, reason="handshake_failed")

    def _reset(self) -> None:
        self._close_monitor()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _abandon(self, req: Request) -> None:
        """Give up on an attempt: ask the server to drop it (a slow server would otherwise finish it for no
        one, while working on the retry too), then close the socket."""
        if self._socket is not None and OPS[req.op].long_running:
            self._close_monitor()
            try:
                self._send_cancel(self._socket, req.id)
                self._socket.close(linger=100)  # a moment to flush the cancel; a dead server never takes it
            except zmq.ZMQError:
                self._socket.close(linger=0)
            self._socket = None
        self._reset()

    def close(self) -> None:
        with self._lock:
            self._reset()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the core request loop ---------------------------------------------------------------------
    def request(self, op: str, params: Optional[Mapping[str, Any]] = None,
                arrays: Optional[Mapping[str, Any]] = None, *, timeout: Optional[float] = None,
                retries: Optional[int] = None, on_progress: Optional[ProgressCallback] = None,
                cancel: Optional[threading.Event] = None, request_id: Optional[str] = None) -> Reply:
        """Send one request and wait for its reply. Raises :class:`ProtocolError` on any failure.

        ``timeout`` bounds each attempt; a failed attempt of an idempotent op is retried ``retries`` times
        on a fresh socket. Progress replies reset nothing but are passed to ``on_progress``.
        """
        if op not in OPS:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown operation {op!r}", known=sorted(OPS))
        spec = OPS[op]
        timeout = self.timeout if timeout is None else float(timeout)
        attempts = 1 + (self.retries if retries is None else int(retries)) if spec.idempotent else 1
        req = Request(op=op, id=request_id or new_request_id(), params=dict(params or {}),
                      arrays=dict(arrays or {}), token=self.token)
        frames = req.encode()
        (self.server_limits or self.limits).check_frames(frames)  # fail fast instead of being dropped
        with self._lock:
            last: Optional[ProtocolError] = None
            for _attempt in range(attempts):
                try:
                    reply = self._attempt(req, frames, timeout, on_progress, cancel)
                except ProtocolError as exc:
                    if exc.code not in (ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE):
                        raise
                    last = exc
                    self._abandon(req)  # Lazy Pirate: a fresh socket before the next try
                    continue
                if reply.status == "error":
                    assert reply.error is not None
                    raise reply.error
                return reply
            assert last is not None
            last.details["attempts"] = attempts
            raise last

    def _attempt(self, req: Request, frames: List[Any], timeout: float,
                 on_progress: Optional[ProgressCallback], cancel: Optional[threading.Event]) -> Reply:
        sock = self._open()
        sock.send_multipart(frames, copy=False)
        start = time.monotonic()
        deadline = start + timeout
        next_beat = start + self.heartbeat_interval
        beats_unanswered = 0
        heard = start
        cancel_sent = False
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while True:
            self._check_handshake(req)
            now = time.monotonic()
            if cancel is not None and cancel.is_set() and not cancel_sent:
                self._send_cancel(sock, req.id)
                cancel_sent = True
                deadline = min(deadline, now + max(2.0, 2 * self.heartbeat_interval))
            if now >= deadline:
                if cancel_sent:
                    raise ProtocolError(ErrorCode.CANCELLED, f"{req.op} cancelled", request_id=req.id)
                raise ProtocolError(ErrorCode.TIMEOUT, f"no reply to {req.op} from {self.address} within "
                                    f"{timeout:g} s", request_id=req.id, address=self.address)
            if req.op != "ping" and now >= next_beat:
                if beats_unanswered >= self.heartbeat_liveness:
                    raise ProtocolError(ErrorCode.UNAVAILABLE,
                                        f"the backend at {self.address} stopped answering (no heartbeat for "
                                        f"{now - heard:.1f} s)", request_id=req.id, address=self.address)
                self._send_ping(sock)
                beats_unanswered += 1
                next_beat = now + self.heartbeat_interval
            wait = max(0.0, min(deadline, next_beat) - now)
            wait = min(wait, 0.05) if cancel is not None else wait
            if sock not in dict(poller.poll(int(wait * 1000) + 1)):
                continue
            try:
                reply = decode_reply(sock.recv_multipart(copy=False), self.limits)
            except ProtocolError:
                continue  # a garbled frame: keep waiting for ours
            heard = time.monotonic()
            beats_unanswered = 0
            if reply.id != req.id:
                continue  # a heartbeat pong or a stale reply of an abandoned attempt
            if reply.status == "progress":
                if on_progress is not None:
                    on_progress(reply.progress or 0.0, reply.message or "")
                continue
            return reply

    def _send_ping(self, sock: zmq.Socket) -> None:
        sock.send_multipart(Request(op="ping", id="hb-" + new_request_id()[:16], token=self.token).encode())

    def _send_cancel(self, sock: zmq.Socket, target: str) -> None:
        sock.send_multipart(Request(op="cancel", id="cx-" + new_request_id()[:16], params={"target": target},
                                    token=self.token).encode())

    # -- operations --------------------------------------------------------------------------------
    def hello(self, **kw: Any) -> Dict[str, Any]:
        return self._remember_limits(
            self.request("hello", {"protocol": PROTOCOL_VERSION, "client": self.name}, **kw).result)

    def info(self, **kw: Any) -> Dict[str, Any]:
        return self._remember_limits(self.request("info", **kw).result)

    def _remember_limits(self, info: Dict[str, Any]) -> Dict[str, Any]:
        if isinstance(info.get("limits"), dict):
            self.server_limits = Limits.from_dict(info["limits"])
        return info

    def ping(self, **kw: Any) -> Dict[str, Any]:
        return self.request("ping", **kw).result

    def shutdown(self, **kw: Any) -> Dict[str, Any]:
        return self.request("shutdown", **kw).result

    def cancel(self, target: str, **kw: Any) -> Dict[str, Any]:
        return self.request("cancel", {"target": target}, **kw).result

    def classify(self, classes: Sequence[str], tiles: Optional[np.ndarray] = None, *,
                 canvas: Optional[np.ndarray] = None, **params_and_kw: Any) -> Reply:
        arrays = {k: v for k, v in (("tiles", tiles), ("canvas", canvas)) if v is not None}
        params, kw = _split(params_and_kw)
        arrays.update(_masks(params))
        return self.request("classify", {"classes": list(classes), **params}, arrays, **kw)

    def rank(self, images: np.ndarray, texts: Optional[Sequence[str]] = None, *,
             query_images: Optional[np.ndarray] = None, **params_and_kw: Any) -> Reply:
        arrays = {"images": images}
        if query_images is not None:
            arrays["query_images"] = query_images
        params, kw = _split(params_and_kw)
        arrays.update(_masks(params))
        return self.request("rank", {"texts": list(texts) if texts is not None else None, **params}, arrays, **kw)

    def localize(self, canvas: Optional[np.ndarray], queries: Sequence[str], **params_and_kw: Any) -> Reply:
        """Heatmaps of ``queries`` over ``canvas`` (with ``windows=`` N x 4 boxes: those windows' scores, see
        ``ops.WINDOWS_ARRAY``). A canvas sent before (same pixels, same server) goes as
        its ``canvas_id``, and again in full only if the server no longer holds it. ``canvas=None`` with a
        ``canvas_id`` parameter names a canvas explicitly."""
        params, kw = _split(params_and_kw)
        masks = _masks(params)
        windows = params.pop(WINDOWS_ARRAY, None)  # explicit windows (an array): scores instead of heatmaps
        extra = {} if windows is None else {WINDOWS_ARRAY: np.ascontiguousarray(windows, dtype=np.int32)}
        params = {"queries": list(queries), **params}
        if canvas is None:
            return self.request("localize", params, extra, **kw)
        mask = masks.get("canvas_mask")
        digest = CANVAS_IDS.digest(canvas, mask) if self.reuse_canvas and "canvas_id" not in params else None
        known = CANVAS_IDS.get(self.address, digest) if digest else None
        if known is not None:
            try:
                return self.request("localize", {**params, "canvas_id": known}, extra, **kw)
            except ProtocolError as exc:
                if exc.code != ErrorCode.NOT_FOUND or exc.details.get("reason") != "canvas_unknown":
                    raise
                CANVAS_IDS.forget(self.address, digest)
        reply = self.request("localize", params, {"canvas": canvas, **masks, **extra}, **kw)
        if digest and reply.result.get("canvas_id"):
            CANVAS_IDS.put(self.address, digest, str(reply.result["canvas_id"]))
        return reply

    def embed(self, images: Optional[np.ndarray] = None, texts: Optional[Sequence[str]] = None,
              **params_and_kw: Any) -> Reply:
        params, kw = _split(params_and_kw)
        arrays = {"images": images} if images is not None else {}
        arrays.update(_masks(params))
        return self.request("embed", {"texts": list(texts) if texts is not None else None, **params}, arrays,
                            **kw)


_REQUEST_KWARGS = ("timeout", "retries", "on_progress", "cancel", "request_id")


def _masks(params: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Take the ``NAME_mask`` keyword arguments (arrays, sent beside their images; None: left out) out of
    ``params``."""
    names = [k for k in params if k.endswith("_mask")]
    return {k: v for k, v in ((k, params.pop(k)) for k in names) if v is not None}


def _split(kw: Dict[str, Any]):
    params = {k: v for k, v in kw.items() if k not in _REQUEST_KWARGS}
    return params, {k: v for k, v in kw.items() if k in _REQUEST_KWARGS}
