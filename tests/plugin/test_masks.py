"""Valid-pixel masks of captures and band reads, checked against GDAL / numpy computed independently: nodata
(uint16 65535 with a wide border, float NaN), alpha and GDAL mask bands, the footprint of a rendered raster
(EPSG:4326, reprojected, rotated geotransform) and an area of interest (a polygon layer, or its selection)."""
from __future__ import annotations

import numpy as np
import pytest
from osgeo import gdal, ogr, osr
from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsGeometry, QgsRasterLayer, QgsRectangle,
                       QgsVectorLayer)

from qgis_plugin import capture as C
from qgis_plugin.masks import AreaOfInterest, valid_range
from qgis_plugin.sources import CaptureSource, RasterBlocks

NODATA = 65535
H, W, BORDER = 240, 300, 60


def _srs(epsg: int) -> str:
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    return srs.ExportToWkt()


def write_raster(path, bands: np.ndarray, gt, epsg=4326, nodata=None, gdal_type=gdal.GDT_UInt16, mask=None):
    ds = gdal.GetDriverByName("GTiff").Create(str(path), bands.shape[2], bands.shape[1], bands.shape[0], gdal_type)
    ds.SetGeoTransform(gt)
    ds.SetProjection(_srs(epsg))
    for i, band in enumerate(bands):
        b = ds.GetRasterBand(i + 1)
        b.WriteArray(band)
        if nodata is not None:
            b.SetNoDataValue(nodata)
    if mask is not None:
        ds.CreateMaskBand(gdal.GMF_PER_DATASET)
        ds.GetRasterBand(1).GetMaskBand().WriteArray(mask)
    ds = None
    return str(path)


@pytest.fixture
def nodata_raster(tmp_path):
    """uint16, 3 bands, nodata 65535 on a wide border (and a few holes), EPSG:4326."""
    rng = np.random.default_rng(3)
    bands = rng.integers(500, 10500, (3, H, W)).astype(np.uint16)
    bands[:, :BORDER], bands[:, -BORDER:], bands[:, :, :BORDER], bands[:, :, -BORDER:] = NODATA, NODATA, NODATA, NODATA
    bands[1, 120:130, 140:150] = NODATA  # nodata in one band only: the pixel is invalid
    return write_raster(tmp_path / "nodata.tif", bands, (10.0, 0.01, 0.0, 50.0, 0.0, -0.01), nodata=NODATA)


def gdal_valid(path: str) -> np.ndarray:
    """Valid pixels as GDAL sees them: every band's own mask (nodata, alpha, mask band) valid."""
    ds = gdal.Open(path)
    masks = [ds.GetRasterBand(i + 1).GetMaskBand().ReadAsArray() > 0 for i in range(ds.RasterCount)]
    return np.logical_and.reduce(masks)


def warped_valid(path: str, cap: C.Capture) -> np.ndarray:
    """GDAL's warp of the raster onto the capture's grid (nearest): valid where it lands data in every band (each
    band's nodata on its own; outside the footprint everything is nodata)."""
    src = gdal.Open(path)
    nodata = src.GetRasterBand(1).GetNoDataValue()
    opts = dict(format="MEM", dstSRS=cap.crs_wkt, outputBounds=cap.extent(), width=cap.width, height=cap.height,
                resampleAlg="near")
    if nodata is None:
        ds = gdal.Warp("", path, dstAlpha=True, **opts)
        return ds.GetRasterBand(ds.RasterCount).ReadAsArray() > 0
    ds = gdal.Warp("", path, dstNodata=nodata, warpOptions=["INIT_DEST=NO_DATA"], **opts)
    return (ds.ReadAsArray() != nodata).all(axis=0)


def test_band_read_mask_is_the_nodata_of_every_band(qgis_app, nodata_raster):
    cap = C.read_bands(QgsRasterLayer(nodata_raster, "n"))
    arr = gdal.Open(nodata_raster).ReadAsArray()
    expected = (arr != NODATA).all(axis=0)
    assert cap.mask.dtype == np.uint8 and cap.mask.shape == (H, W)
    assert np.array_equal(cap.valid(), expected)
    assert np.array_equal(cap.valid(), gdal_valid(nodata_raster) & (arr[1] != NODATA))
    assert not cap.valid()[125, 145]
    # nodata cells read as 0, every other value as stored
    assert np.array_equal(cap.pixels, np.where(np.moveaxis(arr, 0, 2) == NODATA, 0, np.moveaxis(arr, 0, 2)))


