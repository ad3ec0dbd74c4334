"""The multi-band valid-pixel rule is the same on both sides: the plugin's band reads (QGIS's Python) and the
backend's raster reading (its own Python, in a subprocess) give the same mask pixel for pixel, and both are the
rule of ``shared_protocol.nodata`` computed here from the band arrays: valid iff no band read is nodata and the
alpha is > 0 (as QGIS draws it; GDAL's dataset mask differs on RGB.byte.tif)."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import QgsRasterLayer

from mq_helpers import ROOT, backend_python
from qgis_plugin import capture as C
from test_masks import write_raster

H, W = 60, 80
GT = (500000.0, 10.0, 0.0, 4200000.0, 0.0, -10.0)
BACKEND_MASKS = """
import json, sys
import numpy as np
from backend.commands.adapt import read_raster
from backend.files import read_image
out = {}
for path in json.loads(sys.argv[1]):
    a, b = read_image(path).mask, read_raster(path, None)[1]
    a = np.ones(b.shape, np.uint8) if a is None else a
    assert np.array_equal(a != 0, b != 0), path
    np.save(path + ".backend.npy", (a != 0).astype(np.uint8))
"""


def one_band_nodata(tmp_path):
    """RGB uint8, nodata 0: only the green band is 0 in a block, red alone in a few pixels, all three in a corner."""
    bands = np.random.default_rng(7).integers(1, 256, (3, H, W)).astype(np.uint8)
    bands[1, 5:25, 10:50] = 0
    bands[0, 40:42, 60:70] = 0
    bands[:, 50:, :12] = 0
    path = write_raster(tmp_path / "one_band.tif", bands, GT, 32618, nodata=0, gdal_type=gdal.GDT_Byte)
    return path, (bands != 0).all(axis=0)


def alpha_uint16(tmp_path):
    """RGB uint16 and a 0-255 alpha band (GDAL's mask reads a 16-bit alpha scaled to 8 bits)."""
    bands = np.random.default_rng(8).integers(0, 4000, (4, H, W)).astype(np.uint16)
    bands[3] = 255
    bands[3, :, :20] = 0
    bands[3, 30:, 50:] = 1
    path = write_raster(tmp_path / "alpha.tif", bands, GT, 32618)
    ds = gdal.Open(path, gdal.GA_Update)
    ds.GetRasterBand(4).SetColorInterpretation(gdal.GCI_AlphaBand)
    ds = None
    return path, bands[3] > 0


def internal_mask(tmp_path):
    """RGB uint8 with a per-dataset internal mask (QGIS shows it as an alpha band)."""
    mask = np.full((H, W), 255, np.uint8)
    mask[:, :17] = 0
    mask[40:, 30:] = 0
    bands = np.full((3, H, W), 100, np.uint8)
    return write_raster(tmp_path / "masked.tif", bands, GT, 32618, gdal_type=gdal.GDT_Byte, mask=mask), mask > 0


def rgb_byte(tmp_path, data_dir):
    path = str(data_dir / "RGB.byte.tif")
    ds = gdal.Open(path)
    assert [ds.GetRasterBand(i).GetNoDataValue() for i in (1, 2, 3)] == [0.0, 0.0, 0.0]
    expected = (ds.ReadAsArray() != 0).all(axis=0)
    copy = tmp_path / "RGB.byte.tif"
    copy.write_bytes(open(path, "rb").read())  # the backend writes its mask beside the raster
    return str(copy), expected


def test_plugin_and_backend_masks_are_the_same_rule(qgis_app, tmp_path, data_dir):
    if not os.path.exists(backend_python()):
        pytest.skip("no backend Python (set BACKEND_PYTHON)")
    cases = [one_band_nodata(tmp_path), alpha_uint16(tmp_path), internal_mask(tmp_path), rgb_byte(tmp_path, data_dir)]
    paths = [p for p, _ in cases]
    run = subprocess.run([backend_python(), "-c", BACKEND_MASKS, json.dumps(paths)], capture_output=True, text=True,
                         timeout=300, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    for path, expected in cases:
        assert 0 < expected.mean() < 1, path
        plugin = C.read_bands(QgsRasterLayer(path, "r")).valid()
        backend = np.load(path + ".backend.npy") != 0
        assert np.array_equal(plugin, expected), path
        assert np.array_equal(backend, expected), path
    # on RGB.byte.tif the rule is not GDAL's dataset mask (invalid only where every band is nodata)
    ds = gdal.Open(cases[3][0])
    all_nodata = (ds.ReadAsArray() == 0).all(axis=0)
    assert (~all_nodata != cases[3][1]).sum() == 710
