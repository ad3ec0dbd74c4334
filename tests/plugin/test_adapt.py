"""The Adapt tool: chips cut in QGIS (checked against the GeoTIFF read with GDAL and numpy), bad input, and a live
round trip with a tiny backend (layer -> chips -> train -> adapter listed -> classify with it; cancel; unsure)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeature, QgsField, QgsGeometry,
                       QgsPointXY, QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorLayer)
from qgis.PyQt.QtCore import QVariant

from qgis_plugin.capture import RasterSource, read_bands
from qgis_plugin.errors import PluginError
from qgis_plugin.tools.adapt import AdaptParams, AdaptProcessor, examples_of_layer
from qgis_plugin.tools.base import Common, Feedback

X0, Y1, SIZE = 500000.0, 4000200.0, 200  # raster: 200 x 200 px of 1 m, EPSG:32618, top-left (X0, Y1)
CHIP = 16


def make_raster(path, nodata_box=None, colours=None) -> np.ndarray:
    """A 3-band uint8 GeoTIFF of random values 1..255 (nodata 0 inside ``nodata_box`` = (r0, r1, c0, c1));
    ``colours``: {(r0, r1, c0, c1): (r, g, b)} painted regions. Returns the bands (3 x H x W)."""
    from osgeo import gdal, osr
    rng = np.random.default_rng(1)
    data = rng.integers(1, 256, (3, SIZE, SIZE), dtype=np.uint8)
    for (r0, r1, c0, c1), rgb in (colours or {}).items():
        for b in range(3):
            data[b, r0:r1, c0:c1] = rgb[b] + rng.integers(0, 20, (r1 - r0, c1 - c0))
    if nodata_box:
        r0, r1, c0, c1 = nodata_box
        data[:, r0:r1, c0:c1] = 0
    ds = gdal.GetDriverByName("GTiff").Create(str(path), SIZE, SIZE, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((X0, 1.0, 0.0, Y1, 0.0, -1.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32618)
    ds.SetProjection(srs.ExportToWkt())
    for b in range(3):
        band = ds.GetRasterBand(b + 1)
        band.WriteArray(data[b])
        band.SetNoDataValue(0)
    ds = None
    check = gdal.Open(str(path)).ReadAsArray()
    assert np.array_equal(check, data)
    return data


def labels_layer(boxes, crs="EPSG:4326", field="landcover"):
    """A memory polygon layer with one feature per (x0, y0, x1, y1, class) box given in EPSG:32618, stored in
    ``crs`` (reprojected here, so the tool has to reproject back)."""
    layer = QgsVectorLayer(f"Polygon?crs={crs}", "labels", "memory")
    pr = layer.dataProvider()
    pr.addAttributes([QgsField(field, QVariant.String)])
    layer.updateFields()
    xf = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:32618"), QgsCoordinateReferenceSystem(crs),
                                QgsProject.instance())
    feats = []
    for x0, y0, x1, y1, name in boxes:
        dense = QgsGeometry.fromRect(QgsRectangle(x0, y0, x1, y1)).densifyByCount(20)
        g = QgsGeometry.fromPolygonXY([[QgsPointXY(p.x(), p.y()) for p in dense.vertices()]])
        g.transform(xf)
        f = QgsFeature(layer.fields())
        f.setGeometry(g)
        f["landcover" if field == "landcover" else field] = name
        feats.append(f)
    pr.addFeatures(feats)
    return layer


def box(c0, r0, w, name):
    """A w x w metre box whose top-left corner is raster pixel (c0, r0)."""
    return (X0 + c0, Y1 - r0 - w, X0 + c0 + w, Y1 - r0, name)


def processor(raster_path, layer, **kw):
    rlayer = QgsRasterLayer(str(raster_path), "scene")
    assert rlayer.isValid()
    examples, _ = examples_of_layer(layer, "landcover", rlayer.crs())
    params = AdaptParams("landcover", kw.pop("method", "instant-cache"), kw.pop("name", "t1"), chip_size=CHIP, **kw)
    return AdaptProcessor(RasterSource.of(rlayer), examples, params, Common(), "labels")


def expected_chips(data, c0, r0, w, valid_min=0.5):
    """The chips of a w x w box at pixel (c0, r0), computed with numpy: the centred grid of CHIP squares (rows from
    the bottom up, as the tool's grid goes up in y), squares at least half inside, valid share >= valid_min."""
    n = -(-w // CHIP)
    off = (w - n * CHIP) / 2
    out = []
    for j in range(n):  # y grows upwards: j = 0 is the bottom row of squares
        for i in range(n):
            sc, sr = c0 + off + i * CHIP, r0 + w - off - (j + 1) * CHIP
            inside = max(0, min(sc + CHIP, c0 + w) - max(sc, c0)) * max(0, min(sr + CHIP, r0 + w) - max(sr, r0))
            if inside < 0.5 * CHIP * CHIP:
                continue
            sc, sr = int(round(sc)), int(round(sr))
            chip = np.zeros((CHIP, CHIP, 3), np.uint8)
            rr0, cc0 = max(0, sr), max(0, sc)
            part = data[:, rr0:sr + CHIP, cc0:sc + CHIP].transpose(1, 2, 0)
            chip[rr0 - sr:rr0 - sr + part.shape[0], cc0 - sc:cc0 - sc + part.shape[1]] = part
            if (chip.any(axis=2)).mean() >= valid_min:
                out.append(chip)
    return out


def test_chips_match_gdal_valid_only_groups_and_crs(qgis_app, tmp_path):
    data = make_raster(tmp_path / "scene.tif", nodata_box=(100, 200, 0, 40))
    boxes = [box(20, 20, 40, "field"), box(120, 20, 40, "forest"), box(20, 130, 40, "field"),  # half on nodata
             box(120, 120, 24, "forest")]
    layer = labels_layer(boxes)  # in EPSG:4326, the raster in EPSG:32618
    proc = processor(tmp_path / "scene.tif", layer)
    cs = proc.cut()
    assert cs.classes == ["field", "forest"]
    got = 0
    fid_of = {f.id(): f["landcover"] for f in layer.getFeatures()}
    for k, (x0, _y0, x1, y1, name) in enumerate(boxes):
        c0, r0, w = int(x0 - X0), int(Y1 - y1), int(x1 - x0)
        want = expected_chips(data, c0, r0, w)
        fid = sorted(fid_of)[k]
        if not want:
            assert fid not in cs.fids
            continue
        g = cs.fids.index(fid)
        mine = cs.chips[cs.groups == g]
        assert len(mine) == len(want), (name, len(mine), len(want))
        for a, b in zip(mine, want, strict=True):
            assert np.array_equal(a, b)
        assert set(cs.labels[cs.groups == g]) == {cs.classes.index(name)}
        got += len(want)
    assert len(cs.chips) == got
    # the half-on-nodata box lost chips: only valid ones were kept, every kept chip has >= 50 % valid pixels
    assert len(expected_chips(data, 20, 130, 40)) < 9
    assert all(c.any(axis=2).mean() >= 0.5 for c in cs.chips)
    counts = cs.counts()
    assert counts["forest"]["examples"] == 2 and counts["field"]["examples"] == 2


def test_point_chip_centred_on_point(qgis_app, tmp_path):
    data = make_raster(tmp_path / "scene.tif")
    layer = QgsVectorLayer("Point?crs=EPSG:32618", "pts", "memory")
    layer.dataProvider().addAttributes([QgsField("landcover", QVariant.String)])
    layer.updateFields()
    pts = [(50, 50, "a"), (150, 50, "a"), (50, 150, "b"), (150, 150, "b")]
    for c, r, name in pts:
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(X0 + c, Y1 - r)))
        f["landcover"] = name
        layer.dataProvider().addFeatures([f])
    cs = processor(tmp_path / "scene.tif", layer).cut()
    assert len(cs.chips) == 4
    for chip, (c, r, _) in zip(cs.chips, pts, strict=True):
        assert np.array_equal(chip, data[:, r - 8:r + 8, c - 8:c + 8].transpose(1, 2, 0))
    assert sorted(cs.groups.tolist()) == [0, 1, 2, 3]


