"""The tools (qgis_plugin/tools) on a raster with a wide nodata border, against a scripted backend that follows
the mask contract (MASK_CONTRACT / shared_protocol), and one that predates masks: no answer comes from nodata,
masks travel as NAME_mask, skipped tiles give no feature, heatmaps are NaN there; the dock's tools and the
Processing algorithms send the same requests (one implementation)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import QgsFeature, QgsGeometry, QgsRasterLayer, QgsVectorLayer

from shared_protocol import ErrorCode, ProtocolError, Reply

from qgis_plugin import capture as C
from qgis_plugin.settings import Settings
from qgis_plugin.sources import CaptureSource
from qgis_plugin.tasks import MapQueryTask, run_and_wait
from qgis_plugin.tools.base import Common, grid_windows
from qgis_plugin.tools.classify import ClassifyParams, ClassifyProcessor
from qgis_plugin.tools.localize import LocalizeParams, LocalizeProcessor
from qgis_plugin.tools.search import SearchParams, SearchProcessor

NODATA = 65535
H, W, BORDER = 200, 260, 50
LEAK = 7.0  # what the scripted backends put on invalid pixels when they do not blank them themselves


@pytest.fixture
def raster(tmp_path):
    rng = np.random.default_rng(5)
    bands = rng.integers(600, 9000, (3, H, W)).astype(np.uint16)
    for b in bands:
        b[:BORDER], b[-BORDER:], b[:, :BORDER], b[:, -BORDER:] = NODATA, NODATA, NODATA, NODATA
    ds = gdal.GetDriverByName("GTiff").Create(str(tmp_path / "r.tif"), W, H, 3, gdal.GDT_UInt16)
    ds.SetGeoTransform((20.0, 0.001, 0.0, 40.0, 0.0, -0.001))
    ds.SetProjection('GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],'
                     'UNIT["degree",0.0174532925199433],AUTHORITY["EPSG","4326"]]')
    for i, b in enumerate(bands):
        ds.GetRasterBand(i + 1).WriteArray(b)
        ds.GetRasterBand(i + 1).SetNoDataValue(NODATA)
    ds = None
    return str(tmp_path / "r.tif"), (bands != NODATA).all(axis=0), bands


def contract_backend(req, skip_share=None):
    """Answers like a backend with masks: tiles/windows below min_valid (or ``skip_share``) skipped, NaN outside."""
    p, a = req.params, req.arrays
    min_valid = p.get("min_valid", 0.5) if skip_share is None else skip_share
    if req.op == "classify":
        masks = a.get("tiles_mask")
        tiles = []
        for i in range(len(a["tiles"])):
            share = masks[i].astype(bool).mean() if masks is not None else 1.0
            tiles.append({"index": i, "skipped": True, "label": None, "top": []} if share < min_valid else
                         {"index": i, "skipped": False, "label": p["classes"][0],
                          "top": [{"label": p["classes"][0], "score": 0.9}]})
        return [Reply.ok(req.id, req.op, {"tiles": tiles, "skipped": sum(t["skipped"] for t in tiles)})]
    if req.op == "rank":
        imgs, masks = a["images"].astype(np.float64), a.get("images_mask")
        scores = imgs.mean(axis=(1, 2, 3)) / 65535  # deterministic: the brightest tile first
        skipped = [i for i in range(len(imgs)) if masks is not None and masks[i].astype(bool).mean() < min_valid]
        order = [int(i) for i in np.argsort(-scores, kind="stable") if i not in skipped][:p.get("top_k", 5)]
        return [Reply.ok(req.id, req.op, {"by_query": [[{"index": i, "score": float(scores[i])} for i in order]],
                                          "skipped": skipped})]
    if req.op == "localize":  # the plugin names the windows: each scores the mean of its valid pixels' band 1
        canvas = a["canvas"].astype(np.float32)
        heat = canvas[..., 0] / 10000.0
        mask = a.get("canvas_mask")
        if mask is not None:
            heat[mask == 0] = np.nan
        else:
            heat[canvas.sum(axis=2) == 0] = LEAK  # a backend without the mask scores nodata too
        scores = np.array([np.nan if np.isnan(heat[y0:y1, x0:x1]).mean() > 1 - min_valid else
                           np.nanmean(heat[y0:y1, x0:x1]) for x0, y0, x1, y1 in a["windows"]], np.float32)
        return [Reply.ok(req.id, req.op, {"windows": int(np.isfinite(scores).sum()), "canvas_id": None},
                         {"scores": np.stack([scores] * len(p["queries"]))})]
    return [Reply.failure(req.id, req.op, ProtocolError(ErrorCode.UNKNOWN_OP, req.op))]


def old_backend(refused):
    """A backend that predates masks: it refuses min_valid and NAME_mask arrays as unknown, like today's schema
    does for any parameter or array it does not know, and otherwise answers as the contract backend."""
    def handle(req):
        unknown = sorted([k for k in req.params if k == "min_valid"] or [k for k in req.arrays if k.endswith("_mask")])
        if unknown:
            refused.append(unknown)
            kind = ErrorCode.BAD_PARAMS if "min_valid" in unknown else ErrorCode.BAD_ARRAY
            return [Reply.failure(req.id, req.op, ProtocolError(kind, f"{req.op}: unknown {unknown}", unknown=unknown))]
        return contract_backend(req)
    return handle


def run(processor, address, tmp_path):
    task = run_and_wait(MapQueryTask(processor, Settings(mode="connect", address=address, timeout_s=30, retries=0)),
                        timeout=60)
    assert task.error is None, task.message()
    return task.outcome


def kept(valid, tile):
    _, windows = grid_windows(valid.shape[0], valid.shape[1], tile)
    return [i for i, (x0, y0, x1, y1) in enumerate(windows) if valid[y0:y1, x0:x1].mean() >= 0.5], windows


def test_classify_sends_masks_and_labels_no_nodata(qgis_app, raster, tmp_path):
    from mq_helpers import fake_server
    path, valid, _ = raster
    cap = C.read_bands(QgsRasterLayer(path, "r"))
    keep, windows = kept(valid, 32)
    assert 0 < len(keep) < len(windows) / 2  # most tiles are nodata
    with fake_server(lambda req: contract_backend(req, skip_share=0.9), strict=False) as server:
        outcome = run(ClassifyProcessor(CaptureSource(cap), ClassifyParams(["a", "b"], 32, batch=9), Common(tmp_path)),
                      server.address, tmp_path)
        sent = [r for r in server.requests if r.op == "classify"]
    masks = np.concatenate([r.arrays["tiles_mask"] for r in sent])
    assert all(r.params["min_valid"] == 0.5 and r.arrays["tiles_mask"].dtype == np.uint8 for r in sent)
    expected = np.stack([valid[y0:y1, x0:x1] for x0, y0, x1, y1 in windows[keep]])
    assert np.array_equal(masks.astype(bool), expected)  # the tiles sent: those with half their pixels valid
    # the backend skipped the tiles under 90 % valid: they get no feature either
    labelled = [i for i in keep if valid[windows[i][1]:windows[i][3], windows[i][0]:windows[i][2]].mean() >= 0.9]
    assert sorted(r["tile"] for r in outcome.rows) == labelled
    assert f"{len(windows) - len(labelled)} skipped" in outcome.summary


def test_search_never_ranks_nodata(qgis_app, raster, tmp_path):
    from mq_helpers import fake_server
    path, valid, bands = raster
    cap = C.read_bands(QgsRasterLayer(path, "r"))
    keep, windows = kept(valid, 40)
    with fake_server(contract_backend, strict=False) as server:
        outcome = run(SearchProcessor(CaptureSource(cap), SearchParams("x", 40, top_k=5, batch=4), Common(tmp_path)),
                      server.address, tmp_path)
        sent = [r for r in server.requests if r.op == "rank"]
    vr = sent[0].params["value_range"]
    px = np.moveaxis(bands, 0, 2).astype(np.float64)
    assert vr == pytest.approx(list(np.percentile(px[valid], (2, 98))))  # stretch from valid pixels only
    pixels = np.where(valid[..., None], px, 0)
    score = {i: pixels[y0:y1, x0:x1].mean() for i, (x0, y0, x1, y1) in enumerate(windows) if i in keep}
    best = sorted(score, key=lambda i: (-score[i], i))[:5]
    assert [r["tile"] for r in outcome.rows] == best
    assert all(valid[windows[i][1]:windows[i][3], windows[i][0]:windows[i][2]].mean() >= 0.5 for i in best)


def test_localize_heatmap_is_nan_outside_and_normalised_over_valid(qgis_app, raster, tmp_path):
    from mq_helpers import fake_server
    path, valid, bands = raster
    cap = C.read_bands(QgsRasterLayer(path, "r"))
    with fake_server(contract_backend, strict=False) as server:
        outcome = run(LocalizeProcessor(CaptureSource(cap), LocalizeParams(["q"], smooth=0), Common(tmp_path)),
                      server.address, tmp_path)
        (req,) = [r for r in server.requests if r.op == "localize"]
    assert np.array_equal(req.arrays["canvas_mask"].astype(bool), valid)
    # independently: the SeLo windows with half their pixels valid, each pixel the mean of their scores
    from qgis_plugin.tools.localize import auto_window_sizes
    from shared_protocol.selo import selo_windows
    raw = np.where(valid, bands[0] / 10000.0, np.nan)
    total, count = np.zeros((H, W)), np.zeros((H, W))
    for s in auto_window_sizes(H, W):
        for x0, y0, x1, y1 in selo_windows(H, W, s):
            if valid[y0:y1, x0:x1].mean() >= 0.5:
                total[y0:y1, x0:x1] += np.nanmean(raw[y0:y1, x0:x1])
                count[y0:y1, x0:x1] += 1
    assert sorted(map(tuple, req.arrays["windows"])) == sorted(
        (x0, y0, x1, y1) for s in auto_window_sizes(H, W) for x0, y0, x1, y1 in selo_windows(H, W, s)
        if valid[y0:y1, x0:x1].mean() >= 0.5)  # only the windows with enough valid pixels are sent
    mean = np.where(valid & (count > 0), total / np.maximum(count, 1), np.nan)
    expected = (mean - np.nanmin(mean)) / (np.nanmax(mean) - np.nanmin(mean))
    ds = gdal.Open(outcome.layers[0].path)
    band = ds.GetRasterBand(1)
    heat = band.ReadAsArray()
    assert np.isnan(band.GetNoDataValue())
    assert np.isnan(heat[~valid]).all() and np.array_equal(np.isnan(heat), np.isnan(expected))
    np.testing.assert_allclose(heat, expected, atol=2e-5, equal_nan=True)  # the float32 scores of the fake


def test_a_backend_without_masks_still_gets_no_nodata_answers(qgis_app, raster, tmp_path):
    """A backend that predates masks refuses the mask arrays: the plugin asks again without them, remembers it,
    says so, still sends no nodata tile and blanks the heatmap's nodata itself."""
    from mq_helpers import fake_server
    path, valid, _ = raster
    cap = C.read_bands(QgsRasterLayer(path, "r"))
    keep, windows = kept(valid, 32)
    refused = []
    with fake_server(old_backend(refused), strict=False) as server:
        cls = run(ClassifyProcessor(CaptureSource(cap), ClassifyParams(["a"], 32, batch=500), Common(tmp_path)),
                  server.address, tmp_path)
        heat = run(LocalizeProcessor(CaptureSource(cap), LocalizeParams(["q"], smooth=0), Common(tmp_path)),
                   server.address, tmp_path)
        assert refused == [["min_valid"]]  # refused once; the address is remembered
        work = [r for r in server.requests if r.op != "ping"]
        assert "tiles_mask" in work[0].arrays  # the first try carried the mask; then never again
        assert all("tiles_mask" not in r.arrays and "canvas_mask" not in r.arrays for r in work[1:])
    assert sorted(r["tile"] for r in cls.rows) == keep
    assert any("does not take valid-pixel masks" in w for w in cls.warnings + heat.warnings)
    arr = gdal.Open(heat.layers[0].path).ReadAsArray()
    assert np.isnan(arr[~valid]).all() and np.nanmax(arr) == 1.0  # nodata pixels never reach the map


