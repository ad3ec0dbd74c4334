"""Full round trips through the plugin's own code against a live backend subprocess (tiny random model)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import QgsCoordinateReferenceSystem, QgsLayerTreeGroup, QgsRasterLayer

from shared_protocol import ErrorCode

from qgis_plugin import capture as C
from qgis_plugin.connection import describe, probe
from qgis_plugin.masks import valid_share
from qgis_plugin.sources import CaptureSource
from qgis_plugin.tools.base import Common, grid_windows
from qgis_plugin.tools.classify import ClassifyParams, ClassifyProcessor
from qgis_plugin.tools.localize import LocalizeParams, LocalizeProcessor
from qgis_plugin.tools.search import SearchParams, SearchProcessor
from qgis_plugin.tasks import MapQueryTask, add_outcome, run_and_wait


@pytest.fixture
def utm_capture(data_dir):
    layer = QgsRasterLayer(str(data_dir / "RGB.byte.tif"), "rgb")
    return layer, C.render_extent([layer], layer.extent(), layer.crs(), 600.0)


def classify(cap, classes, tile, out, **kw):
    return ClassifyProcessor(CaptureSource(cap), ClassifyParams(classes, tile, **kw), Common(out))


def localize(cap, queries, out, **kw):
    return LocalizeProcessor(CaptureSource(cap), LocalizeParams(queries, **kw), Common(out))


def kept_windows(cap, tile):
    """The grid's windows with at least half of their pixels valid (the tiles that get an answer)."""
    cells, windows = grid_windows(cap.height, cap.width, tile)
    valid = cap.valid()
    return [i for i, (x0, y0, x1, y1) in enumerate(windows) if valid_share(valid[y0:y1, x0:x1]) >= 0.5]


def run(processor, settings):
    task = run_and_wait(MapQueryTask(processor, settings), timeout=120)
    assert task.error is None, task.message()
    return task.outcome


def test_probe_reports_the_backend(live_backend):
    d = describe(probe(live_backend))
    assert d["model"] == "tiny (tiny-vit)" and "random" in d["weights"] and d["protocol"] == "1"


def test_classify_round_trip(qgis_app, project, tmp_path, live_backend, utm_capture):
    layer, cap = utm_capture
    classes = ["forest", "river", "farmland"]
    outcome = run(classify(cap, classes, 64, tmp_path, top_k=2), live_backend)
    cells, _ = grid_windows(cap.height, cap.width, 64)
    kept = kept_windows(cap, 64)
    assert 0 < len(kept) < len(cells)  # the raster's nodata collar: its tiles get no label
    assert sorted(r["tile"] for r in outcome.rows) == kept
    assert all(r["label"] in classes and 0 <= r["score"] <= 1 for r in outcome.rows)
    assert any("RANDOM" in w for w in outcome.warnings)
    group, (grid,) = add_outcome(outcome, project)
    assert isinstance(group, QgsLayerTreeGroup) and group.name().startswith("MapQuery: classify")
    assert grid.featureCount() == len(kept) and grid.crs().authid() == "EPSG:32618"
    for f in grid.getFeatures():  # each feature is its grid cell
        x0, y0, x1, y1 = cells[f["tile"]]
        xs, ys = zip(*cap.box_to_map(x0, y0, x1, y1), strict=True)
        bbox = f.geometry().boundingBox()
        assert (bbox.xMinimum(), bbox.yMinimum(), bbox.xMaximum(), bbox.yMaximum()) == pytest.approx(
            (min(xs), min(ys), max(xs), max(ys)))
    first = next(grid.getFeatures())
    assert (first["model"], first["resolution"], first["tiling"]) == ("tiny", 600.0, "64 px tiles")  # provenance
    assert "model=tiny" in grid.metadata().keywords()["MapQuery"]
    probs_sum = sum(float(t.split()[-1]) for t in next(grid.getFeatures())["top"].split("; "))
    assert 0 < probs_sum <= 1.0001


def test_search_round_trip_batched(qgis_app, project, tmp_path, live_backend, utm_capture):
    _, cap = utm_capture
    outcome = run(SearchProcessor(CaptureSource(cap), SearchParams("a river", 48, top_k=7, batch=5), Common(tmp_path)),
                  live_backend)
    assert [r["rank"] for r in outcome.rows] == list(range(1, 8))
    scores = [r["score"] for r in outcome.rows]
    assert scores == sorted(scores, reverse=True)
    tiles = {r["tile"] for r in outcome.rows}
    assert len(tiles) == 7 and tiles <= set(kept_windows(cap, 48))  # never a tile of the nodata collar
    _, (ranked,) = add_outcome(outcome, project)
    assert ranked.featureCount() == 7 and ranked.crs().authid() == "EPSG:32618"
    best = next(f for f in ranked.getFeatures() if f["rank"] == 1)
    bbox = best.geometry().boundingBox()
    assert (bbox.xMinimum(), bbox.yMaximum()) == pytest.approx((outcome.rows[0]["xmin"], outcome.rows[0]["ymax"]))
    assert bbox.width() == pytest.approx(48 * 600.0)


