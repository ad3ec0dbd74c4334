"""The step runner behind the setup and weights dialogs: progress, log, failure message; the weights download."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mq_helpers import ROOT, backend_python
from test_dock import spin


def test_runner_reports_progress_logs_and_stops_at_the_first_failure(qgis_app, tmp_path):
    from qgis_plugin.backend_setup import Step
    from qgis_plugin.setup_dialog import StepRunner
    py = sys.executable
    steps = [Step("one", [py, "-c", "print('progress 0.5 halfway'); print('first done')"]),
             Step("two", [py, "-c", "import sys; print('about to fail'); sys.exit(3)"], env={"MQ_X": "y z"}),
             Step("three", [py, "-c", "open(sys.argv[1], 'w')", str(tmp_path / "never")])]
    log = tmp_path / "logs" / "setup.log"
    runner = StepRunner(steps, log)
    fractions, titles = [], []
    runner.progress.connect(fractions.append)
    runner.stepStarted.connect(lambda i, n, t: titles.append((i, n, t)))
    runner.start()
    spin(lambda: runner.done, 60)
    assert not runner.ok and titles == [(0, 3, "one"), (1, 3, "two")]
    assert 0.5 / 3 in fractions and fractions == sorted(fractions)
    assert runner.message.startswith("Setting up the backend failed at 'two' (exit code 3). It said: about to fail")
    assert f"Log: {log}" in runner.message and "MQ_X='y z' " + py in runner.message
    text = log.read_text()
    assert "first done" in text and "about to fail" in text and "== exit code 3" in text
    assert not (tmp_path / "never").exists()


def test_runner_names_a_command_that_cannot_run(qgis_app, tmp_path):
    from qgis_plugin.backend_setup import Step
    from qgis_plugin.setup_dialog import StepRunner
    runner = StepRunner([Step("missing", [str(tmp_path / "no-python"), "-V"])], tmp_path / "x.log")
    runner.start()
    spin(lambda: runner.done, 30)
    assert not runner.ok and "failed at 'missing'" in runner.message and str(tmp_path / "no-python") in runner.message


def test_weights_download_offline_says_exactly_what_to_do(qgis_app, tmp_path, monkeypatch):
    from qgis_plugin.settings import Settings
    from qgis_plugin.setup_dialog import StepsDialog, weights_download_step
    if not Path(backend_python()).exists():
        pytest.skip("no backend Python (set BACKEND_PYTHON)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MAPQUERY_WEIGHTS", str(tmp_path / "weights"))
    settings = Settings(backend_python=backend_python(), backend_dir=str(ROOT))
    dlg = StepsDialog("weights", [weights_download_step(settings, "georsclip-vit-b-32")], tmp_path / "w.log")
    spin(lambda: dlg.runner.done, 120)
    assert not dlg.runner.ok
    said = dlg.result_label.text()
    assert "https://huggingface.co/Zilun/GeoRSCLIP/resolve/main/ckpt/RS5M_ViT-B-32.pt" in said
    assert str(tmp_path / "weights" / "RS5M_ViT-B-32.pt") in said and "Log:" in said
    assert not (tmp_path / "weights" / "RS5M_ViT-B-32.pt").exists()


def test_cancel_kills_the_running_step(qgis_app, tmp_path):
    import time
    from qgis_plugin.backend_setup import Step
    from qgis_plugin.setup_dialog import StepRunner
    runner = StepRunner([Step("slow", [sys.executable, "-c", "import time; print('started', flush=True); "
                                                              "time.sleep(60)"]),
                         Step("after", [sys.executable, "-c", "open(sys.argv[1], 'w')", str(tmp_path / "x")])],
                        tmp_path / "c.log")
    runner.start()
    spin(lambda: "started" in runner.tail, 30)
    t0 = time.monotonic()
    runner.cancel()
    spin(lambda: runner.done, 10)
    assert time.monotonic() - t0 < 5 and not runner.ok and runner.message.startswith("Setup cancelled during 'slow'")
    assert not (tmp_path / "x").exists()