def test_processing_and_the_dock_share_the_tools(qgis_app, processing_ready, raster, tmp_path):
    """classifyraster over the raster sends what the dock's classify sends for its raw bands; the algorithms
    module holds no request or tiling logic of its own."""
    import processing

    from mq_helpers import fake_server
    from qgis_plugin.processing import algorithms
    path, valid, _ = raster
    src = inspect.getsource(algorithms)
    assert not any(s in src for s in ("grid_windows", ".classify(", ".rank(", ".localize(", "np.stack", "percentile"))
    with fake_server(contract_backend, strict=False) as server:
        processing.run("mapquery:classifyraster", {"INPUT": path, "CLASSES": "a, b", "TILE_SIZE": 32, "BATCH": 9,
                                                   "BACKEND": server.address, "OUTPUT": str(tmp_path / "c.gpkg")})
        alg = [r for r in server.requests if r.op == "classify"]
        server.requests.clear()
        dock_source = CaptureSource(C.read_bands(QgsRasterLayer(path, "r")))  # the dock's raw-bands capture
        run(ClassifyProcessor(dock_source, ClassifyParams(["a", "b"], 32, batch=9), Common(tmp_path)), server.address,
            tmp_path)
        dock = [r for r in server.requests if r.op == "classify"]
    assert len(alg) == len(dock) > 1
    for x, y in zip(alg, dock, strict=True):
        assert x.params == y.params and sorted(x.arrays) == sorted(y.arrays) == ["tiles", "tiles_mask"]
        assert all(np.array_equal(x.arrays[k], y.arrays[k]) for k in x.arrays)
    keep, _ = kept(valid, 32)
    assert sorted(f["tile"] for f in QgsVectorLayer(str(tmp_path / "c.gpkg"), "c").getFeatures()) == keep


