"""Bad rasters through the command line: a clear message or a correct result, never a crash or a misplaced layer."""
import json
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from test_live_server import run_cli


def _write(path, data, transform=None, crs=None, **kw):
    count = data.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=count,
                           dtype=data.dtype, transform=transform or Affine.identity(), crs=crs, **kw) as dst:
            dst.write(data)
    return path


def test_corrupt_geotiff_is_a_clear_error(live_server, tmp_path, data_dir):
    broken = tmp_path / "broken.tif"
    broken.write_bytes((data_dir / "RGB.byte.tif").read_bytes()[:5000])
    out = run_cli("classify", "--connect", live_server.address, "--class", "a", "--json", str(broken))
    assert out.returncode == 1 and "not a readable raster" in out.stderr and "Traceback" not in out.stderr
    loc = run_cli("localize", "--connect", live_server.address, "--query", "a", "--out", str(tmp_path / "h.tif"),
                  str(broken))
    assert loc.returncode == 1 and not (tmp_path / "h.tif").exists()


def test_all_nodata_raster_is_a_clear_error_and_a_blank_one_a_warning(live_server, tmp_path):
    nodata = _write(tmp_path / "nodata.tif", np.zeros((3, 300, 300), np.uint8),
                    Affine(10, 0, 500000, 0, -10, 4000000), "EPSG:32618", nodata=0)
    out = run_cli("localize", "--connect", live_server.address, "--query", "a river", "--window-sizes", "128",
                  "--smooth", "0", "--json", "--out", str(tmp_path / "h.tif"), str(nodata))
    assert out.returncode == 1 and "no window has enough valid pixels" in out.stderr, out.stderr
    assert not (tmp_path / "h.tif").exists()
    blank = _write(tmp_path / "blank.tif", np.full((3, 300, 300), 7, np.uint8),
                   Affine(10, 0, 500000, 0, -10, 4000000), "EPSG:32618")  # no nodata: valid, but one value
    out = run_cli("localize", "--connect", live_server.address, "--query", "a river", "--window-sizes", "128",
                  "--smooth", "0", "--json", "--out", str(tmp_path / "h.tif"), str(blank))
    assert out.returncode == 0, out.stderr
    assert any("single value" in w for w in json.loads(out.stdout)["warnings"])
    with rasterio.open(tmp_path / "h.tif") as ds:
        assert np.all(ds.read(1) == 0) and ds.crs.to_epsg() == 32618


def test_16_bit_raster_with_alpha(live_server, data_dir):
    path = data_dir / "RGBA.uint16.tif"
    with rasterio.open(path) as ds:
        share = float((ds.read(4) != 0).mean())
    assert 0.45 < share < 0.5  # its alpha band leaves less than half valid: skipped at the default 50 %
    out = run_cli("classify", "--connect", live_server.address, "--class", "a", "--class", "b", "--json", str(path))
    assert out.returncode == 0, out.stderr
    tile = json.loads(out.stdout)["tiles"][0]
    assert tile["skipped"] and tile["probs"] is None and tile["top"] == []
    out = run_cli("classify", "--connect", live_server.address, "--class", "a", "--class", "b", "--json",
                  "--min-valid", "0.45", str(path))
    assert out.returncode == 0, out.stderr
    tile = json.loads(out.stdout)["tiles"][0]
    assert not tile["skipped"] and abs(sum(tile["probs"].values()) - 1) < 1e-5


def test_raster_without_crs_keeps_its_grid_and_says_so(live_server, tmp_path):
    rng = np.random.default_rng(0)
    plain = _write(tmp_path / "nocrs.tif", rng.integers(0, 256, (3, 200, 240), dtype=np.uint8),
                   Affine(2, 0, 100, 0, -2, 900))
    out = run_cli("localize", "--connect", live_server.address, "--query", "a", "--window-sizes", "64",
                  "--smooth", "0", "--out", str(tmp_path / "h.tif"), str(plain))
    assert out.returncode == 0 and "has no CRS" in out.stderr
    with rasterio.open(tmp_path / "h.tif") as ds:
        assert ds.crs is None and ds.transform == Affine(2, 0, 100, 0, -2, 900) and ds.shape == (200, 240)


def test_rotated_geotransform_is_kept(live_server, tmp_path):
    rotated = Affine(10, 2, 500000, 3, -10, 4000000)
    src = _write(tmp_path / "rot.tif", np.random.default_rng(1).integers(0, 256, (3, 150, 170), dtype=np.uint8),
                 rotated, "EPSG:32618")
    out = run_cli("localize", "--connect", live_server.address, "--query", "a", "--window-sizes", "64",
                  "--smooth", "0", "--polygons", str(tmp_path / "r.geojson"), "--threshold", "0.8",
                  "--out", str(tmp_path / "h.tif"), str(src))
    assert out.returncode == 0, out.stderr
    with rasterio.open(tmp_path / "h.tif") as ds:
        assert ds.transform == rotated and ds.crs.to_epsg() == 32618
        heat = ds.read(1)
    regions = json.loads((tmp_path / "r.geojson").read_text())
    # every polygon vertex maps back inside the pixel grid through the inverse rotated affine
    inv = ~rotated
    for f in regions["features"]:
        for ring in f["geometry"]["coordinates"]:
            for x, y in ring:
                col, row = inv @ (x, y)
                assert -1e-6 <= col <= 170 + 1e-6 and -1e-6 <= row <= 150 + 1e-6
    assert regions["features"] and pytest.approx(sum(f["properties"]["area"] for f in regions["features"])) == \
        (heat >= 0.8).sum() * abs(rotated.determinant)
