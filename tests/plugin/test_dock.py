"""The plugin as QGIS loads it (classFactory -> initGui), its dock driven like a user would, headless."""
from __future__ import annotations

import time

import numpy as np
import pytest
from qgis.core import Qgis, QgsApplication, QgsLayerTreeGroup, QgsRasterLayer
from qgis.PyQt.QtCore import Qt
from qgis.gui import QgsMapCanvas
from qgis.PyQt.QtWidgets import QMainWindow


class FakeBar:
    def __init__(self):
        self.messages = []

    def pushMessage(self, title, text, level=Qgis.Info, duration=5):  # noqa: N802
        self.messages.append((level, text))


class FakeIface:
    """The parts of QgisInterface the plugin uses, with a real map canvas."""

    def __init__(self):
        self.window = QMainWindow()
        self.canvas = QgsMapCanvas(self.window)
        self.canvas.resize(600, 400)
        self.bar = FakeBar()
        self.menu, self.toolbar = [], []

    def mainWindow(self):  # noqa: N802
        return self.window

    def mapCanvas(self):  # noqa: N802
        return self.canvas

    def messageBar(self):  # noqa: N802
        return self.bar

    def addDockWidget(self, area, dock):  # noqa: N802
        self.window.addDockWidget(area, dock)

    def removeDockWidget(self, dock):  # noqa: N802
        self.window.removeDockWidget(dock)

    def addPluginToMenu(self, name, action):  # noqa: N802
        self.menu.append(action)

    def removePluginMenu(self, name, action):  # noqa: N802
        self.menu.remove(action)

    def addToolBarIcon(self, action):  # noqa: N802
        self.toolbar.append(action)

    def removeToolBarIcon(self, action):  # noqa: N802
        self.toolbar.remove(action)


def spin(condition, timeout=60.0):
    end = time.monotonic() + timeout
    while not condition():
        QgsApplication.processEvents()
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def load_plugin(live_backend, layer, tmp_path):
    """The plugin as QGIS loads it (classFactory, initGui) on a fake iface whose canvas shows ``layer``."""
    import qgis_plugin
    from qgis_plugin.settings import Settings
    Settings(mode="connect", address=live_backend.address, timeout_s=60, output_dir=str(tmp_path / "outputs")).save()
    iface = FakeIface()
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setLayers([layer])
    iface.canvas.setExtent(layer.extent())
    plugin = qgis_plugin.classFactory(iface)
    plugin.initGui()
    return plugin, iface


@pytest.fixture
def plugin(qgis_app, project, live_backend, data_dir, tmp_path):
    """The loaded plugin; unloading it leaves the Processing registry as it found it."""
    registry = QgsApplication.processingRegistry()
    before = registry.providerById("mapquery")  # None, unless a test left one behind
    layer = QgsRasterLayer(str(data_dir / "RGB.byte.tif"), "rgb")
    project.addMapLayer(layer)
    plugin, iface = load_plugin(live_backend, layer, tmp_path)
    assert registry.providerById("mapquery") is not None
    yield plugin, iface, layer
    plugin.unload()
    assert registry.providerById("mapquery") is before and not iface.menu


def test_plugin_beside_processing_and_a_registered_provider(processing_ready, qgis_app, project, live_backend,
                                                             data_dir, tmp_path):
    """Processing loaded, a 'mapquery' provider registered already (a reloaded or second copy of the plugin):
    the plugin loads, its dock works, and unloading it leaves that provider, which is not its own."""
    foreign = processing_ready.providerById("mapquery")
    layer = QgsRasterLayer(str(data_dir / "RGB.byte.tif"), "rgb")
    project.addMapLayer(layer)
    plugin, iface = load_plugin(live_backend, layer, tmp_path)
    try:
        assert plugin.provider is None and processing_ready.providerById("mapquery") is foreign
        dock = plugin.show_dock()
        spin(lambda: "connected" in dock.status_label.text() and "not" not in dock.status_label.text())
        dock.resolution.setValue(600.0)
        dock.localize_edit.setText("a river")
        dock.run_tool("localize")
        spin(lambda: iface.bar.messages and dock.active is None)
        assert iface.bar.messages[-1][1].startswith("localize"), iface.bar.messages
    finally:
        plugin.unload()
    assert processing_ready.providerById("mapquery") is foreign and not iface.menu


