"""``index build --engine ray``: the Ray Data build equals the in-process build (one Ray of 2 CPUs per session)."""
from __future__ import annotations

import numpy as np
import pytest

from backend.index.build import build_index
from backend.index.layout import IndexStore, WindowSettings
from index_helpers import CROP, SIZES, engine_from, tiny_checkpoint, write_raster

ray = pytest.importorskip("ray", reason="Ray is the optional extra 'scale' (pip install '.[scale]')")


@pytest.fixture(scope="session")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_build_equals_the_in_process_build(ray_session, tmp_path):
    from backend.index.ray_build import ray_build_index
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    rasters = [str(write_raster(tmp_path / "a.tif", seed=31)),
               str(write_raster(tmp_path / "b.tif", seed=32, dtype="uint16", blank_rows=0, nodata=None))]
    settings = WindowSettings(SIZES, CROP, 0.5)
    eng = engine_from(ckpt)
    model = {"model": "tiny", "checkpoint": str(ckpt), "device": "cpu", "precision": "fp32", "batch_size": 8}
    on_ray = ray_build_index(model, str(tmp_path / "ray"), rasters, settings)
    local = build_index(eng, tmp_path / "local", rasters, settings)
    assert on_ray["engine"] == "ray" and on_ray["rows"] == local["rows"] > 0
    assert [(r["windows"], r["skipped_nodata"]) for r in on_ray["rasters"]] == \
        [(r["windows"], r["skipped_nodata"]) for r in local["rasters"]]
    columns = ["id", "raster", "col", "row", "width", "height", "size", "wkt", "valid", "vector"]
    a = IndexStore.open(tmp_path / "ray").scan(None, columns).sort_by("id").to_pydict()
    b = IndexStore.open(tmp_path / "local").scan(None, columns).sort_by("id").to_pydict()
    for c in columns[:-1]:
        assert a[c] == b[c], c
    np.testing.assert_allclose(np.array(a["vector"]), np.array(b["vector"]), atol=1e-5)
    again = ray_build_index(model, str(tmp_path / "ray"), rasters)  # complete: nothing to do, no duplicates
    assert [r["status"] for r in again["rasters"]] == ["unchanged", "unchanged"] and again["rows"] == local["rows"]
