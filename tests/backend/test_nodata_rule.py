"""The multi-band valid-pixel rule (``shared_protocol.nodata``, QGIS's): every reader of rasters in the backend
(the CLI's ``read_image``, ``adapt``'s chips and ``unsure``'s raster, the index's statistics and windows) counts a
pixel valid iff every band read is valid in its own mask and the alpha is > 0, checked against the band arrays.
The plugin's side is compared with this one in tests/plugin/test_nodata_rule.py."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rasterio.windows import Window

from backend.adapt.examples import read_chip
from backend.commands.adapt import read_raster
from backend.files import raster_valid, read_image
from backend.index.rasters import open_raster, read_windows

H, W = 96, 128


def write(path, bands: np.ndarray, nodata=None, alpha: bool = False) -> str:
    profile = dict(driver="GTiff", width=W, height=H, count=len(bands), dtype=bands.dtype, crs="EPSG:32618",
                   transform=from_origin(500000, 4200000, 10, 10), nodata=nodata)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(bands)
        if alpha:
            ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    return str(path)


def one_band_nodata(tmp_path):
    """RGB uint8, nodata 0; only the green band is 0 in a block (and red alone in a few pixels)."""
    rng = np.random.default_rng(3)
    bands = rng.integers(1, 256, (3, H, W)).astype(np.uint8)
    bands[1, 10:40, 20:70] = 0
    bands[0, 60:62, 100:110] = 0
    bands[:, 80:, :16] = 0  # all three: nodata for GDAL's dataset mask too
    path = write(tmp_path / "one_band.tif", bands, nodata=0)
    return path, (bands != 0).all(axis=0)


def alpha_uint16(tmp_path):
    """RGB uint16 with a 0-255 alpha band (the case GDAL's 8-bit mask scaling gets wrong)."""
    rng = np.random.default_rng(4)
    bands = rng.integers(0, 4000, (4, H, W)).astype(np.uint16)
    bands[3] = 255
    bands[3, :, :30] = 0
    bands[3, 50:, 90:] = 1
    bands[0, 5:9, 40:60] = 0  # 0 in a colour band is a value here (no nodata)
    return write(tmp_path / "alpha.tif", bands, alpha=True), bands[3] > 0


@pytest.fixture(params=["one_band_nodata", "alpha_uint16", "rgb_byte"])
def raster(request, tmp_path, data_dir):
    if request.param == "rgb_byte":
        path = str(data_dir / "RGB.byte.tif")
        with rasterio.open(path) as ds:
            assert ds.nodatavals == (0.0, 0.0, 0.0)
            bands = ds.read()
        expected = (bands != 0).all(axis=0)
        with rasterio.open(path) as ds:
            assert (expected != (ds.dataset_mask() > 0)).sum() == 710  # what GDAL's dataset mask says instead
        return path, expected
    return globals()[request.param](tmp_path)


def test_every_backend_reader_applies_the_rule(raster):
    path, expected = raster
    assert 0 < expected.mean() < 1
    img = read_image(path)
    assert np.array_equal(img.mask != 0, expected)
    _, mask, _, _ = read_raster(path, None)  # `unsure`'s raster at its native resolution
    assert np.array_equal(mask != 0, expected)
    info = open_raster(path, with_hash=False)  # statistics from a full-resolution read (small rasters)
    assert info.valid_share == pytest.approx(expected.mean())
    size = 32
    boxes = np.array([(x, y, x + size, y + size) for y in range(0, expected.shape[0] - size + 1, size)
                      for x in range(0, expected.shape[1] - size + 1, size)], np.int64)
    skipped = []
    shares = {}
    for batch in read_windows(info, boxes, None, 4, 0.0, skipped):
        shares.update(zip(batch.index.tolist(), batch.valid.tolist(), strict=True))
    want = {i: expected[y0:y1, x0:x1].mean() for i, (x0, y0, x1, y1) in enumerate(boxes)}
    assert shares.keys() | set(skipped) == want.keys()
    for i, share in shares.items():
        assert share == pytest.approx(want[i], abs=1e-6)
    with rasterio.open(path) as ds:  # an adapt chip at the native resolution: its valid share
        x0, y0 = 16, 8
        centre = ds.xy(y0 + size / 2, x0 + size / 2, offset="ul")
        _, share = read_chip(ds, centre, size, size)
        assert share == pytest.approx(expected[y0:y0 + size, x0:x0 + size].mean())
        # a window over the edge (boundless): outside the raster is invalid
        edge = raster_valid(ds, [1, 2, 3], window=Window(-8, -8, 24, 24), boundless=True)
        assert not edge[:8].any() and not edge[:, :8].any()
        assert np.array_equal(edge[8:, 8:], expected[:16, :16])


def test_float_bands_nan_is_invalid_in_any_band(tmp_path):
    bands = np.random.default_rng(5).normal(0.3, 0.05, (3, H, W)).astype(np.float32)
    bands[2, 3:7, 3:9] = np.nan
    bands[0, 20:30, 40:50] = -9999.0
    path = write(tmp_path / "f.tif", bands, nodata=-9999.0)
    expected = np.isfinite(bands).all(axis=0) & (bands != -9999.0).all(axis=0)
    assert np.array_equal(read_image(path).mask != 0, expected)


def test_read_image_sends_three_channels_and_counts_an_alpha_band_in_the_mask(tmp_path):
    """A 4th band is never a 4th channel (the server reads a 4th channel as alpha): a NIR band with zeros
    leaves every pixel valid; an alpha band's zeros are the mask's invalid pixels."""
    rng = np.random.default_rng(3)
    rgbn = rng.integers(1, 255, (4, H, W), dtype=np.uint8)
    rgbn[3, :5] = 0  # NIR zeros: data, not transparency
    path = write(tmp_path / "rgbn.tif", rgbn)
    with rasterio.open(path, "r+") as ds:  # GDAL calls a 4th uint8 band alpha unless told otherwise
        ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined]
    nir = read_image(path)
    assert nir.pixels.shape == (H, W, 3) and nir.mask is None
    np.testing.assert_array_equal(nir.pixels, rgbn[:3].transpose(1, 2, 0))
    rgba = rgbn.copy()
    rgba[3] = 255
    rgba[3, :, :7] = 0
    img = read_image(write(tmp_path / "rgba.tif", rgba, alpha=True))
    assert img.pixels.shape == (H, W, 3)
    np.testing.assert_array_equal(img.mask != 0, rgba[3] > 0)
