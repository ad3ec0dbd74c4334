"""localize on an 8192 x 8192 canvas through a live server, with the default SeLo settings."""
import time

import numpy as np
import pytest

from backend.process import start_server
from backend.tasks.windows import selo_windows
from shared_protocol.client import Client


@pytest.mark.slow
def test_localize_8192_canvas():
    size = 8192
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:, :, 1] = (np.arange(size) // 97 % 255).astype(np.uint8)[None, :]  # cheap structure
    canvas[2000:3000, 5000:7000] = [20, 60, 200]
    with start_server(["--model", "tiny", "--random-weights", "--device", "cpu"]) as server, \
            Client(server.address, timeout=900) as client:
        client.hello()
        t = time.perf_counter()
        reply = client.localize(canvas, ["a lake"])
        cold = time.perf_counter() - t
        heat = reply.arrays["heatmaps"]
        assert heat.shape == (1, size, size) and heat.dtype == np.float32
        assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0.5
        assert reply.result["windows"] == sum(len(selo_windows(size, size, s)) for s in (256, 512, 768))
        t = time.perf_counter()
        client.localize(canvas, ["a harbour"])
        assert time.perf_counter() - t < cold  # the windows come from the cache