def test_bad_input_messages(qgis_app, tmp_path):
    make_raster(tmp_path / "scene.tif")
    rl = QgsRasterLayer(str(tmp_path / "scene.tif"), "scene")
    empty = labels_layer([])
    with pytest.raises(PluginError, match="has no features"):
        examples_of_layer(empty, "landcover", rl.crs())
    with pytest.raises(PluginError, match="has no field 'kind'.*landcover"):
        examples_of_layer(labels_layer([box(10, 10, 20, "a")]), "kind", rl.crs())
    one_each = labels_layer([box(10, 10, 40, "a"), box(100, 100, 40, "b"), box(150, 10, 30, "b")])
    cs = processor(tmp_path / "scene.tif", one_each).cut()  # 9 chips of one polygon: trains, but a warning
    assert any("['a'] have one labelled feature only" in w for w in cs.warnings)
    one_chip = labels_layer([box(10, 10, 8, "a"), box(100, 100, 40, "b"), box(150, 10, 30, "b")])
    with pytest.raises(PluginError, match=r"at least 2 chips; too few: \{'a': 1\}"):
        processor(tmp_path / "scene.tif", one_chip).cut()
    outside = labels_layer([box(10, 10, 20, "a"), box(60, 10, 20, "a"), box(10, 100, 20, "b"),
                            box(60, 100, 20, "b"), box(5000, 5000, 20, "b")])
    with pytest.raises(PluginError, match="1 labelled features lie outside the raster"):
        processor(tmp_path / "scene.tif", outside).cut()
    cs = processor(tmp_path / "scene.tif", outside, skip_outside=True).cut()
    assert any("outside the raster left out" in w for w in cs.warnings)
    single = labels_layer([box(10, 10, 20, "a"), box(60, 10, 20, "a")])
    with pytest.raises(PluginError, match="two or more"):
        processor(tmp_path / "scene.tif", single).cut()
    with pytest.raises(PluginError, match="adapter name"):
        AdaptParams("landcover", "instant-cache", "bad name!")
    with pytest.raises(PluginError, match="unknown method"):
        AdaptParams("landcover", "magic", "ok")


