"""Helpers shared by the plugin tests: the live tiny backend and a scriptable fake ROUTER server."""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]


def backend_python() -> str:
    return os.environ.get("BACKEND_PYTHON") or str(ROOT / ".venv" / "bin" / "python")


def start_live_backend(extra: List[str] = (), address: Optional[str] = None):
    """A tiny random-weight backend in the backend's own interpreter (skips when it cannot start)."""
    from qgis_plugin.backend_process import free_port, start_and_wait
    from qgis_plugin.settings import Settings
    python = backend_python()
    if not Path(python).exists():
        pytest.skip(f"no backend Python at {python} (set BACKEND_PYTHON)")
    settings = Settings(mode="start", address=address or f"tcp://127.0.0.1:{free_port()}", backend_python=python,
                        backend_dir=str(ROOT), model="tiny", offline=False,
                        extra_args=" ".join(["--random-weights", *extra]), timeout_s=120.0, retries=0)
    proc = start_and_wait(settings.serve_command(), settings.backend_env(), timeout=180.0)
    if proc.state() != "ready":
        pytest.fail(f"the tiny backend did not start: {proc.failure_reason()}\n" + "\n".join(proc.output[-20:]))
    return proc, settings


class FakeServer:
    """A ROUTER socket in a thread; ``handler(request) -> list of Reply`` (empty: never answer)."""

    def __init__(self, handler: Callable, strict: bool = True):
        import zmq
        from qgis_plugin.backend_process import free_port
        self.handler = handler
        self.strict = strict  # False: any op's header and arrays are taken as sent (a backend of a newer protocol)
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.requests: List = []
        self.refused: List = []  # (header, error) of the requests that did not decode
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        import zmq
        from shared_protocol import ProtocolError, Reply, decode_request
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            ident, *frames = self.sock.recv_multipart()
            try:
                req = decode_request(frames) if self.strict else _lenient(frames)
            except ProtocolError as exc:  # refused like a real backend does (e.g. arrays of a newer protocol)
                header = json.loads(bytes(frames[0]))
                self.refused.append((header, exc))
                self.sock.send_multipart([ident, *Reply.failure(header.get("id", ""), header.get("op", ""),
                                                                exc).encode()])
                continue
            self.requests.append(req)
            if req.op == "ping":
                replies = [Reply.ok(req.id, "ping", {"pong": True})]
            else:
                replies = self.handler(req)
            for reply in replies:
                self.sock.send_multipart([ident, *reply.encode()])

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def _lenient(frames):
    from shared_protocol import Request, framing
    msg = framing.decode(frames)
    h = msg.header
    return Request(op=h["op"], id=h["id"], params=h.get("params") or {}, arrays=dict(msg.arrays),
                   token=h.get("token"), version=h.get("v", 1))


@contextmanager
def fake_server(handler: Callable, strict: bool = True):
    server = FakeServer(handler, strict)
    try:
        yield server
    finally:
        server.close()
