"""A Plugin Manager install: the zip from build_plugin.py, unzipped into a fresh QGIS profile, sets up the
backend's own environment offline (the project's venv as the package source) and starts a backend."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mq_helpers import ROOT, backend_python

sys.path.insert(0, str(ROOT / "scripts"))
import build_plugin  # noqa: E402


def test_zip_sets_up_and_starts_a_backend_offline(tmp_path):
    from shared_protocol.endpoints import free_address
    source = backend_python()
    if not Path(source).exists():
        pytest.skip(f"no backend Python at {source} (set BACKEND_PYTHON)")
    plugins = tmp_path / "profiles" / "default" / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(build_plugin.build(tmp_path / "mapquery_rs.zip")) as zf:
        zf.extractall(plugins)
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    # no network (a dead proxy), no pip configuration of this machine, no repository on the path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON")) and k != "MAPQUERY_TOKEN"}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path / "home"), PIP_CONFIG_FILE=os.devnull,
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", HF_HUB_OFFLINE="1",
               MAPQUERY_WEIGHTS=str(tmp_path / "weights"))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("zip_first_run.py")), str(plugins), source,
                           str(empty), free_address()], capture_output=True, text=True, timeout=900, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    profile = tmp_path / "profiles" / "default"
    venv = profile / "mapquery_rs" / "venv"
    assert out["plugin_file"].startswith(str(plugins))
    assert out["fresh"] == {"backend_python": "", "backend_dir": str(plugins / "mapquery_rs" / "_vendor")}
    assert not out["started_at_init"] and out["asked"] and out["python_found"]
    from qgis_plugin.backend_setup import detect_gpu
    assert out["gpu"] == detect_gpu().describe()
    # a bad package source: a clear message (the step, the log, the command) and no settings changed
    bad = out["bad"]
    assert out["bad_started"] and not bad["ok"] and not bad["ready"] and not bad["process"]
    assert "failed at 'Install the packages from the wheel folder'" in bad["message"]
    assert f"Log: {profile / 'mapquery_rs' / 'setup.log'}" in bad["message"]
    assert f"--no-index --find-links {tmp_path / 'no-wheels'}" in bad["message"] and "torch" in bad["message"]
    assert bad["saved_python"] == "" and bad["manager_python"] == ""
    assert not out["nonexistent_started"] and "/nonexistent/bin/python" in out["nonexistent_message"]
    # the existing environment: set up, saved, started, answering
    good = out["good"]
    assert out["good_started"] and good["ok"], out["log_tail"]
    assert good["saved_python"] == str(venv / "bin" / "python") and Path(good["saved_python"]).is_file()
    assert good["saved_dir"] == str(plugins / "mapquery_rs" / "_vendor")
    assert (venv / ".mapquery-ready").is_file() and "torch" in out["log_tail"]
    assert out["state"] == "ready", out["backend_output"]
    assert out["ping"]["pong"] is True
    assert out["info_device"]["type"] == "cpu" and out["info_device"]["reason"]
    assert f"GPU not used: {out['info_device']['reason']}" in out["device_label"]
    assert out["qgis_imported"] == []  # torch and the backend stay out of QGIS's Python
    assert out["stopped"]
    print(f"setup from the existing environment took {good['seconds']} s")


def test_plan_per_package_source(tmp_path):
    """The commands for each source: the torch index for the GPU found, the wheel folder, the reused env."""
    from qgis_plugin import backend_setup as bs
    deps = bs.project_dependencies(ROOT / "pyproject.toml")
    assert "torch>=2.1" in deps and any(d.startswith("pyzmq") for d in deps)
    venv = tmp_path / "venv"
    vpy = str(bs.venv_python(venv))
    cuda = bs.Gpu("cuda", "RTX", (12, 4))
    steps = bs.plan("/usr/bin/python3", venv, str(ROOT), bs.PackageSource(), cuda, platform="linux")
    assert steps[0].argv == ["/usr/bin/python3", "-m", "venv", "--clear", str(venv)]
    torch_step = steps[1].argv
    assert torch_step[:3] == [vpy, "-m", "pip"] and "torch>=2.1" in torch_step
    assert torch_step[-2:] == ["--index-url", "https://download.pytorch.org/whl/cu124"]
    assert set(steps[2].argv) >= set(d for d in deps if not d.startswith("torch"))
    assert steps[-1].env == {"PYTHONPATH": str(ROOT)} and str(venv / bs.READY_MARKER) in steps[-1].argv
    cpu = bs.plan("/usr/bin/python3", venv, str(ROOT), bs.PackageSource(), bs.Gpu("cpu", reason="x"), "linux")
    assert cpu[1].argv[-1] == "https://download.pytorch.org/whl/cpu"
    assert bs.torch_index(bs.Gpu("cuda", "old", (11, 8))).endswith("/cu118")
    assert bs.torch_index(bs.Gpu("cuda", "old", (11, 2))).endswith("/cpu")  # no CUDA wheel that driver runs
    assert bs.torch_index(cuda, platform="darwin") is None
    wheels = bs.plan("/usr/bin/python3", venv, str(ROOT), bs.PackageSource(bs.WHEELS, str(tmp_path)), cuda)
    assert [s.title for s in wheels][1] == "Install the packages from the wheel folder"
    assert wheels[1].argv[5:8] == ["--no-index", "--find-links", str(tmp_path)] and set(deps) <= set(wheels[1].argv)
    reuse = bs.plan("/usr/bin/python3", venv, str(ROOT), bs.PackageSource(bs.REUSE, sys.executable), cuda)
    assert reuse[0].argv == [sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)]
    with pytest.raises(bs.SetupError, match="wheel folder"):
        bs.plan("/usr/bin/python3", venv, str(ROOT), bs.PackageSource(bs.WHEELS, str(tmp_path / "no")), cuda)


def test_finding_python_and_the_gpu(tmp_path):
    from qgis_plugin import backend_setup as bs
    which = {"python3": "/usr/bin/python3", "nvidia-smi": None}.get
    assert bs.python_candidates("/usr/bin/qgis", "/usr", windows=False, which=which) == ["/usr/bin/python3"]
    assert bs.python_candidates("/usr/bin/python3.11", "/usr", windows=False, which=lambda n: None) == [
        "/usr/bin/python3.11"]
    win = bs.python_candidates(r"C:/OSGeo4W/bin/qgis-bin.exe", r"C:/OSGeo4W/apps/Python312", windows=True,
                               which=lambda n: None)
    assert win[0] == str(Path(r"C:/OSGeo4W/apps/Python312") / "python.exe")
    assert bs.find_python([str(tmp_path / "none"), sys.executable]) == sys.executable
    assert bs.find_python([str(tmp_path / "none")]) is None and "python3" in bs.no_python_message()
    assert bs.detect_gpu(which=lambda n: None).reason.startswith("no NVIDIA driver")

    class Done:
        def __init__(self, stdout):
            self.stdout, self.returncode = stdout, 0

    def smi(argv, **kw):
        return Done("NVIDIA H100 80GB HBM3\n" if "--query-gpu=name" in argv else
                    "| NVIDIA-SMI 550.54  Driver Version: 550.54  CUDA Version: 12.4 |")
    gpu = bs.detect_gpu(run=smi, which=lambda n: "/usr/bin/nvidia-smi")
    assert (gpu.kind, gpu.name, gpu.cuda) == ("cuda", "NVIDIA H100 80GB HBM3", (12, 4))


def test_first_run_can_connect_to_a_running_backend_instead(qgis_app, project, tmp_path):
    """'Connect to a running backend…' opens the settings in 'connect' mode; Cancel there changes nothing."""
    import qgis_plugin
    from qgis.PyQt.QtCore import QTimer
    from qgis.PyQt.QtWidgets import QApplication
    from qgis_plugin.settings import Settings
    from qgis_plugin.settings_dialog import SettingsDialog
    from test_dock import FakeIface, spin
    Settings(mode="start", backend_python="", output_dir=str(tmp_path)).save()
    iface = FakeIface()
    plugin = qgis_plugin.classFactory(iface)
    plugin.initGui()
    seen = []
    try:
        dock = plugin.show_dock()
        for answer in ("cancel", "ok"):
            dock.start_backend()
            assert dock.first_run.box is not None and plugin.manager.process is None

            def answer_dialog(answer=answer):
                dlg = QApplication.activeModalWidget()
                seen.append((type(dlg).__name__, dlg.mode.currentData() if isinstance(dlg, SettingsDialog) else None))
                if answer == "ok":
                    dlg.address.setText("tcp://127.0.0.1:6553")
                    dlg.accept()
                else:
                    dlg.reject()
            QTimer.singleShot(300, answer_dialog)
            dock.first_run.box.buttons_by_choice["connect"].click()
            want = 1 if answer == "cancel" else 2
            spin(lambda want=want: len(seen) == want, 10)
            spin(lambda: dock.first_run.box is None, 10)
            if answer == "cancel":
                assert plugin.manager.settings.mode == "start" and Settings.load().mode == "start"
        assert seen == [("SettingsDialog", "connect"), ("SettingsDialog", "connect")]
        assert plugin.manager.settings.mode == "connect" and Settings.load().address == "tcp://127.0.0.1:6553"
    finally:
        plugin.unload()


def test_a_backend_python_without_the_packages_is_named(qgis_app, project, tmp_path):
    """QGIS's own interpreter as the backend Python: the failure says so and how to set one up."""
    import qgis_plugin
    from qgis.core import Qgis
    from qgis_plugin.backend_process import free_port
    from qgis_plugin.settings import Settings
    from test_dock import FakeIface, spin
    Settings(mode="start", backend_python=sys.executable, backend_dir="", address=f"tcp://127.0.0.1:{free_port()}",
             output_dir=str(tmp_path)).save()
    iface = FakeIface()
    plugin = qgis_plugin.classFactory(iface)
    plugin.initGui()
    try:
        plugin.show_dock()
        spin(lambda: any(level == Qgis.Critical for level, _ in iface.bar.messages), 30)
        text = [m for level, m in iface.bar.messages if level == Qgis.Critical][0]
        assert "No module named" in text and f"{sys.executable} lacks the backend's packages" in text
    finally:
        plugin.unload()