# -- live ---------------------------------------------------------------------------------------------
COLOURS = {(0, 100, 0, 200): (200, 30, 30), (100, 200, 0, 200): (30, 160, 40)}  # top red, bottom green
LIVE_BOXES = [box(10, 10, 32, "red roofs"), box(80, 10, 32, "red roofs"), box(150, 20, 32, "red roofs"),
              box(10, 130, 32, "green fields"), box(80, 140, 32, "green fields"), box(150, 130, 32, "green fields")]


@pytest.fixture(scope="module")
def adapt_backend(tmp_path_factory):
    from mq_helpers import start_live_backend
    proc, settings = start_live_backend(["--adapter-dir", str(tmp_path_factory.mktemp("adapters"))])
    yield settings
    proc.stop()


def test_live_train_classify_unsure_cancel(qgis_app, tmp_path, adapt_backend):
    from qgis_plugin.connection import make_client
    from qgis_plugin.sources import CaptureSource
    from qgis_plugin.tools.classify import ClassifyParams, ClassifyProcessor
    from qgis_plugin.tools.unsure import UnsureParams, UnsureProcessor
    make_raster(tmp_path / "scene.tif", colours=COLOURS)
    layer = labels_layer(LIVE_BOXES)
    proc = processor(tmp_path / "scene.tif", layer, name="live-colours")
    seen = []
    with make_client(adapt_backend) as client:
        out = proc.run(client, Feedback(lambda p, m: seen.append((p, m))))
        assert out.result["name"] == "live-colours"
        assert out.result["classes"] == ["green fields", "red roofs"]
        m = out.result["metrics"]
        # the report is the reply's metrics: per class and 'all', zero-shot and adapted, the confusion rows
        assert [r["class"] for r in out.table] == ["green fields", "red roofs", "all"]
        assert out.table[-1]["adapted"] == m["adapted"]["top1"]
        assert [r["confusion"] for r in out.table[:2]] == m["adapted"]["confusion"]
        assert sum(map(sum, m["adapted"]["confusion"])) == m["held_out_chips"] > 0
        assert any("chips" in msg for _, msg in seen)
        names = [a["name"] for a in client.info()["adapters"]]
        assert "live-colours" in names
        # classify the raster with it
        cap = read_bands(QgsRasterLayer(str(tmp_path / "scene.tif"), "scene"))
        res = ClassifyProcessor(CaptureSource(cap), ClassifyParams(out.result["classes"], 50),
                                Common(adapter="live-colours")).compute(client, Feedback())
        assert len(res.rows) == 16 and set(res.counts()) <= set(out.result["classes"])
        assert res.provenance["adapter"] == "live-colours"
        # where is it unsure: the tiles with the least margin, the class field empty
        un = UnsureProcessor(CaptureSource(cap), UnsureParams("live-colours", out.result["classes"], "landcover", 5,
                                                              50), Common(out_dir=tmp_path))
        outcome = un.run(client, Feedback())
        lyr = QgsVectorLayer(f"{outcome.layers[0].path}|layername=label_next", "next", "ogr")
        assert lyr.isValid() and lyr.featureCount() == 5
        margins = [f["margin"] for f in lyr.getFeatures()]
        all_margins = sorted(t["margin"] for t in res.result["tiles"])  # the last batch = all 16 tiles here
        assert sorted(margins) == pytest.approx(all_margins[:5])
        assert all(f["landcover"] in (None, "") or str(f["landcover"]) == "NULL" for f in lyr.getFeatures())

        # cancel: a trained method, cancelled once the job runs, leaves no adapter
        cancel = threading.Event()

        def on_progress(p, msg):
            if p > 0.2:
                cancel.set()
        slow = processor(tmp_path / "scene.tif", layer, name="cancelled-one", method="coop", epochs=500)
        from shared_protocol import ProtocolError
        with pytest.raises(ProtocolError) as info:
            slow.run(client, Feedback(on_progress, cancel))
        assert info.value.code == "cancelled"
    with make_client(adapt_backend) as client:
        assert "cancelled-one" not in [a["name"] for a in client.info()["adapters"]]


