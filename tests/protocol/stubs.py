"""An in-process server with a torch-free stub service, for transport tests under both interpreters."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import zmq

from backend.server import Job, Server, ServerConfig, Service
from shared_protocol import Reply


class SlowService(Service):
    """classify sleeps ``params['top_k'] / 10`` seconds in steps, reporting progress; it echoes its input."""

    def __init__(self):
        self.started = threading.Event()
        self.handled = []

    def info(self, remote=False):
        return {"model": {"name": "stub"}, "device": {"type": "none"}, "adapters": []}

    def handle(self, job: Job) -> Reply:
        self.started.set()
        steps = job.request.params.get("top_k", 1)
        for i in range(steps):
            job.progress(i / steps, f"step {i}")
            time.sleep(0.1)
        self.handled.append(job.request.id)
        arrays = {k: v for k, v in job.request.arrays.items()}
        return Reply.ok(job.request.id, job.request.op, {"classes": job.request.params["classes"]}, arrays)


@contextmanager
def running_server(bind: str, service: Service = None, **config):
    ctx = zmq.Context()
    server = Server(service or SlowService(), ServerConfig(bind=bind, **config), context=ctx)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)
        ctx.term()


class CanvasService(Service):
    """localize with canvas ids, torch-free: heatmap = the canvas's first channel; ``forget()`` drops all."""

    def __init__(self):
        self.held = {}
        self.sent = []  # per request: whether the canvas came with it
        self.windows = []  # the windows arrays received

    def info(self, remote=False):
        return {"model": {"name": "stub"}, "device": {"type": "none"}, "adapters": []}

    def forget(self):
        self.held.clear()

    def handle(self, job: Job) -> Reply:
        import hashlib

        from shared_protocol import ErrorCode, ProtocolError
        canvas, params = job.request.arrays.get("canvas"), job.request.params
        self.sent.append(canvas is not None)
        if canvas is None:
            key = params["canvas_id"]
            if key not in self.held:
                raise ProtocolError(ErrorCode.NOT_FOUND, "gone", {"reason": "canvas_unknown", "canvas_id": key})
            canvas = self.held[key]
        else:
            key = hashlib.md5(canvas.tobytes()).hexdigest()
            self.held[key] = canvas.copy()
        windows = job.request.arrays.get("windows")
        if windows is not None:  # explicit windows: each scores the sum of its band 1, per query
            self.windows.append(windows.copy())
            sums = [float(canvas[y0:y1, x0:x1, 0].sum()) for x0, y0, x1, y1 in windows]
            return Reply.ok(job.request.id, "localize", {"canvas_id": key, "windows": len(windows)},
                            {"scores": np.array([sums] * len(params["queries"]), "float32")})
        return Reply.ok(job.request.id, "localize", {"canvas_id": key},
                        {"heatmaps": canvas[None, :, :, 0].astype("float32")})