@pytest.mark.parametrize("name, authid", [("RGB.byte.tif", "EPSG:32618"), ("world.rgb.tif", "EPSG:4326")])
def test_localize_round_trip_is_georeferenced(qgis_app, project, tmp_path, live_backend, data_dir, name, authid):
    layer = QgsRasterLayer(str(data_dir / name), name)
    res = layer.rasterUnitsPerPixelX() * 2
    cap = C.render_extent([layer], layer.extent(), layer.crs(), res)
    outcome = run(localize(cap, ["river", "forest"], tmp_path), live_backend)
    assert len(outcome.layers) == 2
    group, heat_layers = add_outcome(outcome, project, opacity=0.7)
    assert [lyr.name() for lyr in group.findLayers()] == ["heatmap: river", "heatmap: forest"]
    for heat in heat_layers:
        assert heat.crs().authid() == authid and heat.renderer().type() == "singlebandpseudocolor"
        ds = gdal.Open(heat.source())
        assert (ds.RasterXSize, ds.RasterYSize) == (cap.width, cap.height)
        gt = ds.GetGeoTransform()
        assert (gt[1], gt[2], gt[0], gt[4], gt[5], gt[3]) == pytest.approx(cap.transform)
        arr = ds.ReadAsArray()
        valid = cap.valid()
        assert np.isnan(ds.GetRasterBand(1).GetNoDataValue())  # NaN = no data, drawn transparent
        assert np.isnan(arr[~valid]).all() and np.isfinite(arr[valid]).all()
        assert arr.dtype == np.float32 and 0 <= np.nanmin(arr) < np.nanmax(arr) <= 1  # normalised, then smoothed
        # QGIS knows the nodata and draws nothing there
        assert heat.dataProvider().sourceHasNoDataValue(1) and np.isnan(heat.dataProvider().sourceNoDataValue(1))
        drawn = C.render_extent([heat], heat.extent(), heat.crs(), cap.transform[0]).valid()
        assert drawn.shape == arr.shape and not drawn[np.isnan(arr)].any() and drawn[arr > 0.5].all()


def test_asking_again_over_the_same_view_sends_no_canvas(qgis_app, tmp_path, live_backend, data_dir,
                                                         monkeypatch):
    import shared_protocol.client as client_module
    layer = QgsRasterLayer(str(data_dir / "RGB.byte.tif"), "rgb")
    first, second = (C.render_extent([layer], layer.extent(), layer.crs(), 900.0) for _ in range(2))
    assert np.array_equal(first.pixels, second.pixels)  # the same view renders the same pixels
    monkeypatch.setattr(client_module, "CANVAS_IDS", client_module.CanvasIds())  # nothing sent before
    sent = []
    request = client_module.Client.request

    def spy(self, op, params=None, arrays=None, **kw):
        if op == "localize":
            sent.append(sorted(arrays or {}))
        return request(self, op, params, arrays, **kw)

    monkeypatch.setattr(client_module.Client, "request", spy)
    a = run(localize(first, ["river"], tmp_path), live_backend)
    b = run(localize(second, ["forest"], tmp_path), live_backend)
    # two tasks, two clients: the second sent the canvas's id only (the canvas goes with its mask, RGB.byte.tif's
    # nodata collar, to a backend that takes masks)
    assert sent in ([["canvas", "windows"], ["windows"]], [["canvas", "canvas_mask", "windows"], ["windows"]])
    for outcome in (a, b):
        ds = gdal.Open(outcome.layers[0].path)
        assert (ds.RasterXSize, ds.RasterYSize) == (first.width, first.height)


