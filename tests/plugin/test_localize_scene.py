"""Whole-scene localize: the blocked map equals the backend's fast mode on the whole raster as one canvas, each
SeLo window is encoded once, reads stay within a block and its windows' reach, the output is written in strips."""
import numpy as np
import pytest
from osgeo import gdal
from qgis.core import QgsRasterLayer

from qgis_plugin import capture as C
from qgis_plugin.errors import PluginError
from qgis_plugin.sources import RasterBlocks
from qgis_plugin.tools.base import Common, Feedback
from qgis_plugin.tools.localize import LocalizeParams, LocalizeProcessor
from shared_protocol import Reply
from shared_protocol.client import Client
from shared_protocol.selo import selo_windows

H, W = 430, 520
SIZES = [48, 96, 144]


@pytest.fixture
def raster(tmp_path):
    """An RGB raster with a nodata (0) border on three sides, of uneven width, and a nodata hole (UTM)."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:H, 0:W]
    bands = np.stack([(120 + 100 * np.sin(xx / (17 + 9 * b)) * np.cos(yy / 23)).astype(np.uint8) for b in range(3)])
    bands = np.clip(bands.astype(int) + rng.integers(-20, 20, bands.shape), 1, 255).astype(np.uint8)
    bands[:, :13], bands[:, :, :29], bands[:, :, -7:] = 0, 0, 0  # the bottom edge stays valid
    bands[:, 200:260, 300:390] = 0
    path = tmp_path / "scene.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(path), W, H, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 4200000.0, 0.0, -10.0))
    ds.SetProjection(_utm_wkt())
    for i, b in enumerate(bands):
        ds.GetRasterBand(i + 1).WriteArray(b)
        ds.GetRasterBand(i + 1).SetNoDataValue(0)
    ds = None
    return str(path), (bands != 0).all(axis=0)


def _utm_wkt() -> str:
    from qgis.core import QgsCoordinateReferenceSystem
    return QgsCoordinateReferenceSystem("EPSG:32618").toWkt()


def kept_windows(valid, sizes, min_valid=0.5):
    boxes = np.concatenate([selo_windows(H, W, s) for s in sizes])
    return boxes[[valid[y0:y1, x0:x1].mean() >= min_valid for x0, y0, x1, y1 in boxes]]


@pytest.mark.parametrize("smooth", [0, 9, 61])
def test_blocked_map_equals_the_backends_whole_canvas(qgis_app, live_backend, raster, tmp_path, smooth):
    path, valid = raster
    layer = QgsRasterLayer(path, "scene")
    source = RasterBlocks(layer)
    queries = ["a river", "dense forest"]
    proc = LocalizeProcessor(source, LocalizeParams(queries, SIZES, smooth, block_px=160), Common(tmp_path))
    with Client(live_backend.address, timeout=120) as client:
        res = proc.compute(client, Feedback())
        out = [tmp_path / f"h{q}.tif" for q in range(len(queries))]
        res.write(out)
        whole = C.read_bands(layer)  # independently: the whole raster as one canvas, the backend's fast mode
        assert np.array_equal(whole.valid(), valid)
        ref = client.localize(whole.pixels, queries, window_sizes=SIZES, smooth=smooth, normalize=True,
                              canvas_mask=whole.mask, min_valid=0.5, value_range=source.value_range())
    expected = ref.arrays["heatmaps"]
    kept = kept_windows(valid, SIZES)
    # every window encoded once: the blocks' replies count the whole raster's kept SeLo windows, no more
    assert res.windows == res.sent_windows == len(kept) == ref.result["windows"]
    assert res.total_windows == sum(len(selo_windows(H, W, s)) for s in SIZES) > len(kept)
    for q in range(len(queries)):
        got = gdal.Open(str(out[q])).ReadAsArray()
        assert got.shape == (H, W)
        assert np.array_equal(np.isnan(got), np.isnan(expected[q]))
        assert np.isnan(got[~valid]).all() and np.isfinite(got[valid]).mean() > 0.95
        np.testing.assert_allclose(got, expected[q], atol=2e-5, equal_nan=True)
        assert np.nanmin(got) >= 0 and np.nanmax(got) <= 1
        assert res.stats[q]["min"] == pytest.approx(ref.result["queries"][q]["score_min"], abs=1e-6)
        assert res.stats[q]["max"] == pytest.approx(ref.result["queries"][q]["score_max"], abs=1e-6)


class CountingClient:
    """A client that answers localize with scores made from each window's place in the raster and records the
    windows it was asked to encode (in raster coordinates: the block's origin comes from the read)."""

    address = "counting"

    def __init__(self, origins):
        self.origins, self.encoded = origins, []

    def localize(self, canvas, queries, windows=None, canvas_mask=None, **kw):
        r0, c0 = self.origins[-1]
        boxes = windows.astype(np.int64) + [c0, r0, c0, r0]
        self.encoded.extend(map(tuple, boxes))
        scores = np.stack([np.sin(boxes[:, 0] * 0.01 + q) + np.cos(boxes[:, 1] * 0.013) + boxes[:, 2] * 1e-3
                           for q in range(len(queries))]).astype(np.float32)
        return Reply.ok("x", "localize", {"windows": len(boxes)}, {"scores": scores})


def test_each_window_is_encoded_once_and_reads_stay_within_a_block(qgis_app, raster, tmp_path, monkeypatch):
    path, valid = raster
    source = RasterBlocks(QgsRasterLayer(path, "scene"))
    origins, reads = [], []
    read = source.read

    def spy(r0, r1, c0, c1):
        origins.append((r0, c0))
        reads.append((r1 - r0, c1 - c0))
        return read(r0, r1, c0, c1)
    monkeypatch.setattr(source, "read", spy)
    client = CountingClient(origins)
    res = LocalizeProcessor(source, LocalizeParams(["q"], SIZES, 61, block_px=150), Common(tmp_path)).compute(
        client, Feedback())
    kept = kept_windows(valid, SIZES)
    assert len(client.encoded) == len(set(client.encoded)) == len(kept)  # no window twice
    assert set(client.encoded) == set(map(tuple, kept))
    assert len(reads) == 3 * 4  # each block read once
    assert all(h <= 150 + max(SIZES) and w <= 150 + max(SIZES) for h, w in reads)
    blocks = list(res.blocks())  # the map is made and written a block at a time
    assert [(r, c) for r, c, _ in blocks] == [(r, c) for r in (0, 150, 300) for c in (0, 150, 300, 450)]
    assert all(m.shape[1:] == (min(150, H - r), min(150, W - c)) for r, c, m in blocks)


def test_a_block_smaller_than_the_largest_window_is_raised_to_it(qgis_app, raster, tmp_path):
    path, _ = raster
    source = RasterBlocks(QgsRasterLayer(path, "scene"))
    proc = LocalizeProcessor(source, LocalizeParams(["q"], SIZES, 0, block_px=100), Common(tmp_path))
    assert proc.block_px == max(SIZES) and "smaller than the largest window" in proc.notes[0]
    origins = []
    source.read, read = (lambda *a: origins.append((a[0], a[2])) or read(*a)), source.read
    res = proc.compute(CountingClient(origins), Feedback())
    assert res.warnings[0] == proc.notes[0]
    with pytest.raises(PluginError, match="block size"):
        LocalizeParams(["q"], block_px=0)


def test_a_backend_without_explicit_windows_gets_a_plain_error(qgis_app, raster, tmp_path):
    from shared_protocol import ErrorCode, ProtocolError
    path, _ = raster

    class OldClient:
        address = "old"

        def localize(self, *a, **kw):
            raise ProtocolError(ErrorCode.BAD_ARRAY, "localize: unexpected array(s) windows", unknown=["windows"])
    proc = LocalizeProcessor(RasterBlocks(QgsRasterLayer(path, "scene")), LocalizeParams(["q"], SIZES, 0),
                             Common(tmp_path))
    with pytest.raises(PluginError, match="predates whole-scene localize"):
        proc.compute(OldClient(), Feedback())


def test_the_heatmap_is_complete_or_absent(qgis_app, tmp_path):
    """A failure while the blocks are written leaves neither the GeoTIFF nor its temp file."""
    from qgis_plugin.outputs import GeotiffWriter
    path, transform = tmp_path / "h.tif", (10.0, 0.0, 0.0, 0.0, -10.0, 0.0)
    with pytest.raises(RuntimeError):
        with GeotiffWriter(path, 300, 200, 1, transform, _utm_wkt(), nodata=float("nan")) as out:
            out.write(0, np.zeros((100, 300), np.float32))
            raise RuntimeError("cancelled half-way")
    assert list(tmp_path.iterdir()) == []
    with GeotiffWriter(path, 300, 200, 1, transform, _utm_wkt()) as out:
        out.write(0, np.ones((200, 150), np.float32))
        out.write(0, np.full((200, 150), 2, np.float32), 150)
        out.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["h.tif"]
    arr = gdal.Open(str(path)).ReadAsArray()
    assert (arr[:, :150] == 1).all() and (arr[:, 150:] == 2).all()