def test_uint16_stretch_comes_from_valid_pixels_only(qgis_app, nodata_raster):
    layer = QgsRasterLayer(nodata_raster, "n")
    arr = np.moveaxis(gdal.Open(nodata_raster).ReadAsArray(), 0, 2).astype(np.float64)
    ok = (arr != NODATA).all(axis=2)
    lo, hi = np.percentile(arr[ok], (2, 98))
    assert CaptureSource(C.read_bands(layer)).value_range() == pytest.approx([lo, hi])
    assert RasterBlocks(layer).value_range() == pytest.approx([lo, hi])
    naive = np.percentile(arr, (2, 98))  # with nodata counted: the upper end is the nodata value itself
    assert naive[1] == NODATA and hi < 10500


def test_alpha_band_and_gdal_mask_band(qgis_app, data_dir, tmp_path):
    rgba = str(data_dir / "RGBA.uint16.tif")
    cap = C.read_bands(QgsRasterLayer(rgba, "rgba"))
    ds = gdal.Open(rgba)
    alpha = ds.GetRasterBand(4).ReadAsArray()
    assert 0 < (alpha == 0).sum() < alpha.size
    assert np.array_equal(cap.valid(), alpha > 0)
    mask = np.full((50, 60), 255, np.uint8)
    mask[:, :17] = 0
    mask[40:, 30:] = 0
    path = write_raster(tmp_path / "masked.tif", np.full((3, 50, 60), 100, np.uint8), (0, 1, 0, 50, 0, -1), 32618,
                        gdal_type=gdal.GDT_Byte, mask=mask)
    cap = C.read_bands(QgsRasterLayer(path, "m"))
    assert np.array_equal(cap.valid(), gdal_valid(path)) and np.array_equal(cap.valid(), mask > 0)


def test_float_nodata_and_scaling_from_valid_pixels(qgis_app, tmp_path):
    rng = np.random.default_rng(1)
    bands = rng.normal(0.3, 0.05, (3, 40, 50)).astype(np.float32)
    bands[:, :10] = -9999.0
    bands[0, 20, 20] = np.nan
    path = write_raster(tmp_path / "f.tif", bands, (0, 1, 0, 40, 0, -1), 32618, nodata=-9999.0,
                        gdal_type=gdal.GDT_Float32)
    cap = C.read_bands(QgsRasterLayer(path, "f"))
    expected = (bands != -9999.0).all(axis=0) & np.isfinite(bands).all(axis=0)
    assert np.array_equal(cap.valid(), expected)
    vals = np.moveaxis(bands, 0, 2)[expected].astype(np.float64)
    lo, hi = np.percentile(vals, (2, 98))
    assert cap.notes and f"[{lo:.6g}, {hi:.6g}]" in cap.notes[0]  # scaled from valid pixels, not -9999
    assert cap.pixels.dtype == np.uint16 and (cap.pixels[~expected] == 0).all()


@pytest.mark.parametrize("dest", ["EPSG:4326", "EPSG:3857"])
def test_rendered_capture_mask_is_the_footprint_and_nodata(qgis_app, nodata_raster, dest):
    """A view larger than the raster: outside its footprint and on its nodata nothing is valid."""
    layer = QgsRasterLayer(nodata_raster, "n")
    crs = QgsCoordinateReferenceSystem(dest)
    ext = C.layer_extent_in(layer, crs)
    ext.scale(1.5)
    res = ext.width() / 400
    cap = C.render_extent([layer], ext, crs, res)
    expected = warped_valid(nodata_raster, cap)
    assert 0.05 < expected.mean() < 0.5
    wrong = cap.valid() != expected
    assert wrong.mean() < 0.01, wrong.mean()
    near_edge = np.zeros_like(expected)  # within 2 px of a valid/invalid boundary (resampling differs there)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near_edge |= expected != np.roll(np.roll(expected, dy, 0), dx, 1)
    assert not (wrong & ~near_edge).any()


def test_rendered_capture_of_a_rotated_raster(qgis_app, tmp_path):
    bands = np.full((3, 100, 120), 180, np.uint8)
    gt = (500000.0, 25.0, 10.0, 4200000.0, 8.0, -25.0)  # rotated and sheared: a tilted footprint
    path = write_raster(tmp_path / "rot.tif", bands, gt, 32618, gdal_type=gdal.GDT_Byte)
    layer = QgsRasterLayer(path, "rot")
    crs = layer.crs()
    cap = C.render_extent([layer], layer.extent(), crs, 20.0)
    expected = warped_valid(path, cap)
    assert 0.3 < expected.mean() < 0.95  # the tilted footprint leaves corners empty
    assert (cap.valid() != expected).mean() < 0.02
    raw = C.read_bands(layer)  # raw bands (through QGIS's warped VRT): the same footprint
    assert (raw.valid() != warped_valid(path, raw)).mean() < 0.02 and (raw.pixels[~raw.valid()] == 0).all()


