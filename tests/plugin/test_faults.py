"""kill -9 of the backend during a localize task: QGIS stays responsive, the user gets a plain error in time,
nothing half-written is left, and the restarted backend serves the next request."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
from qgis.core import QgsApplication

from shared_protocol import ErrorCode

from qgis_plugin.capture import Capture
from qgis_plugin.sources import CaptureSource
from qgis_plugin.tools.base import Common
from qgis_plugin.tools.localize import LocalizeParams, LocalizeProcessor
from qgis_plugin.tasks import MapQueryTask, run_and_wait


def _capture(size=1200):
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Capture(pixels=pixels, transform=(30.0, 0.0, 500000.0, 0.0, -30.0, 4200000.0), crs_wkt="",
                   crs_authid="EPSG:32618", source="synthetic")


def test_kill_9_during_localize_keeps_qgis_responsive(qgis_app, tmp_path):
    from mq_helpers import start_live_backend
    proc, settings = start_live_backend()
    settings.timeout_s, settings.retries = 30.0, 0
    cap = _capture()
    try:
        task = MapQueryTask(LocalizeProcessor(CaptureSource(cap), LocalizeParams(["a river"], [24, 32, 48], 0),
                                              Common(tmp_path)), settings)
        QgsApplication.taskManager().addTask(task)
        started, killed_at, worst_gap, last = time.monotonic(), None, 0.0, time.monotonic()
        while not task.done and time.monotonic() - started < 60:
            QgsApplication.processEvents()  # the main thread: every turn of the event loop is timed
            now = time.monotonic()
            worst_gap, last = max(worst_gap, now - last), now
            if killed_at is None and task.progress() > 0:
                os.kill(proc.proc.pid, signal.SIGKILL)  # the request is in flight on the backend
                killed_at = now
            time.sleep(0.005)
        assert killed_at is not None, "the request never reported progress"
        assert task.done and task.outcome is None
        assert task.error.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT)
        assert time.monotonic() - killed_at < settings.timeout_s
        assert worst_gap < 0.5, f"the event loop stalled for {worst_gap:.2f} s"
        assert "localize" in task.message() and "Traceback" not in task.message()
        assert list(tmp_path.iterdir()) == []  # no partial output
        proc2, _ = start_live_backend(address=settings.address)
        try:
            again = run_and_wait(MapQueryTask(LocalizeProcessor(CaptureSource(_capture(200)),
                                                                LocalizeParams(["a river"]), Common(tmp_path)),
                                              settings), timeout=120)
            assert again.error is None and again.outcome.layers
        finally:
            proc2.stop()
    finally:
        proc.stop()
