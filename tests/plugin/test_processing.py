"""The Processing provider over whole rasters (tiled, batched) with a live backend, as the toolbox runs it."""
from __future__ import annotations

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import QgsRasterLayer, QgsVectorLayer


def run_alg(alg_id, params):
    import processing
    return processing.run(alg_id, params)


def test_provider_lists_three_algorithms(processing_ready):
    provider = processing_ready.providerById("mapquery")
    assert sorted(a.name() for a in provider.algorithms()) == ["classifyraster", "localizeraster", "rankraster"]


def test_classify_raster_covers_the_whole_raster(processing_ready, live_backend, data_dir, tmp_path):
    src = str(data_dir / "RGB.byte.tif")
    out = run_alg("mapquery:classifyraster", {"INPUT": src, "CLASSES": "forest\nriver, farmland", "TILE_SIZE": 100,
                                             "BATCH": 7, "BACKEND": live_backend.address,
                                             "OUTPUT": str(tmp_path / "cls.gpkg")})
    grid = QgsVectorLayer(out["OUTPUT"], "cls")
    assert grid.featureCount() == 8 * 8  # ceil(791/100) x ceil(718/100)
    assert grid.crs().authid() == "EPSG:32618"
    raster = QgsRasterLayer(src, "r")
    assert grid.extent().toRectF() == pytest.approx(raster.extent().toRectF()) or \
        grid.extent() == raster.extent()
    assert {f["label"] for f in grid.getFeatures()} <= {"forest", "river", "farmland"}
    assert sorted(f["tile"] for f in grid.getFeatures()) == list(range(64))


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
    assert heat.min() == pytest.approx(0) and heat.max() == pytest.approx(1)
    assert np.isfinite(heat).all()
    # the blocks were read with margins on a common grid: the stitched map equals one whole-raster request
    # with the same windows and smoothing (what a 400 px block gets)
    from qgis.core import QgsRasterLayer
    from qgis_plugin.capture import read_bands
    from qgis_plugin.processors import auto_smooth, auto_window_sizes
    from shared_protocol.client import Client
    whole = read_bands(QgsRasterLayer(src, "src"))
    with Client(live_backend.address, timeout=120) as client:
        ref = client.localize(whole.pixels, ["river"], window_sizes=auto_window_sizes(400, 400),
                              smooth=auto_smooth(400, 400), normalize=False).arrays["heatmaps"][0]
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    assert np.abs(heat - ref).max() < 1e-4


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