def test_processing_area_of_interest(qgis_app, processing_ready, raster, tmp_path):
    import processing

    from mq_helpers import fake_server
    path, valid, _ = raster
    aoi = QgsVectorLayer("Polygon?crs=EPSG:4326", "aoi", "memory")
    f = QgsFeature()
    f.setGeometry(QgsGeometry.fromWkt("POLYGON((20.05 39.95, 20.13 39.95, 20.13 39.85, 20.05 39.85, 20.05 39.95))"))
    aoi.dataProvider().addFeatures([f])
    rows, cols = np.mgrid[0:H, 0:W]
    inside = ((20.0 + (cols + 0.5) * 0.001 > 20.05) & (20.0 + (cols + 0.5) * 0.001 < 20.13)
              & (40.0 - (rows + 0.5) * 0.001 < 39.95) & (40.0 - (rows + 0.5) * 0.001 > 39.85))
    with fake_server(contract_backend, strict=False) as server:
        out = processing.run("mapquery:localizeraster", {"INPUT": path, "QUERY": "q", "AOI": aoi,
                                                         "BACKEND": server.address, "OUTPUT": str(tmp_path / "h.tif")})
        cls = processing.run("mapquery:classifyraster", {"INPUT": path, "CLASSES": "a", "TILE_SIZE": 20, "AOI": aoi,
                                                         "BACKEND": server.address, "OUTPUT": str(tmp_path / "c.gpkg")})
    heat = gdal.Open(out["OUTPUT"]).ReadAsArray()
    assert np.array_equal(np.isfinite(heat), valid & inside)
    keep, _ = kept(valid & inside, 20)
    assert sorted(f["tile"] for f in QgsVectorLayer(cls["OUTPUT"], "c").getFeatures()) == keep and keep


