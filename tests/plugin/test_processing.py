"""The Processing provider over whole rasters (tiled, batched) with a live backend, as the toolbox runs it."""
from __future__ import annotations

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import QgsRasterLayer, QgsVectorLayer


def run_alg(alg_id, params):
    import processing
    return processing.run(alg_id, params)


def test_provider_lists_its_algorithms(processing_ready):
    provider = processing_ready.providerById("mapquery")
    assert sorted(a.name() for a in provider.algorithms()) == ["adapt", "classifyraster", "indexbuild", "indexsearch",
                                                               "localizeraster", "rankraster"]


def test_classify_raster_covers_the_whole_raster(processing_ready, live_backend, data_dir, tmp_path):
    src = str(data_dir / "RGB.byte.tif")
    out = run_alg("mapquery:classifyraster", {"INPUT": src, "CLASSES": "forest\nriver, farmland", "TILE_SIZE": 100,
                                             "BATCH": 7, "BACKEND": live_backend.address,
                                             "OUTPUT": str(tmp_path / "cls.gpkg")})
    grid = QgsVectorLayer(out["OUTPUT"], "cls")
    assert grid.crs().authid() == "EPSG:32618"
    # tiles with at least half of their pixels valid (no band at the nodata value 0), from GDAL's own read
    from qgis_plugin.tools.base import grid_windows
    valid = (gdal.Open(src).ReadAsArray() != 0).all(axis=0)
    _, windows = grid_windows(718, 791, 100)  # ceil(791/100) x ceil(718/100) = 64 tiles
    kept = [i for i, (x0, y0, x1, y1) in enumerate(windows) if valid[y0:y1, x0:x1].mean() >= 0.5]
    assert 0 < len(kept) < 64
    assert sorted(f["tile"] for f in grid.getFeatures()) == kept
    raster = QgsRasterLayer(src, "r")
    assert raster.extent().contains(grid.extent())
    assert {f["label"] for f in grid.getFeatures()} <= {"forest", "river", "farmland"}


def test_rank_raster_keeps_the_global_top_k(processing_ready, live_backend, data_dir, tmp_path):
    out = run_alg("mapquery:rankraster", {"INPUT": str(data_dir / "world.rgb.tif"), "QUERY": "ocean", "TILE_SIZE": 32,
                                          "TOP_K": 6, "BATCH": 10, "BACKEND": live_backend.address,
                                          "OUTPUT": str(tmp_path / "rank.gpkg")})
    ranked = QgsVectorLayer(out["OUTPUT"], "rank")
    feats = sorted(ranked.getFeatures(), key=lambda f: f["rank"])
    assert [f["rank"] for f in feats] == [1, 2, 3, 4, 5, 6]
    scores = [f["score"] for f in feats]
    assert scores == sorted(scores, reverse=True)
    assert ranked.crs().authid() == "EPSG:4326"
    for f in feats:  # 32 px tiles of 0.703125 degrees
        assert f.geometry().boundingBox().width() == pytest.approx(32 * 0.703125)


def test_localize_raster_stitches_blocks(processing_ready, live_backend, data_dir, tmp_path):
    src = str(data_dir / "RGB.byte.tif")
    out = run_alg("mapquery:localizeraster", {"INPUT": src, "QUERY": "river", "BLOCK_SIZE": 400,
                                              "BACKEND": live_backend.address, "OUTPUT": str(tmp_path / "h.tif")})
    ds, ref = gdal.Open(out["OUTPUT"]), gdal.Open(src)
    assert (ds.RasterXSize, ds.RasterYSize) == (ref.RasterXSize, ref.RasterYSize)
    assert ds.GetGeoTransform() == pytest.approx(ref.GetGeoTransform())
    heat = ds.ReadAsArray()
    valid = (ref.ReadAsArray() != 0).all(axis=0)  # RGB.byte.tif: nodata 0 around a rotated footprint
    assert np.isnan(ds.GetRasterBand(1).GetNoDataValue())
    assert np.isnan(heat[~valid]).all()
    # blocks of 400 px: the map equals the backend's fast mode on the whole raster as one canvas, with the
    # windows and smoothing the whole raster gets, mask sent alike
    from qgis.core import QgsRasterLayer
    from qgis_plugin.capture import read_bands
    from qgis_plugin.tools.base import Feedback, Wire
    from qgis_plugin.tools.localize import auto_smooth, auto_window_sizes
    from shared_protocol.client import Client
    whole = read_bands(QgsRasterLayer(src, "src"))
    assert np.array_equal(whole.valid(), valid)
    with Client(live_backend.address, timeout=120) as client:
        params = {"queries": ["river"], "window_sizes": auto_window_sizes(718, 791), "smooth": auto_smooth(718, 791)}
        whole_map = Wire(client, Feedback(), 0.5).localize(whole.pixels, whole.mask, params).arrays["heatmaps"][0]
    assert np.array_equal(np.isnan(heat), np.isnan(whole_map)) and np.isfinite(heat[valid]).mean() > 0.99
    np.testing.assert_allclose(heat, whole_map, atol=2e-5, equal_nan=True)


