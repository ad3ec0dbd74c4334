"""The Index tools (qgis_plugin/tools/index.py) against the live tiny backend: build an index of rasters written
here (and RGB.byte.tif when present), list it, search it by text and by example polygons; the GeoPackage holds
the backend's rows (raster, window, score order) in the rasters' CRS, the score surface is NaN where nothing was
indexed; cancel of a build (a rerun resumes without duplicates); bad input gets clear messages."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from osgeo import gdal, osr
from qgis.core import QgsFeature, QgsGeometry, QgsRasterLayer, QgsRectangle, QgsVectorLayer

from shared_protocol import ErrorCode

from qgis_plugin.connection import make_client
from qgis_plugin.errors import PluginError
from qgis_plugin.tasks import MapQueryTask, add_outcome, run_and_wait
from qgis_plugin.tools.base import Common
from qgis_plugin.tools.index import (IndexBuildParams, IndexBuildProcessor, IndexSearchParams, IndexSearchProcessor,
                                     features_geojson, index_list, raster_file)

H, W, NODATA_FROM = 256, 320, 200  # columns from NODATA_FROM on are nodata (0)
ORIGIN, PX = (500000.0, 4200000.0), 2.0
SIZES = [64, 128]


def write_raster(path, h=H, w=W, nodata_from=NODATA_FROM, seed=3):
    rng = np.random.default_rng(seed)
    bands = rng.integers(1, 255, (3, h, w)).astype(np.uint8)
    bands[:, :, nodata_from:] = 0
    ds = gdal.GetDriverByName("GTiff").Create(str(path), w, h, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((ORIGIN[0], PX, 0.0, ORIGIN[1], 0.0, -PX))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetProjection(srs.ExportToWkt())
    for i in range(3):
        ds.GetRasterBand(i + 1).WriteArray(bands[i])
        ds.GetRasterBand(i + 1).SetNoDataValue(0)
    ds = None
    return str(path)


def run(processor, settings):
    task = run_and_wait(MapQueryTask(processor, settings), timeout=300)
    return task


@pytest.fixture(scope="module")
def built(live_backend, tmp_path_factory):
    """An index of the test raster (and RGB.byte.tif when present), built through the dock's task."""
    tmp = tmp_path_factory.mktemp("index")
    from conftest import DATA
    rasters = [write_raster(tmp / "scene.tif")]
    if (DATA / "RGB.byte.tif").exists():
        rasters.append(str(shutil.copy(DATA / "RGB.byte.tif", tmp / "RGB.byte.tif")))
    layers = [QgsRasterLayer(r, f"r{i}") for i, r in enumerate(rasters)]
    params = IndexBuildParams(str(tmp / "idx"), [raster_file(lyr) for lyr in layers], window_sizes=SIZES)
    task = run(IndexBuildProcessor(params, Common(out_dir=tmp)), live_backend)
    assert task.error is None, task.message()
    return tmp, rasters, task.outcome


def test_build_then_list(built, live_backend):
    tmp, rasters, outcome = built
    reports = outcome.result["rasters"]
    assert sorted(r["raster"] for r in reports) == sorted(rasters)
    assert all(r["added"] > 0 for r in reports)
    assert outcome.result["rows"] == sum(r["windows"] for r in reports)
    assert "windows added" in outcome.summary and outcome.result["name"] in outcome.summary
    client = make_client(live_backend)
    try:
        listed = index_list(client)
    finally:
        client.close()
    mine = [i for i in listed if i["path"] == str(tmp / "idx")]
    assert len(mine) == 1 and mine[0]["rows"] == outcome.result["rows"] and mine[0]["name"] == outcome.result["name"]


def _gpkg_rows(path):
    layer = QgsVectorLayer(path, "hits", "ogr")
    assert layer.isValid()
    feats = sorted(layer.getFeatures(), key=lambda f: f["rank"])
    return layer, feats


def _direct(settings, params):
    client = make_client(settings)
    try:
        return client.request("index_search", params).result
    finally:
        client.close()


