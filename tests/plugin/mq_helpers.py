"""Helpers shared by the plugin tests: the live tiny backend and a scriptable fake ROUTER server."""
from __future__ import annotations

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

    def __init__(self, handler: Callable):
        import zmq
        from qgis_plugin.backend_process import free_port
        self.handler = handler
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.requests: List = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        import zmq
        from shared_protocol import Reply, decode_request
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            ident, *frames = self.sock.recv_multipart()
            req = decode_request(frames)
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


@contextmanager
def fake_server(handler: Callable):
    server = FakeServer(handler)
    try:
        yield server
    finally:
        server.close()
