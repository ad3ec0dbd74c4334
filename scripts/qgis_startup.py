"""Run inside the QGIS desktop (``qgis --code scripts/qgis_startup.py``): open the MapQuery dock, load a raster.

Environment (all optional):
  MAPQUERY_SAMPLE      raster to load (default ../shared/data/RGB.byte.tif when present)
  MAPQUERY_AUTORUN     a localize query to run at once through the dock
  MAPQUERY_SCREENSHOT  PNG path: after the autorun's heatmap is drawn, save a screenshot of the main window
  MAPQUERY_RESULT      JSON path: write what happened (layers, messages) there
  MAPQUERY_QUIT        "1": quit QGIS after the screenshot
"""
import json
import os
import sys
import time
from pathlib import Path

from qgis.core import QgsApplication, QgsLayerTreeGroup, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface, plugins

_state = {"t0": time.monotonic(), "log": [], "phase": "start"}


def _log(text):
    _state["log"].append(f"{time.monotonic() - _state['t0']:.1f}s {text}")


def _layout():
    """The dock's size and the labels it clips (``clipped_labels`` of the plugin's dock module)."""
    plugin = plugins.get("mapquery_rs")
    dock = getattr(plugin, "dock", None)
    if dock is None:
        return {}
    module = sys.modules[type(dock).__module__]
    return {"window": [iface.mainWindow().width(), iface.mainWindow().height()],
            "dock": [dock.width(), dock.height()], "clipped": module.clipped_labels(dock)}


def _finish(ok, error=""):
    result = {"ok": ok, "error": error, "log": _state["log"],
              "layers": [lyr.name() for lyr in QgsProject.instance().mapLayers().values()],
              "sources": {lyr.name(): lyr.source() for lyr in QgsProject.instance().mapLayers().values()},
              "groups": [g.name() for g in QgsProject.instance().layerTreeRoot().children()
                         if isinstance(g, QgsLayerTreeGroup)], **_layout()}
    path = os.environ.get("MAPQUERY_RESULT")
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
    if os.environ.get("MAPQUERY_QUIT") == "1":
        QTimer.singleShot(200, QgsApplication.exit)


def _start():
    plugin = plugins.get("mapquery_rs")
    if plugin is None:
        _log(f"plugin not loaded; loaded: {sorted(plugins)}")
        return _finish(False, "the MapQuery plugin is not loaded")
    from qgis.PyQt.QtGui import QGuiApplication
    iface.mainWindow().setGeometry(QGuiApplication.primaryScreen().availableGeometry())  # the whole (small) screen
    dock = plugin.show_dock()
    _log("dock open")
    sample = os.environ.get("MAPQUERY_SAMPLE") or str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                      "RGB.byte.tif")
    if Path(sample).is_file():
        layer = QgsRasterLayer(sample, Path(sample).stem)
        QgsProject.instance().addMapLayer(layer)
        iface.mapCanvas().setDestinationCrs(layer.crs())
        iface.mapCanvas().setExtent(layer.extent())
        iface.mapCanvas().refresh()
        _log(f"loaded {sample}")
    query = os.environ.get("MAPQUERY_AUTORUN")
    if not query:
        return
    dock.resolution.setValue(0.0)  # the view's own resolution
    dock.localize_edit.setText(query)
    dock.tabs.setCurrentIndex(2)

    tries = {"connect": 0, "done": 0}

    def wait_connected():
        tries["connect"] += 1
        if dock.info:
            _log("connected: " + dock.status_label.text())
            dock.run_tool("localize")
            QTimer.singleShot(300, wait_done)
        elif tries["connect"] > 300:
            _finish(False, "backend not connected: " + dock.status_label.text())
        else:
            QTimer.singleShot(200, wait_connected)

    def wait_done():
        tries["done"] += 1
        groups = [g for g in QgsProject.instance().layerTreeRoot().children() if isinstance(g, QgsLayerTreeGroup)]
        if groups:
            _log(f"group {groups[0].name()} added")
            iface.mapCanvas().refreshAllLayers()
            QTimer.singleShot(3000, shoot)
        elif tries["done"] > 600:
            _finish(False, "no result layer after 120 s")
        else:
            QTimer.singleShot(200, wait_done)

    def shoot():
        path = os.environ.get("MAPQUERY_SCREENSHOT")
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            ok = iface.mainWindow().grab().save(path, "PNG")
            _log(f"screenshot {path}: {ok}")
        _finish(True)

    QTimer.singleShot(500, wait_connected)


QTimer.singleShot(1000, _start)