def test_search_by_text(built, live_backend, project):
    tmp, rasters, outcome = built
    params = IndexSearchParams(outcome.result["name"], texts=["a harbour"], top_k=7, surface=True)
    task = run(IndexSearchProcessor(params, Common(out_dir=tmp)), live_backend)
    assert task.error is None, task.message()
    out = task.outcome
    expected = _direct(live_backend, {"index": str(tmp / "idx"), "texts": ["a harbour"], "top_k": 7})["rows"]
    layer, feats = _gpkg_rows(out.layers[0].path)
    assert [(f["raster"], f["window"], round(f["score"], 5)) for f in feats] == \
        [(r["raster"], ",".join(map(str, r["window"])), round(r["score"], 5)) for r in expected]
    scores = [f["score"] for f in feats]
    assert scores == sorted(scores, reverse=True) and [f["rank"] for f in feats] == list(range(1, 8))
    assert feats[0]["query"] == "a harbour" and feats[0]["model"] not in ("", "?")
    if len({r["footprint"]["crs"] for r in expected}) == 1:  # one CRS: boxes in it, equal to the windows' bounds
        assert layer.crs().authid() == QgsRasterLayer(expected[0]["raster"], "r").crs().authid()
        for f, r in zip(feats, expected, strict=True):
            bb = f.geometry().boundingBox()
            assert np.allclose([bb.xMinimum(), bb.yMinimum(), bb.xMaximum(), bb.yMaximum()],
                               r["footprint"]["bounds"])
    else:  # several CRSs: the EPSG:4326 footprints
        assert layer.crs().authid() == "EPSG:4326"
        for f, r in zip(feats, expected, strict=True):
            bb = f.geometry().boundingBox()
            assert np.allclose([bb.xMinimum(), bb.yMinimum(), bb.xMaximum(), bb.yMaximum()],
                               r["footprint"]["bounds_4326"], atol=1e-9)
    # score surfaces: one per raster; the test raster's is NaN where nothing was indexed (its nodata columns)
    surfaces = [s for s in out.layers if s.kind == "surface"]
    assert len(surfaces) == len(rasters)
    scene = next(s for s in surfaces if "scene.tif" in s.provenance["raster"])
    ds = gdal.Open(scene.path)
    arr = ds.GetRasterBand(1).ReadAsArray()
    assert arr.shape == (H, W) and ds.GetGeoTransform() == (ORIGIN[0], PX, 0.0, ORIGIN[1], 0.0, -PX)
    assert np.isnan(ds.GetRasterBand(1).GetNoDataValue())
    assert np.isnan(arr[:, NODATA_FROM + SIZES[0]:]).all()
    assert np.isfinite(arr[:, :NODATA_FROM - SIZES[0]]).all()
    # loaded as styled layers in one group
    group, layers = add_outcome(out, project)
    assert [lyr.customProperty("mapquery_rs/output") for lyr in layers] == ["ranking"] + ["surface"] * len(rasters)
    assert group.name().startswith("MapQuery: index search: a harbour")
    assert layers[1].renderer().type() == "singlebandpseudocolor"


def test_search_by_example_polygons(built, live_backend):
    tmp, rasters, outcome = built
    layer = QgsVectorLayer("Polygon?crs=EPSG:32633", "examples", "memory")
    feats = []
    for x0, y0 in ((10, 10), (60, 120)):  # pixel boxes inside the valid part of the scene
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(ORIGIN[0] + x0 * PX, ORIGIN[1] - (y0 + 60) * PX,
                                                        ORIGIN[0] + (x0 + 60) * PX, ORIGIN[1] - y0 * PX)))
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    layer.selectByIds([layer.getFeatures().__next__().id()])
    geojson, crs = features_geojson(layer)  # the selected feature only
    assert crs == "EPSG:32633" and len(geojson["features"]) == 1
    all_geojson, _ = features_geojson(layer, selected_only=False)
    params = IndexSearchParams(str(tmp / "idx"), examples=geojson, negatives=all_geojson, examples_crs=crs,
                               top_k=5, surface=False, extent=[ORIGIN[0], ORIGIN[1] - H * PX, ORIGIN[0] + W * PX,
                                                                ORIGIN[1]], extent_crs=crs)
    task = run(IndexSearchProcessor(params, Common(out_dir=tmp)), live_backend)
    assert task.error is None, task.message()
    expected = _direct(live_backend, {"index": str(tmp / "idx"), "examples": geojson, "negatives": all_geojson,
                                      "examples_crs": crs, "top_k": 5, "extent": params.extent,
                                      "extent_crs": crs})["rows"]
    _, got = _gpkg_rows(task.outcome.layers[0].path)
    assert [(f["raster"], f["window"]) for f in got] == [(r["raster"], ",".join(map(str, r["window"])))
                                                         for r in expected]
    assert all(r["raster"] == rasters[0] for r in expected)  # the extent keeps only the scene
    assert [lyr.kind for lyr in task.outcome.layers] == ["ranking"]


