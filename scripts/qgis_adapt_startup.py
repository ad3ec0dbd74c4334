"""Run inside the QGIS desktop (``MAPQUERY_STARTUP=scripts/qgis_adapt_startup.py scripts/run_qgis.sh``): the Adapt
tab driven like a user: a raster and a labelled layer loaded, Train pressed, the report shown, then
"Where is it unsure?"; a screenshot of the main window is saved.

Environment:
  MAPQUERY_SAMPLE      the raster
  MAPQUERY_LABELS      the labelled layer (GeoPackage ...) with the field MAPQUERY_FIELD (default "landcover")
  MAPQUERY_ADAPTER     the adapter name (default "desktop-adapter")
  MAPQUERY_SCREENSHOT  PNG path;  MAPQUERY_RESULT  JSON path;  MAPQUERY_QUIT  "1": quit at the end
"""
import json
import os
import time
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface, plugins

_state = {"t0": time.monotonic(), "log": []}


def _log(text):
    _state["log"].append(f"{time.monotonic() - _state['t0']:.1f}s {text}")


def _finish(ok, error="", **extra):
    result = {"ok": ok, "error": error, "log": _state["log"],
              "layers": [lyr.name() for lyr in QgsProject.instance().mapLayers().values()], **extra}
    path = os.environ.get("MAPQUERY_RESULT")
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
    if os.environ.get("MAPQUERY_QUIT") == "1":
        QTimer.singleShot(200, QgsApplication.exit)


def _table(tab):
    t = tab.report
    return {"columns": [t.horizontalHeaderItem(j).text() for j in range(t.columnCount())],
            "rows": [t.verticalHeaderItem(i).text() for i in range(t.rowCount())],
            "cells": [[t.item(i, j).text() if t.item(i, j) else "" for j in range(t.columnCount())]
                      for i in range(t.rowCount())]}


def _start():
    plugin = plugins.get("mapquery_rs")
    if plugin is None:
        return _finish(False, "the MapQuery plugin is not loaded")
    from qgis.PyQt.QtGui import QGuiApplication
    iface.mainWindow().setGeometry(QGuiApplication.primaryScreen().availableGeometry())
    dock = plugin.show_dock()
    raster = QgsRasterLayer(os.environ["MAPQUERY_SAMPLE"], "scene")
    labels = QgsVectorLayer(os.environ["MAPQUERY_LABELS"], "labels", "ogr")
    QgsProject.instance().addMapLayer(raster)
    QgsProject.instance().addMapLayer(labels)  # above the raster
    iface.mapCanvas().setDestinationCrs(raster.crs())
    iface.mapCanvas().setExtent(raster.extent())
    iface.mapCanvas().refresh()
    tab = dock.adapt_tab
    dock.tabs.setCurrentWidget(tab)
    tab.labels_combo.setLayer(labels)
    tab.field_combo.setField(os.environ.get("MAPQUERY_FIELD", "landcover"))
    tab.raster_combo.setLayer(raster)
    tab.method_combo.setCurrentIndex(tab.method_combo.findData("instant-cache"))
    tab.name_edit.setText(os.environ.get("MAPQUERY_ADAPTER", "desktop-adapter"))
    tab.chip_size.setValue(32)
    tab.unsure_count.setValue(5)
    dock.cls_tile.setValue(50)
    tries = {"n": 0}
    _log("dock open, Adapt tab filled: " + tab.counts_label.text())

    def wait_connected():
        tries["n"] += 1
        if dock.info:
            _log("connected")
            tab.train_btn.click()
            QTimer.singleShot(300, wait_trained)
        elif tries["n"] > 300:
            _finish(False, "backend not connected: " + dock.status_label.text())
        else:
            QTimer.singleShot(200, wait_connected)

    def wait_trained():
        tries["n"] += 1
        if tab.task is not None and tab.task.done:
            if tab.task.error is not None:
                return _finish(False, f"train failed: {tab.task.message()}")
            _log("trained: " + tab.report_label.text())
            tab.unsure_btn.click()
            QTimer.singleShot(300, wait_unsure)
        elif tries["n"] > 1000:
            _finish(False, "no report after 200 s")
        else:
            QTimer.singleShot(200, wait_trained)

    def wait_unsure():
        tries["n"] += 1
        if getattr(tab, "unsure_layer", None) is not None:
            _log("label-next layer added")
            iface.mapCanvas().refreshAllLayers()
            dock.widget().ensureWidgetVisible(tab.unsure_btn)  # the dock scrolls: show the report
            QTimer.singleShot(2500, shoot)
        elif tab.task is not None and tab.task.done and tab.task.error is not None:
            _finish(False, f"unsure failed: {tab.task.message()}")
        elif tries["n"] > 1600:
            _finish(False, "no label-next layer after 120 s")
        else:
            QTimer.singleShot(200, wait_unsure)

    def shoot():
        path = os.environ.get("MAPQUERY_SCREENSHOT")
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _log(f"screenshot {path}: {iface.mainWindow().grab().save(path, 'PNG')}")
        adapters = [dock.adapter_combo.itemData(i) for i in range(dock.adapter_combo.count())]
        _finish(True, table=_table(tab), adapters=adapters, summary=tab.report_label.text(),
                unsure=tab.unsure_layer.source(), unsure_count=tab.unsure_layer.featureCount())

    QTimer.singleShot(500, wait_connected)


QTimer.singleShot(1000, _start)