def test_plugin_registers_and_removes_its_own_provider_beside_processing(processing_initialized, qgis_app,
                                                                          live_backend, data_dir, tmp_path):
    """Processing loaded before the plugin (as in QGIS): the plugin registers its provider, unload removes it."""
    registry = processing_initialized
    assert registry.providerById("mapquery") is None
    plugin, iface = load_plugin(live_backend, QgsRasterLayer(str(data_dir / "RGB.byte.tif"), "rgb"), tmp_path)
    try:
        assert plugin.provider is not None and registry.providerById("mapquery") is plugin.provider
        assert sorted(a.name() for a in plugin.provider.algorithms())[0] == "adapt"
    finally:
        plugin.unload()
    assert registry.providerById("mapquery") is None


def test_dock_shows_status_and_runs_the_three_tools(plugin, project, tmp_path):
    plugin, iface, layer = plugin
    dock = plugin.show_dock()
    assert dock is not None and dock.isVisible() is not None
    spin(lambda: "connected" in dock.status_label.text() and "not" not in dock.status_label.text())
    assert dock.model_label.text() == "tiny (tiny-vit)" and "random" in dock.weights_label.text()
    assert dock.protocol_label.text() == "1" and dock.preset_combo.count() >= 5
    dock.preset_combo.setCurrentText("eurosat")
    dock.load_class_preset()
    assert len(dock.classes_edit.toPlainText().splitlines()) == 10
    dock.resolution.setValue(600.0)
    dock.cls_unit.setCurrentIndex(dock.cls_unit.findData("map units"))
    dock.cls_tile.setValue(96 * 600.0)
    def capture_layer_extent():
        dock.source_combo.setCurrentIndex(dock.source_combo.findData("layer"))
        dock.layer_combo.setLayer(layer)

    def capture_view():
        dock.source_combo.setCurrentIndex(dock.source_combo.findData("view"))
        dock.search_edit.setText("a river")
        dock.srch_tile.setValue(64)  # enough tiles off the nodata collar for ten hits
    for tool, setup in (("classify", capture_layer_extent), ("search", capture_view),
                        ("localize", lambda: dock.localize_edit.setText("forest; a river"))):
        setup()
        seen = len(iface.bar.messages)
        dock.run_tool(tool)  # capture (asynchronous rendering), then a QgsTask; a message when it is done
        spin(lambda seen=seen: len(iface.bar.messages) > seen and dock.active is None)
        assert iface.bar.messages[-1][1].startswith(tool)
        errors = [m for lvl, m in iface.bar.messages if lvl == Qgis.Critical]
        assert not errors, errors
    groups = [c for c in project.layerTreeRoot().children() if isinstance(c, QgsLayerTreeGroup)]
    assert [g.name() for g in groups] == ["MapQuery: localize: forest; a river [rgb, map view]",
                                          "MapQuery: search: a river [rgb, map view]",
                                          "MapQuery: classify (10 classes, 96 px tiles) [rgb, layer extent]"]
    assert len(groups[0].findLayers()) == 2  # one heatmap per query
    grid = groups[2].findLayers()[0].layer()
    # 96 px tiles over the layer's extent (396 x 359 px at 600 m, 5 x 4 tiles), but those mostly in the raster's
    # nodata collar get no label
    from qgis_plugin.capture import render_extent
    from qgis_plugin.tools.base import grid_windows
    cap = render_extent([layer], layer.extent(), layer.crs(), 600.0)
    valid = cap.valid()
    _, windows = grid_windows(cap.height, cap.width, 96)
    assert len(windows) == 5 * 4
    kept = [i for i, (x0, y0, x1, y1) in enumerate(windows) if valid[y0:y1, x0:x1].mean() >= 0.5]
    assert sorted(f["tile"] for f in grid.getFeatures()) == kept and 0 < len(kept) < 20
    # the class table: tiles and areas per class (cells of 96 x 600 m in UTM: planar area within 0.5 %)
    import csv
    counts = {}
    for f in grid.getFeatures():
        c = counts.setdefault(f["label"], [0, 0.0])
        c[0] += 1
        c[1] += f.geometry().area() / 1e6
    assert {r["label"]: r["tiles"] for r in dock.class_rows} == {k: n for k, (n, _) in counts.items()}
    for r in dock.class_rows:
        assert r["area_km2"] == pytest.approx(counts[r["label"]][1], rel=5e-3)
    assert dock.class_table.rowCount() == len(counts)
    written = list(csv.DictReader(open(dock.export_class_table(str(tmp_path / "classes.csv")))))
    assert [(w["label"], int(w["tiles"])) for w in written] == [(r["label"], r["tiles"]) for r in dock.class_rows]
    assert sum(float(w["share"]) for w in written) == pytest.approx(1.0)
    sources = [lyr.layer().source().split("|")[0] for g in groups for lyr in g.findLayers()]
    assert all(__import__("pathlib").Path(s).parent == (tmp_path / "outputs") for s in sources)
    # the heatmap's regions at a threshold, from the dock
    got = []
    dock.threshold.setValue(0.5)
    dock.heatmap_regions(then=got.append)
    spin(lambda: got)
    assert got[0].featureCount() > 0 and got[0].customProperty("mapquery_rs/output") == "regions"
    assert project.layerTreeRoot().children()[0].name().startswith("MapQuery: regions >= 0.5: ")
    # the search hits are listed; clicking one zooms the canvas onto that tile
    assert dock.results.rowCount() == 10
    hit = dock.search_hits[0]
    dock.zoom_to_hit(0)
    ext = iface.canvas.extent()
    assert ext.contains(__import__("qgis.core", fromlist=["QgsPointXY"]).QgsPointXY(
        (hit["xmin"] + hit["xmax"]) / 2, (hit["ymin"] + hit["ymax"]) / 2))
    assert ext.center().x() == pytest.approx((hit["xmin"] + hit["xmax"]) / 2, abs=ext.width() / 50)
    assert ext.center().y() == pytest.approx((hit["ymin"] + hit["ymax"]) / 2, abs=ext.height() / 50)


