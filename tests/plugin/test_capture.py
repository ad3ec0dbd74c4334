"""Capture georeferencing on real rasters (UTM, EPSG:3857, EPSG:4326), checked against GDAL's own numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from osgeo import gdal, osr
from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsRectangle

from qgis_plugin import capture as C
from qgis_plugin.errors import PluginError
from qgis_plugin.outputs import write_geotiff

RASTERS = ["RGB.byte.tif", "RGBA.uint16.tif", "rgb1_fake_nir_epsg3857.tif", "world.rgb.tif"]
AUTHIDS = {"RGB.byte.tif": "EPSG:32618", "RGBA.uint16.tif": "EPSG:32612",
           "rgb1_fake_nir_epsg3857.tif": "EPSG:3857", "world.rgb.tif": "EPSG:4326"}


def gdal_info(path):
    ds = gdal.Open(str(path))
    gt = ds.GetGeoTransform()
    arr = ds.ReadAsArray()
    arr = arr[None] if arr.ndim == 2 else arr
    return ds, gt, np.ascontiguousarray(arr.transpose(1, 2, 0))


def rasterio_order(gt):
    return (gt[1], gt[2], gt[0], gt[4], gt[5], gt[3])


@pytest.mark.parametrize("name", RASTERS)
def test_raw_bands_match_gdal_exactly(qgis_app, data_dir, name):
    path = data_dir / name
    _, gt, arr = gdal_info(path)
    layer = QgsRasterLayer(str(path), name)
    cap = C.read_bands(layer, bands=list(range(1, arr.shape[2] + 1)))
    assert cap.crs_authid == AUTHIDS[name]
    assert cap.pixels.dtype == arr.dtype and cap.pixels.dtype in (np.uint8, np.uint16)
    np.testing.assert_array_equal(cap.pixels, arr)
    np.testing.assert_allclose(cap.transform, rasterio_order(gt), rtol=0, atol=1e-9)
    # corners and a pixel centre, computed from GDAL's geotransform by hand
    for col, row in ((0, 0), (arr.shape[1], arr.shape[0]), (10.5, 20.5)):
        x, y = cap.pixel_to_map(col, row)
        assert x == pytest.approx(gt[0] + col * gt[1], abs=1e-6)
        assert y == pytest.approx(gt[3] + row * gt[5], abs=1e-6)
        c, r = cap.map_to_pixel(x, y)
        assert (c, r) == (pytest.approx(col, abs=1e-9), pytest.approx(row, abs=1e-9))


def test_raw_bands_of_a_sub_extent_snap_to_the_raster_grid(qgis_app, data_dir):
    path = data_dir / "RGB.byte.tif"
    _, gt, arr = gdal_info(path)
    layer = QgsRasterLayer(str(path), "rgb")
    # an extent that cuts pixels: must snap outwards to columns 100-300, rows 50-250
    x0, y1 = gt[0] + 100.4 * gt[1], gt[3] + 50.3 * gt[5]
    x1, y0 = gt[0] + 299.6 * gt[1], gt[3] + 249.9 * gt[5]
    cap = C.read_bands(layer, extent=QgsRectangle(x0, y0, x1, y1))
    assert (cap.width, cap.height) == (200, 200)
    np.testing.assert_array_equal(cap.pixels, arr[50:250, 100:300])
    assert cap.transform[2] == pytest.approx(gt[0] + 100 * gt[1])
    assert cap.transform[5] == pytest.approx(gt[3] + 50 * gt[5])


def test_single_band_and_uint16_alpha(qgis_app, data_dir):
    grey = C.read_bands(QgsRasterLayer(str(data_dir / "rgb1_fake_nir_epsg3857.tif"), "g"))
    assert grey.pixels.shape[2] == 1 and grey.rgb().shape[2] == 3
    rgba = C.read_bands(QgsRasterLayer(str(data_dir / "RGBA.uint16.tif"), "u16"), bands=[1, 2, 3, 4])
    assert rgba.pixels.dtype == np.uint16 and rgba.pixels.shape[2] == 4
    assert set(np.unique(rgba.pixels[:, :, :3])) <= {0, 10000}


@pytest.mark.parametrize("name", ["world.rgb.tif", "RGB.byte.tif", "rgb1_fake_nir_epsg3857.tif"])
def test_render_at_native_resolution_matches_the_file(qgis_app, data_dir, name):
    """Rendering the layer's extent at its x resolution: same georeferencing; pixels equal where square."""
    path = data_dir / name
    _, gt, arr = gdal_info(path)
    layer = QgsRasterLayer(str(path), name)
    cap = C.render_extent([layer], layer.extent(), layer.crs(), gt[1])
    assert cap.crs_authid == AUTHIDS[name]
    assert cap.pixels.dtype == np.uint8 and cap.pixels.shape[2] == 3
    a, b, c, d, e, f = cap.transform
    assert (b, d) == (0.0, 0.0) and a == pytest.approx(gt[1]) and e == pytest.approx(-gt[1])
    assert (c, f) == (pytest.approx(gt[0]), pytest.approx(gt[3]))
    assert cap.width == arr.shape[1]
    assert abs(cap.height - arr.shape[0]) <= 1 + abs(arr.shape[0] * (1 - abs(gt[5]) / gt[1]))
    if name == "world.rgb.tif":  # square pixels, no stretch: the rendering is the file
        np.testing.assert_array_equal(cap.pixels, arr)