def test_live_backend_honours_the_masks(qgis_app, live_backend, raster, monkeypatch):
    """Needs the backend side of issue #10 (the `masks` helper's branch): skipped until a backend takes masks.
    The plugin's own requests: the backend skips a tile below min_valid, blanks a heatmap outside the mask, and
    a second localize over the same canvas + mask sends only its id."""
    import shared_protocol.client as client_module
    from shared_protocol.client import Client
    from qgis_plugin.tools.base import NO_MASKS_WARNING, Feedback, Wire
    path, valid, _ = raster
    cap = C.read_bands(QgsRasterLayer(path, "r"))
    tiles = np.stack([cap.pixels[0:32, 0:32], cap.pixels[100:132, 100:132]])  # nodata corner, valid centre
    masks = np.stack([cap.mask[0:32, 0:32], cap.mask[100:132, 100:132]])
    assert masks[0].sum() == 0 and masks[1].all()
    with Client(live_backend.address, timeout=120) as client:
        wire = Wire(client, Feedback(), 0.5)
        reply = wire.request("classify", {"classes": ["a", "b"]}, {"tiles": tiles}, {"tiles": masks})
        if NO_MASKS_WARNING in wire.warnings:
            pytest.skip("this backend predates valid-pixel masks (issue #10's backend part): run after the merge")
        assert [t["skipped"] for t in reply.result["tiles"]] == [True, False]
        monkeypatch.setattr(client_module, "CANVAS_IDS", client_module.CanvasIds())
        sent = []
        request = client_module.Client.request

        def spy(self, op, params=None, arrays=None, **kw):
            sent.append(sorted(arrays or {}))
            return request(self, op, params, arrays, **kw)
        monkeypatch.setattr(client_module.Client, "request", spy)
        params = {"queries": ["q"], "window_sizes": [32, 64], "smooth": 0, "normalize": False}
        first = wire.localize(cap.pixels, cap.mask, params).arrays["heatmaps"][0]
        again = wire.localize(cap.pixels, cap.mask, {**params, "queries": ["r"]}).arrays["heatmaps"][0]
    assert sent == [["canvas", "canvas_mask"], []]
    for heat in (first, again):
        assert np.isnan(heat[~valid]).all() and np.isfinite(heat[valid]).mean() > 0.9