def _polygons_layer(crs: str, rings):
    layer = QgsVectorLayer(f"Polygon?crs={crs}", "aoi", "memory")
    feats = []
    for ring in rings:
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromWkt(ring))
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    layer.updateExtents()
    return layer


def test_area_of_interest_reprojected_and_selected(qgis_app, nodata_raster):
    layer = QgsRasterLayer(nodata_raster, "n")
    # two polygons in EPSG:3857 over the raster (which is in EPSG:4326)
    tri = "POLYGON((1191119 6156910, 1313570 6156910, 1224514 6325919, 1191119 6156910))"
    box = "POLYGON((1335834 6274861, 1402626 6274861, 1402626 6377289, 1335834 6377289, 1335834 6274861))"
    aoi_layer = _polygons_layer("EPSG:3857", [tri, box])
    cap = C.read_bands(layer)
    nodata = cap.valid()

    def inside(wkts):
        """Pixel centres (EPSG:4326) inside any polygon (EPSG:3857), by OGR with OSR, cell by cell."""
        src, dst = osr.SpatialReference(), osr.SpatialReference()
        src.ImportFromEPSG(4326)
        dst.ImportFromEPSG(3857)
        for s in (src, dst):
            s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        to3857 = osr.CoordinateTransformation(src, dst)
        polys = [ogr.CreateGeometryFromWkt(w) for w in wkts]
        out = np.zeros((cap.height, cap.width), bool)
        for r in range(cap.height):
            for c in range(cap.width):
                x, y = cap.pixel_to_map(c + 0.5, r + 0.5)
                px, py, _ = to3857.TransformPoint(x, y)
                pt = ogr.CreateGeometryFromWkt(f"POINT({px} {py})")
                out[r, c] = any(p.Contains(pt) for p in polys)
        return out

    whole = AreaOfInterest.of_layer(aoi_layer)
    expected = inside([tri, box])
    assert 0.02 < expected.mean() < 0.5
    got = C.read_bands(layer).restrict(whole).valid()
    # edges are densified before reprojection: a few boundary pixels may differ
    assert (got != (expected & nodata)).sum() <= 0.01 * expected.sum()
    assert not (got & ~nodata).any()  # the AOI never makes nodata valid
    first = next(aoi_layer.getFeatures()).id()
    aoi_layer.selectByIds([first])
    sel = C.read_bands(layer).restrict(AreaOfInterest.of_layer(aoi_layer, selected_only=True)).valid()
    expected_sel = inside([tri]) & nodata
    assert (sel != expected_sel).sum() <= 0.01 * expected_sel.sum() and sel.sum() < got.sum()
    aoi_layer.removeSelection()
    with pytest.raises(Exception, match="no feature"):
        AreaOfInterest.of_layer(aoi_layer, selected_only=True)


def test_raster_blocks_carry_nodata_and_aoi(qgis_app, nodata_raster):
    layer = QgsRasterLayer(nodata_raster, "n")
    aoi = AreaOfInterest.of_layer(_polygons_layer("EPSG:4326", [
        "POLYGON((10.5 49.2, 12.5 49.2, 12.5 48.0, 10.5 48.0, 10.5 49.2))"]))
    src = RasterBlocks(layer, aoi=aoi)
    whole = np.zeros((H, W), bool)
    for blk in src.blocks(128):
        r0, r1, c0, c1 = blk.inner
        gr, gc = blk.origin
        whole[gr:gr + r1 - r0, gc:gc + c1 - c0] = blk.capture.valid()[r0:r1, c0:c1]
    arr = gdal.Open(nodata_raster).ReadAsArray()
    rows, cols = np.mgrid[0:H, 0:W]
    x, y = 10.0 + (cols + 0.5) * 0.01, 50.0 - (rows + 0.5) * 0.01
    expected = (arr != NODATA).all(axis=0) & (x > 10.5) & (x < 12.5) & (y > 48.0) & (y < 49.2)
    assert np.array_equal(whole, expected)


def test_valid_range_ignores_invalid_pixels():
    px = np.zeros((10, 10, 3), np.uint16)
    px[:5] = 1000
    px[5:] = 60000
    mask = np.zeros((10, 10), np.uint8)
    mask[:5] = 1
    assert valid_range(px, mask) == [1000.0, 1001.0]  # flat valid part: a range of one
    assert valid_range(px[..., :3].astype(np.uint8), None) is None
    assert valid_range(px, np.zeros((10, 10), np.uint8)) is None


def test_rendered_capture_over_no_raster_is_all_invalid(qgis_app, nodata_raster):
    layer = QgsRasterLayer(nodata_raster, "n")
    cap = C.render_extent([layer], QgsRectangle(100, 0, 110, 10), layer.crs(), 0.1)
    assert cap.mask is not None and not cap.valid().any()
