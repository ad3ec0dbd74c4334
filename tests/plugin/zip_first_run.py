"""Driven by test_first_run.py in a fresh QGIS Python: the plugin unzipped into a fresh profile, set up as a
user would from the dock (a failing package source first, then an existing environment), then started.

argv: PLUGINS_DIR (…/profile/python/plugins) REUSE_PYTHON EMPTY_WHEEL_DIR ADDRESS; prints one JSON line.
"""
import json
import sys
import time
from pathlib import Path

plugins, reuse_python, empty_wheels, address = sys.argv[1:5]
profile = Path(plugins).parents[1]
sys.path.insert(0, plugins)
sys.path.append("/usr/share/qgis/python/plugins")

from qgis.core import Qgis, QgsApplication, QgsSettings  # noqa: E402
from qgis.PyQt.QtCore import QCoreApplication, QSettings  # noqa: E402
from qgis.PyQt.QtWidgets import QMainWindow  # noqa: E402

app = QgsApplication([], False, str(profile))
app.initQgis()
QCoreApplication.setOrganizationName("MapQueryRSFirstRun")
QSettings.setPath(QSettings.NativeFormat, QSettings.UserScope, str(profile))
out = {"profile": QgsApplication.qgisSettingsDirPath()}


class Bar:
    def __init__(self):
        self.messages = []

    def pushMessage(self, title, text, level=Qgis.Info, duration=5):  # noqa: N802
        self.messages.append((int(level), text))


class Iface:
    def __init__(self):
        from qgis.gui import QgsMapCanvas
        self.window = QMainWindow()
        self.canvas = QgsMapCanvas(self.window)
        self.bar = Bar()

    def mainWindow(self): return self.window  # noqa: E704,N802
    def mapCanvas(self): return self.canvas  # noqa: E704,N802
    def messageBar(self): return self.bar  # noqa: E704,N802
    def addDockWidget(self, area, dock): self.window.addDockWidget(area, dock)  # noqa: E704,N802
    def removeDockWidget(self, dock): self.window.removeDockWidget(dock)  # noqa: E704,N802
    def addPluginToMenu(self, *a): pass  # noqa: E704,N802
    def removePluginMenu(self, *a): pass  # noqa: E704,N802
    def addToolBarIcon(self, *a): pass  # noqa: E704,N802
    def removeToolBarIcon(self, *a): pass  # noqa: E704,N802


def spin(cond, timeout):
    end = time.monotonic() + timeout
    while not cond():
        QgsApplication.processEvents()
        if time.monotonic() > end:
            raise TimeoutError("timed out")
        time.sleep(0.02)


import mapquery_rs  # noqa: E402
from mapquery_rs import backend_setup as bs  # noqa: E402
from mapquery_rs.connection import make_client  # noqa: E402
from mapquery_rs.settings import Settings  # noqa: E402

out["plugin_file"] = mapquery_rs.__file__
fresh = Settings.load()
out["fresh"] = {"backend_python": fresh.backend_python, "backend_dir": fresh.backend_dir}
# a fresh profile; only what this test needs offline: the tiny model with random weights on a free port
Settings(address=address, model="tiny", extra_args="--random-weights", offline=True, timeout_s=30).save()

iface = Iface()
plugin = mapquery_rs.classFactory(iface)
plugin.initGui()
out["started_at_init"] = plugin.manager.process is not None
dock = plugin.show_dock()
dock.start_backend()  # Start with no backend Python: the plugin asks what to do
out["asked"] = dock.first_run.box is not None and plugin.manager.process is None
dock.first_run.box.buttons_by_choice["setup"].click()
spin(lambda: dock.first_run.dialog is not None, 10)
dlg = dock.first_run.dialog
out["python_found"] = dlg.python_edit.text()
spin(dlg._gpu_detected, 60)  # nvidia-smi runs in a thread
out["gpu"] = dlg.gpu_label.text()

# 1. a bad package source: an empty wheel folder
dlg.source_combo.setCurrentIndex(dlg.source_combo.findData(bs.WHEELS))
dlg.path_edit.setText(empty_wheels)
out["bad_started"] = dlg.start()
spin(lambda: dlg.runner.done, 300)
out["bad"] = {"ok": dlg.runner.ok, "message": dlg.error_label.text(), "log": str(dlg.log),
              "saved_python": QgsSettings().value("mapquery_rs/backend_python", ""),
              "manager_python": plugin.manager.settings.backend_python, "ready": bs.is_ready(dlg.venv),
              "process": plugin.manager.process is not None}
# and one that cannot even begin
dlg.source_combo.setCurrentIndex(dlg.source_combo.findData(bs.REUSE))
dlg.path_edit.setText("/nonexistent/bin/python")
out["nonexistent_started"] = dlg.start()
out["nonexistent_message"] = dlg.error_label.text()

# 2. an existing environment as the package source (no network)
dlg.path_edit.setText(reuse_python)
t0 = time.monotonic()
out["good_started"] = dlg.start()
spin(lambda: dlg.runner.done, 600)
out["good"] = {"ok": dlg.runner.ok, "message": dlg.runner.message, "seconds": round(time.monotonic() - t0, 1),
               "saved_python": QgsSettings().value("mapquery_rs/backend_python", ""),
               "saved_dir": QgsSettings().value("mapquery_rs/backend_dir", ""), "venv": str(dlg.venv)}
out["log_tail"] = Path(dlg.log).read_text()[-1500:]
spin(lambda: plugin.manager.process is not None, 10)  # started at once after the setup
spin(lambda: plugin.manager.process_state() in ("ready", "failed"), 300)
out["state"] = plugin.manager.process_state()
out["backend_output"] = plugin.manager.output()[-8:]
if out["state"] == "ready":
    with make_client(plugin.manager.settings, timeout=10, retries=0) as client:
        out["ping"] = client.ping()
        out["info_device"] = client.info()["device"]
    spin(lambda: dock.info.get("model", {}).get("name") == "tiny", 30)
    out["device_label"] = dock.device_label.text()
out["qgis_imported"] = sorted(m for m in ("torch", "backend", "open_clip") if m in sys.modules)
plugin.unload()
out["stopped"] = plugin.manager.process is None
out["messages"] = iface.bar.messages
print(json.dumps(out))