def test_dock_reads_raw_bands_in_a_background_task(plugin, project):
    plugin, iface, layer = plugin
    dock = plugin.show_dock()
    spin(lambda: "connected" in dock.status_label.text() and "not" not in dock.status_label.text())
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("bands"))
    dock.layer_combo.setLayer(layer)
    got = []
    dock.capture_async(got.append)
    assert got == []  # the read is queued in QGIS's task manager, not done on the main thread
    spin(lambda: got)
    cap = got[0]
    assert cap.pixels.shape == (layer.height(), layer.width(), 3) and cap.pixels.dtype.name == "uint8"
    assert cap.crs_authid == "EPSG:32618" and cap.transform[0] == pytest.approx(layer.rasterUnitsPerPixelX())
    seen = len(iface.bar.messages)
    dock.localize_edit.setText("a river")
    dock.run_tool("localize")
    spin(lambda seen=seen: len(iface.bar.messages) > seen and dock.active is None)
    assert iface.bar.messages[-1][1].startswith("localize"), iface.bar.messages[-1]


def test_dock_reports_a_dead_backend(plugin, tmp_path):
    from qgis_plugin.backend_process import free_port
    plugin, iface, _ = plugin
    dock = plugin.show_dock()
    dock.manager.settings.address = f"tcp://127.0.0.1:{free_port()}"
    dock.manager.settings.timeout_s = 1.0
    dock.manager.settings.retries = 0
    dock.poll()
    spin(lambda: "not connected" in dock.status_label.text(), 20)
    dock.resolution.setValue(2000.0)
    dock.localize_edit.setText("x")
    dock.run_tool("localize")
    spin(lambda: iface.bar.messages and dock.active is None, 30)
    level, text = iface.bar.messages[-1]
    assert level == Qgis.Critical and ("not reachable" in text or "did not answer" in text)