def test_desktop_adapt_tab(qgis_app, tmp_path, adapt_backend):
    """The real QGIS desktop under xvfb: the Adapt tab trains, shows its report and adds the label-next layer."""
    import json
    import os
    import shutil
    import subprocess
    from pathlib import Path
    from qgis.core import QgsCoordinateTransformContext, QgsVectorFileWriter
    if shutil.which("qgis") is None or shutil.which("xvfb-run") is None:
        pytest.skip("the QGIS desktop or xvfb-run is not installed; the headless tests cover the tool's logic")
    root = Path(__file__).resolve().parents[2]
    shot, result = root / "out" / "test_artifacts" / "qgis_desktop_adapt.png", tmp_path / "result.json"
    shot.parent.mkdir(parents=True, exist_ok=True)
    if shot.exists():
        shot.unlink()
    make_raster(tmp_path / "scene.tif", colours=COLOURS)
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    err = QgsVectorFileWriter.writeAsVectorFormatV3(labels_layer(LIVE_BOXES), str(tmp_path / "labels.gpkg"),
                                                    QgsCoordinateTransformContext(), opts)
    assert err[0] == QgsVectorFileWriter.NoError, err
    env = {**os.environ, "PROFILES": str(tmp_path / "profiles"), "MAPQUERY_MODE": "connect",
           "MAPQUERY_ADDRESS": adapt_backend.address, "MAPQUERY_STARTUP": str(root / "scripts" /
                                                                                "qgis_adapt_startup.py"),
           "MAPQUERY_SAMPLE": str(tmp_path / "scene.tif"), "MAPQUERY_LABELS": str(tmp_path / "labels.gpkg"),
           "MAPQUERY_ADAPTER": "desktop-adapter", "MAPQUERY_SCREENSHOT": str(shot), "MAPQUERY_RESULT": str(result),
           "MAPQUERY_QUIT": "1", "MAPQUERY_OUTPUT_DIR": str(tmp_path / "outputs")}
    env.pop("QT_QPA_PLATFORM", None)
    proc = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1280x800x24", str(root / "scripts" / "run_qgis.sh")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert result.exists(), f"no result (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(result.read_text())
    assert out["ok"], out
    table = out["table"]
    assert table["rows"] == ["green fields", "red roofs", "all"]
    assert table["columns"] == ["0-shot %", "adapted %", "→green fi", "→red roof"]
    confusion = [[int(v) for v in row[2:]] for row in table["cells"][:2]]
    assert sum(map(sum, confusion)) > 0  # held-out chips counted
    assert "desktop-adapter" in out["adapters"] and "registered" in out["summary"]
    assert out["unsure_count"] == 5 and "label next (desktop-adapter)" in out["layers"]
    assert Path(out["unsure"].split("|")[0]).parent == tmp_path / "outputs"  # the configured folder
    from qgis.PyQt.QtGui import QImage
    img = QImage(str(shot))
    assert img.width() >= 800 and img.height() >= 600


def test_processing_adapt_then_classify_with_the_adapter(tmp_path, adapt_backend, processing_ready):
    import json
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback
    make_raster(tmp_path / "scene.tif", colours=COLOURS)
    layer = labels_layer(LIVE_BOXES)
    context = QgsProcessingContext()
    res = processing.run("mapquery:adapt", {
        "INPUT": str(tmp_path / "scene.tif"), "LABELS": layer, "CLASS_FIELD": "landcover", "METHOD": 1,
        "NAME": "proc-probe", "CHIP_SIZE": CHIP, "BACKEND": adapt_backend.address}, context=context,
        feedback=QgsProcessingFeedback())
    assert res["ADAPTER"] == "proc-probe"
    report = json.loads(res["REPORT"])
    assert report["classes"] == ["green fields", "red roofs"]
    assert res["ACCURACY"] == report["rows"][-1]["adapted"]
    out = processing.run("mapquery:classifyraster", {
        "INPUT": str(tmp_path / "scene.tif"), "CLASSES": "green fields\nred roofs", "TILE_SIZE": 50,
        "ADAPTER": "proc-probe", "BACKEND": adapt_backend.address, "OUTPUT": str(tmp_path / "cls.gpkg")},
        context=context, feedback=QgsProcessingFeedback())
    cls = QgsVectorLayer(out["OUTPUT"], "cls", "ogr")
    assert cls.featureCount() == 16
    assert {f["adapter"] for f in cls.getFeatures()} == {"proc-probe"}
    # bad input: a clear message through Processing
    from qgis.core import QgsProcessingException
    with pytest.raises(QgsProcessingException, match="has no field 'nope'"):
        processing.run("mapquery:adapt", {
            "INPUT": str(tmp_path / "scene.tif"), "LABELS": layer, "CLASS_FIELD": "nope", "NAME": "x",
            "BACKEND": adapt_backend.address}, context=context, feedback=QgsProcessingFeedback())


def test_dock_adapt_tab_trains_reports_classifies_and_cancels(qgis_app, project, tmp_path, adapt_backend):
    """The Adapt tab headless, as a user drives it: Train -> report table -> adapter chosen -> Classify the view
    with it; a missing raster is a clear message; Cancel of a trained job leaves no adapter."""
    import qgis_plugin
    from qgis.core import QgsLayerTreeGroup
    from qgis_plugin.connection import make_client
    from qgis_plugin.settings import Settings
    from test_dock import FakeIface, spin
    Settings(mode="connect", address=adapt_backend.address, timeout_s=60, output_dir=str(tmp_path / "out")).save()
    make_raster(tmp_path / "scene.tif", colours=COLOURS)
    iface = FakeIface()
    raster = QgsRasterLayer(str(tmp_path / "scene.tif"), "scene")
    labels = labels_layer(LIVE_BOXES)
    project.addMapLayer(raster)
    project.addMapLayer(labels)
    iface.canvas.setDestinationCrs(raster.crs())
    iface.canvas.setLayers([raster])
    iface.canvas.setExtent(raster.extent())
    plugin = qgis_plugin.classFactory(iface)
    plugin.initGui()
    try:
        dock = plugin.show_dock()
        tab = dock.adapt_tab
        spin(lambda: bool(dock.info))
        tab.labels_combo.setLayer(labels)
        assert tab.field_combo.currentField() == "landcover"  # guessed
        assert tab.counts_label.text() == "features per class: green fields: 3, red roofs: 3"
        tab.raster_combo.setLayer(None)
        tab.train()
        assert "choose the raster" in iface.bar.messages[-1][1]
        tab.raster_combo.setLayer(raster)
        tab.name_edit.setText("dock-adapter")
        tab.chip_size.setValue(CHIP)
        tab.train_btn.click()
        spin(lambda: tab.task is not None and tab.task.done, 120)
        assert tab.task.error is None, tab.task.message()
        result = tab.task.outcome.result
        t = tab.report
        assert [t.verticalHeaderItem(i).text() for i in range(t.rowCount())] == result["classes"] + ["all"]
        adapted = result["metrics"]["adapted"]
        assert t.item(2, 1).text() == f"{adapted['top1']:.1f}"
        assert [[int(t.item(i, 2 + j).text()) for j in range(2)] for i in range(2)] == adapted["confusion"]
        assert dock.adapter_combo.currentData() == "dock-adapter"
        # classify with it (the dock's capture: here the raster's extent at 1 m, as the headless canvas has no view)
        dock.source_combo.setCurrentIndex(dock.source_combo.findData("layer"))
        dock.layer_combo.setLayer(raster)
        dock.resolution.setValue(1.0)
        dock.cls_tile.setValue(50)
        tab.classify_btn.click()
        spin(lambda: any(isinstance(g, QgsLayerTreeGroup) and g.name().startswith("MapQuery: classify")
                         for g in project.layerTreeRoot().children()), 120)
        group = next(g for g in project.layerTreeRoot().children() if isinstance(g, QgsLayerTreeGroup))
        grid = group.findLayers()[0].layer()
        assert grid.featureCount() == 16, iface.bar.messages[-3:]
        assert {f["adapter"] for f in grid.getFeatures()} == {"dock-adapter"}
        assert {f["label"] for f in grid.getFeatures()} <= set(result["classes"])
        assert dock.classes_edit.toPlainText().splitlines() == result["classes"]
        # cancel a trained job from the tab
        tab.method_combo.setCurrentIndex(tab.method_combo.findData("coop"))
        tab.epochs.setValue(500)
        tab.name_edit.setText("dock-cancelled")
        tab.train_btn.click()
        spin(lambda: tab.progress.value() > 25 or tab.task.done, 120)
        tab.cancel_btn.click()
        spin(lambda: tab.task.done, 30)
        assert "cancelled" in iface.bar.messages[-1][1]
        with make_client(adapt_backend) as client:
            assert "dock-cancelled" not in [a["name"] for a in client.info()["adapters"]]
    finally:
        plugin.unload()
