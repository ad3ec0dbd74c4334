"""The real QGIS desktop under xvfb-run: the plugin loads from an installed profile, the dock opens, a heatmap
is drawn through it, and a screenshot is kept as an artifact (out/test_artifacts/, gitignored)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "out" / "test_artifacts"


def test_desktop_dock_draws_a_heatmap(live_backend, data_dir, tmp_path):
    if not Path("/usr/bin/qgis").exists() and shutil.which("qgis") is None:
        pytest.skip("the QGIS desktop is not installed (run scripts/install_qgis_desktop.sh); "
                    "the headless tests cover the plugin's logic")
    if shutil.which("xvfb-run") is None:
        pytest.skip("xvfb-run is not installed (apt-get install xvfb)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot, result = ARTIFACTS / "qgis_desktop_heatmap.png", tmp_path / "result.json"
    if shot.exists():
        shot.unlink()
    env = {**os.environ, "PROFILES": str(tmp_path / "profiles"), "MAPQUERY_MODE": "connect",
           "MAPQUERY_ADDRESS": live_backend.address, "MAPQUERY_AUTORUN": "a river",
           "MAPQUERY_OUTPUT_DIR": str(tmp_path / "outputs"),  # not the user's ~/mapquery_outputs
           "MAPQUERY_SCREENSHOT": str(shot), "MAPQUERY_RESULT": str(result), "MAPQUERY_QUIT": "1",
           "MAPQUERY_SAMPLE": str(data_dir / "RGB.byte.tif")}
    env.pop("QT_QPA_PLATFORM", None)  # the desktop draws on the virtual X server
    proc = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1280x800x24", str(ROOT / "scripts" / "run_qgis.sh")],
                          env=env, capture_output=True, text=True, timeout=150)
    assert result.exists(), (f"QGIS wrote no result (rc {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    outcome = json.loads(result.read_text())
    assert outcome["ok"], outcome
    assert outcome["groups"] == ["MapQuery: localize: a river [RGB.byte, map view]"]
    assert "heatmap: a river" in outcome["layers"] and "RGB.byte" in outcome["layers"]
    assert Path(outcome["sources"]["heatmap: a river"]).parent == tmp_path / "outputs"  # the configured folder
    assert shot.is_file() and shot.stat().st_size > 20_000
    from qgis.PyQt.QtGui import QImage
    img = QImage(str(shot))
    assert img.width() >= 800 and img.height() >= 600
    # a 1280 x 800 screen: the dock fits (it scrolls) and no label is clipped
    assert outcome["window"][0] <= 1280 and outcome["dock"][1] <= 800
    assert outcome["clipped"] == [], outcome["clipped"]
    # no score on the raster's nodata collar (nor outside it): the heatmap is NaN (nodata) there
    import numpy as np
    from osgeo import gdal
    heat_ds = gdal.Open(outcome["sources"]["heatmap: a river"])
    heat = heat_ds.GetRasterBand(1).ReadAsArray()
    gt = heat_ds.GetGeoTransform()
    bounds = (gt[0], gt[3] + gt[5] * heat_ds.RasterYSize, gt[0] + gt[1] * heat_ds.RasterXSize, gt[3])
    warped = gdal.Warp("", str(data_dir / "RGB.byte.tif"), format="MEM", outputBounds=bounds,
                       width=heat_ds.RasterXSize, height=heat_ds.RasterYSize, dstNodata=0,
                       warpOptions=["INIT_DEST=NO_DATA"], resampleAlg="near")
    nodata = (warped.ReadAsArray() == 0).any(axis=0)
    assert 0.05 < nodata.mean() < 0.9
    assert np.isnan(heat[nodata]).mean() > 0.98 and np.isfinite(heat[~nodata]).mean() > 0.98
    # the PNG is a real rendering, not a blank window: many distinct colours
    colours = {img.pixel(x, y) for x in range(0, img.width(), 7) for y in range(0, img.height(), 7)}
    assert len(colours) > 200