def test_plugin_starts_restarts_and_stops_its_own_backend(qgis_app, project, tmp_path):
    """Mode 'start': the plugin launches the backend, restarts it after a crash, and stops it on unload."""
    import qgis_plugin
    from mq_helpers import ROOT, backend_python
    from qgis_plugin.backend_process import free_port
    from qgis_plugin.settings import Settings
    from pathlib import Path
    if not Path(backend_python()).exists():
        pytest.skip("no backend Python (set BACKEND_PYTHON)")
    Settings(mode="start", address=f"tcp://127.0.0.1:{free_port()}", backend_python=backend_python(),
             backend_dir=str(ROOT), model="tiny", extra_args="--random-weights", offline=False,
             output_dir=str(tmp_path)).save()
    iface = FakeIface()
    plugin = qgis_plugin.classFactory(iface)
    plugin.initGui()  # starts the backend in the background at once
    try:
        first = plugin.manager.process
        assert first is not None and first.running
        dock = plugin.show_dock()
        spin(lambda: dock.info.get("model", {}).get("name") == "tiny", 120)
        first.proc.kill()  # the backend crashes
        spin(lambda: plugin.manager.process is not first, 30)
        assert any("restarting" in m for _, m in iface.bar.messages)
        dock.info = {}
        spin(lambda: dock.info.get("model", {}).get("name") == "tiny", 120)
        second = plugin.manager.process
        assert second.running
    finally:
        plugin.unload()  # what QGIS does when it quits
    assert not second.running and plugin.manager.process is None


def test_settings_dialog_round_trip(qgis_app):
    from qgis_plugin.settings import Settings
    from qgis_plugin.settings_dialog import SettingsDialog
    s = Settings(mode="connect", address="tcp://10.1.2.3:6000", token="tok", timeout_s=42.0, retries=2,
                 backend_python="/opt/py", backend_dir="/src", model="tiny", extra_args="--device cpu",
                 offline=False, output_dir="res", heatmap_opacity=0.35)
    dlg = SettingsDialog(s)
    assert dlg.settings() == s
    assert not dlg.python.isEnabled()  # start-only fields are off in 'connect' mode
    dlg.mode.setCurrentIndex(dlg.mode.findData("start"))
    assert dlg.python.isEnabled() and dlg.settings().mode == "start"


def test_dock_fits_a_1280x800_screen_without_clipped_labels(plugin):
    from qgis.PyQt.QtWidgets import QScrollArea
    from qgis_plugin.dock import clipped_labels
    plugin, iface, _ = plugin
    iface.window.setCentralWidget(iface.canvas)  # the map takes what the dock leaves, as in QGIS
    iface.window.resize(1280, 800)
    iface.window.show()
    dock = plugin.show_dock()
    spin(lambda: "connected" in dock.status_label.text() and "not" not in dock.status_label.text())
    dock.set_info({**dock.info, "model": {**dock.info["model"], "random_weights": False, "weights":
                   "/home/someone/.cache/mapquery-rs/weights/a_rather_long_checkpoint_name_RS5M_ViT-B-32.pt"}})
    for _ in range(20):
        QgsApplication.processEvents()
    assert isinstance(dock.widget(), QScrollArea)  # taller than the screen: it scrolls, it does not clip
    assert dock.height() <= 800 and dock.width() < 640
    for tab in range(dock.tabs.count()):
        dock.tabs.setCurrentIndex(tab)
        for _ in range(5):
            QgsApplication.processEvents()
        assert clipped_labels(dock) == [], (tab, dock.width())
    # the check sees a label that cannot fit
    dock.status_label.setWordWrap(False)
    dock.status_label.setText("a status line far too long to fit a dock of this width " * 4)
    QgsApplication.processEvents()
    assert clipped_labels(dock) == [dock.status_label.text()]