def test_render_is_independent_of_screen_dpi(qgis_app, data_dir):
    layer = QgsRasterLayer(str(data_dir / "world.rgb.tif"), "w")
    ext = QgsRectangle(-90, -45, 90, 45)
    ms = C.map_settings([layer], ext, layer.crs(), 0.5)
    assert (ms.outputSize().width(), ms.outputSize().height()) == (360, 180)
    assert ms.outputDpi() == 96.0
    cap = C.render(ms)
    assert cap.transform == pytest.approx((0.5, 0, -90, 0, -0.5, 45))
    # a resolution that does not divide the extent: it grows to whole pixels from the top-left corner
    cap = C.render_extent([layer], QgsRectangle(-10, -10, 10.3, 10), layer.crs(), 1.0)
    assert (cap.width, cap.height) == (20, 20) and cap.transform == pytest.approx((1, 0, -10, 0, -1, 10))


def test_render_reprojected_utm_to_web_mercator(qgis_app, data_dir):
    """Render the UTM raster in EPSG:3857; source pixels land where an independent (OSR) reprojection says."""
    path = data_dir / "RGB.byte.tif"
    _, gt, arr = gdal_info(path)
    layer = QgsRasterLayer(str(path), "rgb")
    dest = QgsCoordinateReferenceSystem("EPSG:3857")
    ext = C.layer_extent_in(layer, dest)
    cap = C.render_extent([layer], ext, dest, 250.0)
    assert cap.crs_authid == "EPSG:3857"
    src, dst = osr.SpatialReference(), osr.SpatialReference()
    src.ImportFromEPSG(32618)
    dst.ImportFromEPSG(3857)
    for s in (src, dst):
        s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    tr = osr.CoordinateTransformation(src, dst)
    rng = np.random.default_rng(1)
    hits = tested = 0
    while tested < 60:
        row, col = int(rng.integers(50, arr.shape[0] - 50)), int(rng.integers(50, arr.shape[1] - 50))
        want = arr[row, col]
        if not want.any():
            continue  # nodata collar
        tested += 1
        x, y, _ = tr.TransformPoint(gt[0] + (col + 0.5) * gt[1], gt[3] + (row + 0.5) * gt[5])
        c, r = (int(math.floor(v)) for v in cap.map_to_pixel(x, y))
        window = cap.pixels[r - 1:r + 2, c - 1:c + 2].reshape(-1, 3).astype(int)
        hits += int(np.abs(window - want).sum(axis=1).min() <= 3)
    assert hits >= 0.9 * tested, f"{hits}/{tested} source pixels found where OSR puts them"


def test_layer_extent_in_geographic_crs(qgis_app, data_dir):
    layer = QgsRasterLayer(str(data_dir / "RGB.byte.tif"), "rgb")
    ext = C.layer_extent_in(layer, QgsCoordinateReferenceSystem("EPSG:4326"))
    assert -80 < ext.xMinimum() < ext.xMaximum() < -74 and 23 < ext.yMinimum() < ext.yMaximum() < 26
    cap = C.render_extent([layer], ext, QgsCoordinateReferenceSystem("EPSG:4326"), 0.005)
    assert cap.crs_authid == "EPSG:4326" and cap.transform[0] == pytest.approx(0.005)
    assert cap.pixels[cap.height // 2, cap.width // 2].any()  # the scene is drawn in the middle


def test_float_rasters_are_scaled_to_uint16(qgis_app, tmp_path):
    data = np.linspace(-5, 5, 64 * 64, dtype=np.float32).reshape(64, 64)
    path = write_geotiff(tmp_path / "f.tif", data, (10, 0, 0, 0, -10, 640),
                         QgsCoordinateReferenceSystem("EPSG:32633").toWkt())
    cap = C.read_bands(QgsRasterLayer(str(path), "f"))
    assert cap.pixels.dtype == np.uint16 and cap.pixels.shape == (64, 64, 1)
    assert cap.pixels[0, 0, 0] == 0 and cap.pixels[-1, -1, 0] == 65535
    assert np.all(np.diff(cap.pixels[:, :, 0].ravel().astype(int)) >= 0) and cap.notes


def test_too_large_captures_say_what_to_do(qgis_app):
    with pytest.raises(PluginError, match="resolution of at least"):
        C.output_size(1e6, 1e6, 1.0, max_side=8192)
    with pytest.raises(PluginError, match="positive"):
        C.output_size(10, 10, 0.0)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.01, 1000), st.floats(-0.3, 0.3), st.floats(-1e6, 1e6), st.floats(-0.3, 0.3),
       st.floats(-1000, -0.01), st.floats(-1e6, 1e6), st.floats(-1e4, 1e4), st.floats(-1e4, 1e4))
def test_pixel_map_round_trip(a, fb, c, fd, e, f, col, row):
    t = (a, fb * a, c, fd * abs(e), e, f)  # rotated/sheared but well conditioned
    x, y = C.pixel_to_map(t, col, row)
    c2, r2 = C.map_to_pixel(t, x, y)
    assert c2 == pytest.approx(col, abs=1e-5 * (1 + abs(col) + abs(row)))
    assert r2 == pytest.approx(row, abs=1e-5 * (1 + abs(col) + abs(row)))
