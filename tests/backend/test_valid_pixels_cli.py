"""The command line on rasters with nodata: it reads the raster's mask (nodata value, alpha) and no answer comes
from nodata: skipped tiles in --json, unranked images, NaN heatmaps with a NaN nodata value."""
import json
import math
import warnings

import numpy as np
import rasterio
from rasterio.transform import Affine

from backend.tasks.windows import selo_windows
from test_live_server import run_cli

NODATA = 65535


def _write_bordered(path, h=300, w=360, border=80, seed=0):
    """A 3-band uint16 GeoTIFF with nodata 65535 on an ``border``-px frame; returns its valid mask."""
    rng = np.random.default_rng(seed)
    data = rng.integers(400, 11000, (3, h, w)).astype(np.uint16)
    valid = np.zeros((h, w), bool)
    valid[border:h - border, border:w - border] = True
    data[:, ~valid] = NODATA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint16", nodata=NODATA,
                           transform=Affine(10, 0, 500000, 0, -10, 4000000), crs="EPSG:32618") as dst:
            dst.write(data)
    return valid


def _expected_skips(tiles, valid, tile):
    """Per --json grid tile: whether the smaller valid share of its cell and its window is below 0.5."""
    h, w = valid.shape
    out = []
    for t in tiles:
        x0, y0, x1, y1 = t["box"]
        wx, wy = max(0, min(x0, w - tile)), max(0, min(y0, h - tile))
        share = min(valid[y0:y1, x0:x1].mean(), valid[wy:wy + tile, wx:wx + tile].mean())
        out.append(bool(share < 0.5))
    return out


def _kept_coverage(valid, sizes, min_valid=0.5):
    """Pixels that some SeLo window with a valid share of at least ``min_valid`` covers."""
    covered = np.zeros(valid.shape, bool)
    for s in sizes:
        for x0, y0, x1, y1 in selo_windows(*valid.shape, s):
            if valid[y0:y1, x0:x1].mean() >= min_valid:
                covered[y0:y1, x0:x1] = True
    return covered


def _check_heatmap(path, valid, sizes, normalised_exactly=True):
    with rasterio.open(path) as ds:
        heat = ds.read(1)
        assert math.isnan(ds.nodata)
    expected_nan = ~valid | ~_kept_coverage(valid, sizes)
    np.testing.assert_array_equal(np.isnan(heat), expected_nan)
    if normalised_exactly:  # no smoothing: min-max over the valid pixels
        assert heat[~expected_nan].min() == 0 and heat[~expected_nan].max() == 1
    return heat


def test_cli_on_a_uint16_raster_with_a_wide_nodata_border(live_server, tmp_path):
    tif = tmp_path / "bordered.tif"
    valid = _write_bordered(tif)
    out = run_cli("classify", "--connect", live_server.address, "--class", "river", "--class", "forest",
                  "--grid", "64", "--json", str(tif))
    assert out.returncode == 0, out.stderr
    tiles = json.loads(out.stdout)["tiles"]
    expected = _expected_skips(tiles, valid, 64)
    assert [t["skipped"] for t in tiles] == expected and 0 < sum(expected) < len(expected)
    for t in tiles:
        x0, y0, x1, y1 = t["box"]
        if t["skipped"]:
            assert t["probs"] is None and t["top"] == []
        else:  # no tile labelled on nodata
            assert valid[y0:y1, x0:x1].mean() >= 0.5 and abs(sum(t["probs"].values()) - 1) < 1e-5
    none = run_cli("classify", "--connect", live_server.address, "--class", "river", "--class", "forest",
                   "--grid", "64", "--min-valid", "0", "--json", str(tif))
    assert none.returncode == 0 and not any(t["skipped"] for t in json.loads(none.stdout)["tiles"])

    heat = tmp_path / "heat.tif"
    loc = run_cli("localize", "--connect", live_server.address, "--query", "a river", "--window-sizes", "64", "128",
                  "--smooth", "0", "--json", "--out", str(heat), str(tif))
    assert loc.returncode == 0, loc.stderr
    _check_heatmap(heat, valid, [64, 128])
    assert not json.loads(loc.stdout)["warnings"][1:]  # the random-weights warning only: no 'single value'

    full = tmp_path / "full.tif"
    _write_bordered(full, border=0, seed=1)
    ranked = run_cli("rank", "--connect", live_server.address, "--text", "a river", "--json", str(tif), str(full))
    assert ranked.returncode == 0, ranked.stderr
    result = json.loads(ranked.stdout)
    assert result["skipped"] == [str(tif)]  # 26 % valid
    assert [m["file"] for m in result["by_text"][0]["top"]] == [str(full)]
    assert [e["top"] for e in result["by_file"] if e["file"] == str(tif)] == [[]]


def test_cli_on_rgb_byte_with_its_nodata_collar(live_server, tmp_path, data_dir):
    tif = data_dir / "RGB.byte.tif"
    with rasterio.open(tif) as ds:
        valid = (ds.read() != 0).all(axis=0)  # nodata (0) in any band: invalid (shared_protocol.nodata)
        assert ds.nodata == 0 and 0.2 < (~valid).mean() < 0.6  # a wide collar
    out = run_cli("classify", "--connect", live_server.address, "--class", "river", "--class", "forest",
                  "--grid", "128", "--json", str(tif))
    assert out.returncode == 0, out.stderr
    tiles = json.loads(out.stdout)["tiles"]
    expected = _expected_skips(tiles, valid, 128)
    assert [t["skipped"] for t in tiles] == expected and 0 < sum(expected) < len(expected)
    heat = tmp_path / "heat.tif"
    loc = run_cli("localize", "--connect", live_server.address, "--query", "a river", "--window-sizes", "128", "256",
                  "--smooth", "0", "--out", str(heat), str(tif))
    assert loc.returncode == 0, loc.stderr
    _check_heatmap(heat, valid, [128, 256])
    smooth = tmp_path / "smooth.tif"
    loc = run_cli("localize", "--connect", live_server.address, "--query", "a river", "--window-sizes", "128", "256",
                  "--smooth", "61", "--out", str(smooth), str(tif))
    assert loc.returncode == 0, loc.stderr
    smoothed = _check_heatmap(smooth, valid, [128, 256], normalised_exactly=False)
    assert 0 <= np.nanmin(smoothed) and np.nanmax(smoothed) <= 1


def test_cli_npy_heatmap_keeps_nan(live_server, tmp_path):
    tif = tmp_path / "bordered.tif"
    valid = _write_bordered(tif, h=200, w=220, border=50)
    out = tmp_path / "heat.npy"
    loc = run_cli("localize", "--connect", live_server.address, "--query", "a river", "--window-sizes", "64",
                  "--smooth", "0", "--out", str(out), str(tif))
    assert loc.returncode == 0, loc.stderr
    heat = np.load(out)
    np.testing.assert_array_equal(np.isnan(heat), ~valid | ~_kept_coverage(valid, [64]))