def test_bad_input_messages(built, live_backend, tmp_path):
    tmp, rasters, outcome = built
    wms = QgsRasterLayer("type=xyz&url=https://tile.example/{z}/{x}/{y}.png", "tiles", "wms")
    with pytest.raises(PluginError, match="'tiles' is not a raster file"):
        raster_file(wms)
    with pytest.raises(PluginError, match="not a raster file"):
        IndexBuildParams(str(tmp_path / "i"), [str(tmp_path / "missing.tif")])
    with pytest.raises(PluginError, match="type a text or select example features"):
        IndexSearchParams(outcome.result["name"], texts=["  "])
    empty = QgsVectorLayer("Polygon?crs=EPSG:32633", "none", "memory")
    with pytest.raises(PluginError, match="no selected features"):
        features_geojson(empty)
    # an index folder that does not exist: the backend's typed error, in words
    task = run(IndexSearchProcessor(IndexSearchParams(str(tmp_path / "nowhere"), texts=["x"]),
                                    Common(out_dir=tmp_path)), live_backend)
    assert task.error is not None and "nowhere" in task.message()


def test_cancel_then_resume(live_backend, tmp_path):
    raster = write_raster(tmp_path / "big.tif", 1024, 1024, 1024, seed=9)
    params = IndexBuildParams(str(tmp_path / "idx"), [raster], window_sizes=[32])
    task = run_and_wait(MapQueryTask(IndexBuildProcessor(params, Common(out_dir=tmp_path)), live_backend),
                        timeout=300, cancel_after=1.5)
    assert task.error is not None and task.error.code == ErrorCode.CANCELLED and task.outcome is None
    short = dataclasses.replace(live_backend, timeout_s=0.3)  # a build outlives the per-request timeout
    done = run(IndexBuildProcessor(params, Common(out_dir=tmp_path)), short)  # waits for the backend
    assert done.error is None, done.message()
    assert done.outcome.result["elapsed_s"] > short.timeout_s
    report = done.outcome.result["rasters"][0]
    assert report["status"] in ("resumed", "new")
    assert done.outcome.result["rows"] == report["windows"]  # no duplicates
    again = run(IndexBuildProcessor(params, Common(out_dir=tmp_path)), live_backend)
    assert again.outcome.result["rasters"][0]["status"] == "unchanged" and again.outcome.result["rows"] == \
        report["windows"]


def test_too_many_surfaces_gives_the_rows_and_a_warning(live_backend, tmp_path):
    """More rasters than one reply's score surfaces (the backend's limit): the rows still come, with a warning."""
    rasters = [write_raster(tmp_path / f"s{i}.tif", 64, 64, 64, seed=i) for i in range(17)]
    build = run(IndexBuildProcessor(IndexBuildParams(str(tmp_path / "many"), rasters, [64]), Common()), live_backend)
    assert build.error is None, build.message()
    task = run(IndexSearchProcessor(IndexSearchParams(str(tmp_path / "many"), texts=["water"], top_k=3,
                                                      surface=True), Common(out_dir=tmp_path)), live_backend)
    assert task.error is None, task.message()
    assert [lyr.kind for lyr in task.outcome.layers] == ["ranking"] and len(task.outcome.rows) == 3
    assert any("no score surfaces" in w and "16" in w for w in task.outcome.warnings)