def test_captures_draw_only_the_chosen_imagery(plugin, project, tmp_path):
    """A capture after earlier results equals the capture before them (pixels and mask): MapQuery's own outputs
    and vector overlays are never drawn, even when the canvas shows them."""
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer
    plugin, iface, layer = plugin
    dock = plugin.show_dock()
    spin(lambda: "connected" in dock.status_label.text() and "not" not in dock.status_label.text())
    dock.resolution.setValue(1200.0)
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("view"))

    def capture():
        got = []
        dock.capture_async(got.append)
        spin(lambda: got)
        return got[0]
    before = capture()
    assert before.valid().any() and not before.valid().all()  # RGB.byte.tif's nodata collar is invalid
    overlay = QgsVectorLayer("Polygon?crs=EPSG:32618", "overlay", "memory")
    f = QgsFeature()
    f.setGeometry(QgsGeometry.fromRect(layer.extent()))
    overlay.dataProvider().addFeatures([f])
    project.addMapLayer(overlay)
    dock.cls_tile.setValue(64)
    dock.search_edit.setText("a river")
    dock.localize_edit.setText("forest")
    for tool in ("classify", "search", "localize"):
        seen = len(iface.bar.messages)
        dock.run_tool(tool)
        spin(lambda seen=seen: len(iface.bar.messages) > seen and dock.active is None)
    outputs = [lyr for lyr in project.mapLayers().values() if lyr.customProperty("mapquery_rs/output")]
    assert len(outputs) == 3
    iface.canvas.setLayers(outputs + [overlay, layer])  # the canvas shows everything on top of the raster
    assert dock.imagery_layers() == [layer]
    after = capture()
    assert np.array_equal(before.pixels, after.pixels) and np.array_equal(before.mask, after.mask)
    # the picker: outputs are not offered; a checked layer is what is drawn
    offered = [dock.imagery_combo.itemData(i) for i in range(dock.imagery_combo.count())]
    assert offered == [layer.id()]
    dock.imagery_combo.setItemCheckState(0, Qt.Checked)
    iface.canvas.setLayers([overlay])  # nothing visible: the checked layer is still drawn
    assert np.array_equal(capture().pixels, before.pixels)


def test_tile_size_units_are_named_and_converted(plugin, project):
    from qgis.core import QgsCoordinateReferenceSystem
    plugin, iface, layer = plugin
    dock = plugin.show_dock()
    dock.resolution.setValue(10.0)
    assert dock.cls_unit.currentText() == "px" and dock.cls_unit.itemText(1) == "m"
    dock.cls_tile.setValue(224)
    dock.cls_unit.setCurrentIndex(1)
    assert dock.cls_tile.value() == pytest.approx(2240.0)  # 224 px at 10 m/px, not 224 m
    dock.cls_unit.setCurrentIndex(0)
    assert dock.cls_tile.value() == pytest.approx(224.0)
    iface.canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    assert dock.cls_unit.itemText(1) == "degrees" and dock.srch_unit.itemText(1) == "degrees"
    dock.resolution.setValue(0.001)
    dock.srch_tile.setValue(100)
    dock.srch_unit.setCurrentIndex(1)
    assert dock.srch_tile.value() == pytest.approx(0.1)


def test_search_by_example_clicked_on_the_map(plugin, project):
    """Click a tile: `rank` with it as the query image finds that very tile first (same pixels, same embedding)."""
    from qgis.core import QgsPointXY
    from qgis_plugin.tools.base import grid_windows
    plugin, iface, layer = plugin
    dock = plugin.show_dock()
    spin(lambda: "connected" in dock.status_label.text() and "not" not in dock.status_label.text())
    dock.resolution.setValue(900.0)
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("view"))
    dock.srch_tile.setValue(32)
    got = []
    dock.capture_async(got.append)
    spin(lambda: got)
    cap = got[0]
    valid = cap.valid()
    _, windows = grid_windows(cap.height, cap.width, 32)
    full = [i for i, (x0, y0, x1, y1) in enumerate(windows) if valid[y0:y1, x0:x1].all() and x1 - x0 == 32
            and x0 % 32 == 0 and y0 % 32 == 0]
    k = full[len(full) // 2]
    x0, y0 = windows[k][:2]
    point = QgsPointXY(*cap.pixel_to_map(x0 + 16, y0 + 16))
    dock.pick_example()
    assert iface.canvas.mapTool() is dock._example_tool
    seen = len(iface.bar.messages)
    dock._example_tool.canvasClicked.emit(point, Qt.LeftButton)
    assert iface.canvas.mapTool() is not dock._example_tool  # one click, then the previous tool is back
    spin(lambda seen=seen: len(iface.bar.messages) > seen and dock.active is None)
    assert iface.bar.messages[-1][1].startswith("search: like the tile at"), iface.bar.messages[-1]
    assert dock.search_hits[0]["tile"] == k and dock.search_hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