def test_localize_raster_reference_mode_is_the_backends_reference_map(processing_ready, live_backend, data_dir,
                                                                       tmp_path):
    """SELO_MODE reference: the whole raster as one canvas through the backend's reference pipeline (no blocks,
    no renormalisation), nodata blanked afterwards, with a warning."""
    src = str(data_dir / "RGB.byte.tif")
    out = run_alg("mapquery:localizeraster", {"INPUT": src, "QUERY": "river", "SELO_MODE": 1, "BLOCK_SIZE": 400,
                                              "BACKEND": live_backend.address, "OUTPUT": str(tmp_path / "ref.tif")})
    heat = gdal.Open(out["OUTPUT"]).ReadAsArray()
    valid = (gdal.Open(src).ReadAsArray() != 0).all(axis=0)
    assert np.isnan(heat[~valid]).all() and np.isfinite(heat[valid]).all()
    from qgis_plugin.capture import read_bands
    from qgis_plugin.tools.localize import auto_smooth, auto_window_sizes
    from shared_protocol.client import Client
    whole = read_bands(QgsRasterLayer(src, "src"))
    with Client(live_backend.address, timeout=300) as client:  # the same canvas, sent directly, no mask
        ref = client.localize(whole.pixels, ["river"], selo_mode="reference",
                              window_sizes=auto_window_sizes(718, 791), smooth=auto_smooth(718, 791)).arrays
    assert np.array_equal(heat[valid], ref["heatmaps"][0][valid])  # the 8-bit map / 255, as it came
    assert set(np.unique(np.rint(heat[valid] * 255))) <= set(range(256))


def test_processing_errors_are_plain(processing_ready, data_dir, tmp_path):
    from qgis.core import QgsProcessingException
    from qgis_plugin.backend_process import free_port
    with pytest.raises(QgsProcessingException, match="not reachable|did not answer"):
        run_alg("mapquery:rankraster", {"INPUT": str(data_dir / "world.rgb.tif"), "QUERY": "x", "TILE_SIZE": 64,
                                        "BACKEND": f"tcp://127.0.0.1:{free_port()}", "TIMEOUT": 1.0,
                                        "OUTPUT": str(tmp_path / "r.gpkg")})


def test_qgis_process_runs_the_installed_plugin(qgis_app, live_backend, data_dir, tmp_path):
    """``qgis_process`` with the plugin installed in a profile (Debian's wrapper passes a flag qgis_process
    rejects, so the binary is called directly when it is there)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    exe = shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    if exe is None:
        pytest.skip("qgis_process is not installed (Debian package qgis)")
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "scripts"))
    import build_plugin
    profile = tmp_path / "profiles" / "default"
    build_plugin.stage(profile / "python" / "plugins")
    (profile / "QGIS").mkdir(parents=True)
    (profile / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\nmapquery_rs=true\n")
    env = {**os.environ, "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path), "QT_QPA_PLATFORM": "offscreen"}
    out = tmp_path / "rank.gpkg"
    proc = subprocess.run([exe, "--json", "run", "mapquery:rankraster", "--", f"INPUT={data_dir / 'world.rgb.tif'}",
                           "QUERY=ocean", "TILE_SIZE=64", "TOP_K=3", f"BACKEND={live_backend.address}",
                           f"OUTPUT={out}"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["results"]["OUTPUT"] == str(out)
    assert QgsVectorLayer(str(out), "r").featureCount() == 3