def test_processing_build_and_search(processing_ready, live_backend, tmp_path):
    import processing
    from qgis.core import QgsProcessingException
    raster = write_raster(tmp_path / "p.tif", seed=4)
    built = processing.run("mapquery:indexbuild", {"RASTERS": [raster], "INDEX": str(tmp_path / "pidx"),
                                                   "WINDOW_SIZES": "64, 128", "BACKEND": live_backend.address})
    assert built["ROWS"] > 0 and built["NAME"]
    examples = QgsVectorLayer("Polygon?crs=EPSG:32633", "ex", "memory")
    f = QgsFeature()
    f.setGeometry(QgsGeometry.fromRect(QgsRectangle(ORIGIN[0] + 20, ORIGIN[1] - 140, ORIGIN[0] + 140, ORIGIN[1] - 20)))
    examples.dataProvider().addFeatures([f])
    out = processing.run("mapquery:indexsearch", {
        "INDEX": built["NAME"], "TEXT": "a field; a road", "EXAMPLES": examples, "TOP_K": 4,
        "BACKEND": live_backend.address, "OUTPUT": str(tmp_path / "hits.gpkg"),
        "SURFACE_FILES": str(tmp_path / "surf")})
    expected = _direct(live_backend, {"index": built["NAME"], "texts": ["a field", "a road"],
                                      "examples": index_geojson(examples), "examples_crs": "EPSG:32633",
                                      "top_k": 4})["rows"]
    hits = QgsVectorLayer(out["OUTPUT"], "hits")
    assert hits.crs().authid() == "EPSG:32633"
    got = sorted(hits.getFeatures(), key=lambda f: f["rank"])
    assert [(g["window"], round(g["score"], 5)) for g in got] == \
        [(",".join(map(str, r["window"])), round(r["score"], 5)) for r in expected]
    assert len(out["SURFACE_LAYERS"]) == 1
    arr = gdal.Open(out["SURFACE_LAYERS"][0]).ReadAsArray()
    assert np.isnan(arr[:, NODATA_FROM + SIZES[0]:]).all() and np.isfinite(arr[:, :NODATA_FROM - SIZES[0]]).all()
    with pytest.raises(QgsProcessingException, match="type a text or select example features"):
        processing.run("mapquery:indexsearch", {"INDEX": built["NAME"], "BACKEND": live_backend.address,
                                                "OUTPUT": str(tmp_path / "none.gpkg")})
    wms = QgsRasterLayer("type=xyz&url=https://tile.example/{z}/{x}/{y}.png", "tiles", "wms")
    with pytest.raises(QgsProcessingException, match="not a raster file"):
        processing.run("mapquery:indexbuild", {"RASTERS": [wms], "INDEX": str(tmp_path / "w"),
                                               "BACKEND": live_backend.address})


def index_geojson(layer):
    return features_geojson(layer, selected_only=False)[0]