def test_processing_outputs_are_styled_like_the_docks(qgis_app, processing_ready, project, raster, tmp_path):
    import processing

    from mq_helpers import fake_server
    path, _, _ = raster
    with fake_server(contract_backend, strict=False) as server:
        common = {"INPUT": path, "BACKEND": server.address}
        cls = processing.runAndLoadResults("mapquery:classifyraster", {**common, "CLASSES": "a, b", "TILE_SIZE": 20,
                                                                       "OUTPUT": str(tmp_path / "c.gpkg")})
        rank = processing.runAndLoadResults("mapquery:rankraster", {**common, "QUERY": "q", "TILE_SIZE": 20,
                                                                    "OUTPUT": str(tmp_path / "r.gpkg")})
        heat = processing.runAndLoadResults("mapquery:localizeraster", {**common, "QUERY": "q",
                                                                        "OUTPUT": str(tmp_path / "h.tif")})
    layers = {lyr.source().split("|")[0]: lyr for lyr in project.mapLayers().values()}
    grid, ranked, heatmap = (layers[r["OUTPUT"]] for r in (cls, rank, heat))
    assert grid.renderer().type() == "categorizedSymbol" and grid.labelsEnabled()
    assert grid.labeling().settings().scaleVisibility
    assert ranked.labelsEnabled() and "rank" in ranked.labeling().settings().fieldName
    assert heatmap.renderer().type() == "singlebandpseudocolor"
    assert {lyr.customProperty("mapquery_rs/output") for lyr in (grid, ranked, heatmap)} == {
        "classification", "ranking", "heatmap"}
    # provenance: in the layer metadata, the features' attributes and the GeoTIFF's metadata
    for lyr, query in ((grid, "classes: a, b"), (ranked, "q"), (heatmap, "q")):
        keywords = lyr.metadata().keywords()["MapQuery"]
        assert f"query={query}" in keywords and any(k.startswith("date=20") for k in keywords), keywords
        assert "resolution: 0.001" in lyr.metadata().abstract()
    f = next(grid.getFeatures())
    assert f["query"] == "classes: a, b" and f["tiling"] == "20 px tiles" and f["resolution"] == pytest.approx(0.001)
    assert f["adapter"] == "(base model)" and f["model"] == "?"  # the scripted backend names no model
    assert next(ranked.getFeatures())["query"] == "q"
    ds = gdal.Open(heat["OUTPUT"])
    md = ds.GetMetadata()
    assert md["MAPQUERY_QUERY"] == "q" and md["MAPQUERY_TILING"].startswith("SeLo windows")


def test_heatmap_regions_follow_the_threshold_and_never_cover_nodata(qgis_app, tmp_path):
    from qgis_plugin.masks import rasterize
    from qgis_plugin.outputs import write_geotiff
    from qgis_plugin.tools.localize import heatmap_regions
    rows, cols = np.mgrid[0:60, 0:80]
    heat = np.exp(-((rows - 20) ** 2 + (cols - 20) ** 2) / 80.0) + np.exp(-((rows - 40) ** 2 + (cols - 60) ** 2) / 50.0)
    heat = (heat / heat.max()).astype(np.float32)
    heat[:, 59:61] = np.nan  # a nodata stripe through the second blob
    transform = (30.0, 0.0, 500000.0, 0.0, -30.0, 4200000.0)
    from qgis.core import QgsCoordinateReferenceSystem
    wkt = QgsCoordinateReferenceSystem("EPSG:32618").toWkt()
    src = write_geotiff(tmp_path / "h.tif", heat, transform, wkt, ["heatmap: harbour"], float("nan"),
                        {"model": "tiny"})
    spec = heatmap_regions(str(src), 0.6, Common(tmp_path))
    layer = QgsVectorLayer(spec.path, "r")
    expected = np.isfinite(heat) & (heat >= 0.6)
    feats = list(layer.getFeatures())
    assert len(feats) == 3  # one blob, the other cut in two by the nodata stripe
    assert sum(f["pixels"] for f in feats) == expected.sum()
    assert {(f["query"], f["threshold"], f["model"]) for f in feats} == {("harbour", 0.6, "tiny")}
    back = rasterize([bytes(f.geometry().asWkb()) for f in feats], transform, 60, 80)
    assert np.array_equal(back.astype(bool), expected)  # exactly the pixels at or above it, never NaN ones
    assert layer.crs().authid() == "EPSG:32618"