def test_reprojected_capture_round_trip(qgis_app, project, tmp_path, live_backend, data_dir):
    """A UTM raster captured in EPSG:3857: the heatmap lands on the raster's footprint in 3857."""
    layer = QgsRasterLayer(str(data_dir / "RGB.byte.tif"), "rgb")
    dest = QgsCoordinateReferenceSystem("EPSG:3857")
    ext = C.layer_extent_in(layer, dest)
    cap = C.render_extent([layer], ext, dest, 1000.0)
    outcome = run(localize(cap, ["city"], tmp_path), live_backend)
    _, (heat,) = add_outcome(outcome, project)
    assert heat.crs().authid() == "EPSG:3857"
    assert heat.extent().contains(ext) or heat.extent().buffered(1000.0).contains(ext)
    assert heat.extent().width() == pytest.approx(cap.width * 1000.0)


def test_uint16_raw_bands_round_trip(qgis_app, tmp_path, live_backend, data_dir):
    layer = QgsRasterLayer(str(data_dir / "RGBA.uint16.tif"), "u16")
    cap = C.read_bands(layer, bands=[1, 2, 3, 4])
    assert cap.pixels.dtype == np.uint16
    outcome = run(classify(cap, ["a", "b"], 128, tmp_path), live_backend)
    assert sorted(r["tile"] for r in outcome.rows) == kept_windows(cap, 128)


def test_backend_down_is_reported_plainly(qgis_app, tmp_path, utm_capture):
    from qgis_plugin.backend_process import free_port
    from qgis_plugin.settings import Settings
    _, cap = utm_capture
    dead = Settings(mode="connect", address=f"tcp://127.0.0.1:{free_port()}", timeout_s=1.5, retries=0)
    t = time.monotonic()
    task = run_and_wait(MapQueryTask(localize(cap, ["x"], tmp_path), dead), timeout=30)
    assert task.outcome is None and task.error.code in (ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE)
    assert time.monotonic() - t < 15
    msg = task.message()
    assert msg.startswith("localize: x: ") and ("not reachable" in msg or "did not answer" in msg)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cancel_stops_a_request_in_flight(qgis_app, tmp_path, utm_capture):
    from mq_helpers import fake_server
    from qgis_plugin.settings import Settings
    _, cap = utm_capture
    with fake_server(lambda req: []) as server:  # answers pings, never the request itself
        settings = Settings(mode="connect", address=server.address, timeout_s=60, retries=0)
        task = MapQueryTask(localize(cap, ["x"], tmp_path), settings)
        t = time.monotonic()
        run_and_wait(task, timeout=30, cancel_after=0.5)
        assert task.error is not None and task.error.code == ErrorCode.CANCELLED
        assert time.monotonic() - t < 10
        assert any(r.op == "cancel" for r in server.requests)  # the backend was told to drop the job
        assert any(r.op == "localize" for r in server.requests)
    assert list(tmp_path.iterdir()) == []


def test_backend_errors_reach_the_user_in_plain_words(qgis_app, tmp_path, utm_capture):
    from mq_helpers import fake_server
    from shared_protocol import ProtocolError, Reply
    from qgis_plugin.settings import Settings
    _, cap = utm_capture

    def refuse(req):
        return [Reply.failure(req.id, req.op, ProtocolError(ErrorCode.UNAUTHORIZED, "missing or wrong access token"))]
    with fake_server(refuse) as server:
        settings = Settings(mode="connect", address=server.address, token="wrong", timeout_s=10)
        task = run_and_wait(MapQueryTask(classify(cap, ["a"], 64, tmp_path), settings), 30)
        assert task.error.code == ErrorCode.UNAUTHORIZED
        assert "refused the access token" in task.message()
        assert server.requests[-1].token == "wrong"


def test_reconnects_after_a_backend_restart_with_token(qgis_app, tmp_path, utm_capture):
    """Kill the backend: requests fail plainly; start it again on the same address: the plugin works again."""
    from mq_helpers import start_live_backend
    from shared_protocol import ProtocolError
    _, cap = utm_capture
    proc, settings = start_live_backend(["--token", "s3cret"])
    try:
        settings.token = "s3cret"
        assert probe(settings)["model"]["name"] == "tiny"
        proc.stop()
        with pytest.raises(ProtocolError) as err:
            probe(settings, timeout=1.0)
        assert err.value.code in (ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE)
        proc2, _ = start_live_backend(["--token", "s3cret"], address=settings.address)
        try:
            assert probe(settings)["model"]["name"] == "tiny"
            outcome = run(localize(cap, ["x"], tmp_path), settings)
            assert outcome.layers
            wrong = type(settings)(**{**settings.__dict__, "token": "nope"})
            task = run_and_wait(MapQueryTask(localize(cap, ["x"], tmp_path), wrong), 30)
            assert task.error.code == ErrorCode.UNAUTHORIZED and "token" in task.message()
        finally:
            proc2.stop()
    finally:
        proc.stop()