def test_dock_index_tab_builds_lists_and_searches(qgis_app, project, live_backend, tmp_path):
    """The Index tab driven like a user: check a raster layer (a WMS layer is refused), build with progress,
    the index is listed, search by text + the selected features of a layer -> a group with the ranked
    footprints and the score surface."""
    import qgis_plugin
    from qgis.core import Qgis, QgsLayerTreeGroup
    from qgis_plugin.settings import Settings
    from test_dock import FakeIface, spin
    Settings(mode="connect", address=live_backend.address, timeout_s=60, output_dir=str(tmp_path / "out")).save()
    iface = FakeIface()
    raster = QgsRasterLayer(write_raster(tmp_path / "d.tif", seed=6), "scene")
    wms = QgsRasterLayer("type=xyz&url=https://tile.example/{z}/{x}/{y}.png", "tiles", "wms")
    examples = QgsVectorLayer("Polygon?crs=EPSG:32633", "ex", "memory")
    f = QgsFeature()
    f.setGeometry(QgsGeometry.fromRect(QgsRectangle(ORIGIN[0] + 20, ORIGIN[1] - 140, ORIGIN[0] + 140, ORIGIN[1] - 20)))
    examples.dataProvider().addFeatures([f])
    examples.selectAll()
    project.addMapLayers([raster, wms, examples])
    iface.canvas.setDestinationCrs(raster.crs())
    iface.canvas.setExtent(raster.extent())
    plugin = qgis_plugin.classFactory(iface)
    plugin.initGui()
    try:
        dock = plugin.show_dock()
        tab = dock.index_tab
        assert dock.tabs.tabText(dock.tabs.indexOf(tab)) == "Index"
        assert {tab.raster_list.item(i).text() for i in range(tab.raster_list.count())} == {"scene", "tiles"}
        tab.folder_edit.setText(str(tmp_path / "didx"))
        tab.sizes_edit.setText("64, 128")
        tab.set_checked([raster.id(), wms.id()])
        assert tab.build() is None and "'tiles' is not a raster file" in iface.bar.messages[-1][1]
        tab.set_checked([raster.id()])
        progress = []
        task = tab.build()
        task.progressChanged.connect(progress.append)
        spin(lambda: task.done and dock.active is None, 120)
        assert task.error is None, task.message()
        assert iface.bar.messages[-1][1].startswith("index build: didx") and progress and max(progress) == 100.0
        spin(lambda: tab.index_combo.findText("didx") >= 0, 60)  # listed after the build
        assert tab.index_combo.currentText() == "didx"
        tab.text_edit.setText("a roof")
        tab.examples_combo.setLayer(examples)
        tab.topk.setValue(5)
        tab.view_only.setChecked(True)
        task = tab.search()
        spin(lambda: task.done and dock.active is None, 120)
        assert task.error is None, task.message()
        errors = [m for lvl, m in iface.bar.messages if lvl == Qgis.Critical]
        assert not errors, errors
        sent = task.processor.request_params()
        assert sent["examples_crs"] == "EPSG:32633" and sent["extent_crs"] == "EPSG:32633" and sent["texts"] == \
            ["a roof"] and len(sent["examples"]["features"]) == 1
        group = next(c for c in project.layerTreeRoot().children() if isinstance(c, QgsLayerTreeGroup))
        assert group.name() == "MapQuery: index search: a roof + examples [index didx]"
        kinds = [lyr.layer().customProperty("mapquery_rs/output") for lyr in group.findLayers()]
        assert kinds == ["ranking", "surface"]
        hits = group.findLayers()[0].layer()
        assert hits.featureCount() == 5 and tab.hits.rowCount() == 5
        first = next(f for f in hits.getFeatures() if f["rank"] == 1)
        assert tab.hits.item(0, 0).text() == "1" and tab.hits.item(0, 1).text() == f"{first['score']:.3f}"
        tab.zoom_to_hit(0)  # the canvas (same CRS) shows the first hit's footprint
        assert iface.canvas.extent().contains(first.geometry().boundingBox())
        view = iface.canvas.extent()  # the canvas keeps its aspect ratio: one side fits the footprint + margins
        assert min(view.width(), view.height()) < 2 * first.geometry().boundingBox().width()
        surface = group.findLayers()[1].layer()
        arr = gdal.Open(surface.source()).ReadAsArray()
        assert surface.renderer().classificationMin() == pytest.approx(float(np.nanmin(arr)), abs=1e-6)
        assert surface.renderer().classificationMax() == pytest.approx(float(np.nanmax(arr)), abs=1e-6)
        tab.text_edit.setText("")
        tab.examples_combo.setLayer(None)
        assert tab.search() is None and "type a text or select example features" in iface.bar.messages[-1][1]
    finally:
        plugin.unload()


def test_rotated_raster_gives_rotated_footprints(live_backend, tmp_path):
    """A rotated raster's hits are its windows' rotated footprints in its CRS (from its geotransform)."""
    path = write_raster(tmp_path / "rot.tif", 192, 192, 192, seed=11)
    gt = (ORIGIN[0], 1.8, 0.6, ORIGIN[1], 0.6, -1.8)  # rotated about 18 degrees
    ds = gdal.Open(path, gdal.GA_Update)
    ds.SetGeoTransform(gt)
    ds = None
    build = run(IndexBuildProcessor(IndexBuildParams(str(tmp_path / "rot"), [path], [64]), Common()), live_backend)
    assert build.error is None, build.message()
    task = run(IndexSearchProcessor(IndexSearchParams(str(tmp_path / "rot"), texts=["a lake"], top_k=4,
                                                      surface=False), Common(out_dir=tmp_path)), live_backend)
    assert task.error is None, task.message()
    layer, feats = _gpkg_rows(task.outcome.layers[0].path)
    assert layer.crs().authid() == "EPSG:32633" and len(feats) == 4
    for f in feats:
        col, row, w, h = f["col"], f["row"], f["width"], f["height"]
        corners = [(gt[0] + c * gt[1] + r * gt[2], gt[3] + c * gt[4] + r * gt[5])
                   for c, r in ((col, row), (col + w, row), (col + w, row + h), (col, row + h))]
        ring = [(p.x(), p.y()) for p in f.geometry().asPolygon()[0]]
        bb = f.geometry().boundingBox()
        assert f.geometry().area() < 0.9 * bb.width() * bb.height()  # not the bounding box
        for cx, cy in corners:  # every window corner is a vertex of the footprint (within 1 cm: the backend's
            assert min(np.hypot(cx - x, cy - y) for x, y in ring) < 0.01  # EPSG:4326 WKT is rounded)
