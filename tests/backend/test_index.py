"""The index (backend/index): built windows equal an independent encoding, searches equal brute force, score
surfaces equal localize's per-pixel mean, incremental builds, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from shared_protocol import ErrorCode, ProtocolError
from backend.index.build import build_index
from backend.index.layout import MANIFEST, IndexStore, WindowSettings
from backend.index.query import Query, query_vector, score_surface, search
from backend.tasks.windows import mean_over_windows
from index_helpers import CROP, SIZES, engine_from, expected_windows, tiny_checkpoint, write_raster

SETTINGS = WindowSettings(SIZES, CROP, 0.5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def eng(ckpt):
    return engine_from(ckpt)


@pytest.fixture(scope="module")
def built(tmp_path_factory, eng):
    """One index over two rasters (UTM and Web Mercator), built once for the module."""
    d = tmp_path_factory.mktemp("idx")
    a = write_raster(d / "a.tif", seed=1)
    b = write_raster(d / "b.tif", seed=2, crs="EPSG:3857", transform=Affine(20, 0, -8.7e6, 0, -20, 4.9e6),
                     blank_rows=0, height=100, width=120)
    report = build_index(eng, d / "index", [str(a), str(b)], SETTINGS)
    return d, report, {str(a): expected_windows(eng, a), str(b): expected_windows(eng, b)}


def _stored(store: IndexStore, where=None):
    t = store.scan(where, ["raster", "size", "col", "row", "width", "height", "vector", "id"])
    return {(r["raster"], r["size"], r["col"], r["row"], r["width"], r["height"]): np.array(r["vector"])
            for r in t.to_pylist()}, t["id"].to_pylist()


def test_windows_equal_an_independent_encoding(built):
    d, report, expected = built
    store = IndexStore.open(d / "index")
    stored, ids = _stored(store)
    want = {(path,) + k: v for path, e in expected.items() for k, v in e.items()}
    assert set(stored) == set(want)  # the same windows, nodata ones left out
    assert len(ids) == len(set(ids))
    for k, v in want.items():
        np.testing.assert_allclose(stored[k], v, atol=2e-5)
    a = next(r for r in report["rasters"] if r["raster"].endswith("a.tif"))
    assert a["skipped_nodata"] > 0 and a["windows"] == len(expected[a["raster"]])


def test_text_search_equals_brute_force(built, eng):
    d, _, expected = built
    store = IndexStore.open(d / "index")
    q = query_vector(eng, store, Query(texts=["a river"]))
    text = eng.encode_texts(["a river"]).numpy()[0]
    np.testing.assert_allclose(q.vector, text / np.linalg.norm(text), atol=1e-6)
    keys = [(p,) + k for p, e in expected.items() for k in e]
    vecs = np.stack([expected[k[0]][k[1:]] for k in keys])
    exact = vecs @ text
    order = np.argsort(-exact)[:10]
    rows = search(store, q.vector, 10)
    assert [(r["raster"], r["size"], *r["window"]) for r in rows] == [keys[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in rows], exact[order], atol=1e-5)
    assert all(r["footprint"]["wkt"].startswith("POLYGON") and len(r["footprint"]["bounds"]) == 4 for r in rows)


def test_extent_filter_keeps_only_windows_in_the_extent(built, eng):
    d, _, _ = built
    store = IndexStore.open(d / "index")
    q = query_vector(eng, store, Query(texts=["a farm"]))
    from backend.index.query import extent_where
    where = extent_where([500000, 4200000 - 150 * 30, 500000 + 190 * 30, 4200000], "EPSG:32618")
    rows = search(store, q.vector, 1000, where)
    assert rows and {r["raster"] for r in rows} == {str(d / "a.tif")}


def test_examples_minus_negatives_equal_an_independent_weighted_mean(built, eng):
    d, _, expected = built
    store = IndexStore.open(d / "index")
    a = str(d / "a.tif")
    t = Affine(30, 0, 500000, 0, -30, 4200000)

    def poly(c0, r0, c1, r1):
        ring = [t * (c0, r0), t * (c1, r0), t * (c1, r1), t * (c0, r1), t * (c0, r0)]
        return {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}

    pos, neg = (60, 70, 100, 110), (120, 100, 150, 140)

    def weighted(box):
        c0, r0, c1, r1 = box
        total, wsum = 0, 0.0
        for (_s, x, y, w, h), v in expected[a].items():
            share = max(0, min(x + w, c1) - max(x, c0)) * max(0, min(y + h, r1) - max(y, r0)) / (w * h)
            total, wsum = total + share * v, wsum + share
        m = total / wsum
        return m / np.linalg.norm(m)

    want = weighted(pos) - weighted(neg)
    want /= np.linalg.norm(want)
    q = query_vector(eng, store, Query(examples=[poly(*pos)], negatives=[poly(*neg)], crs="EPSG:32618"))
    np.testing.assert_allclose(q.vector, want, atol=1e-5)
    assert q.example_ids and q.parts["negative_windows"] > 0
    rows = search(store, q.vector, 5, exclude=q.example_ids)
    assert not {r["id"] for r in rows} & set(q.example_ids)


def test_score_surface_equals_localize_per_pixel_mean(built, eng):
    d, _, expected = built
    store = IndexStore.open(d / "index")
    a = str(d / "a.tif")
    q = query_vector(eng, store, Query(texts=["houses"])).vector
    raster = next(r for r in store.raster_rows() if r["raster"] == a)
    surf = score_surface(store, q, raster)
    keys = list(expected[a])
    boxes = np.array([[x, y, x + w, y + h] for _, x, y, w, h in keys])
    scores = np.stack([expected[a][k] for k in keys]) @ q
    want = mean_over_windows(boxes, scores[:, None], 150, 190)[0]
    covered = mean_over_windows(boxes, np.ones((len(boxes), 1)), 150, 190)[0] > 0
    assert surf.step == 1 and surf.scores.shape == (150, 190)
    assert np.array_equal(np.isnan(surf.scores), ~covered)
    np.testing.assert_allclose(surf.scores[covered], want[covered], atol=1e-5)
    coarse = score_surface(store, q, raster, max_size=64)
    assert coarse.step == 3 and coarse.scores.shape == (50, 64)
    assert coarse.transform[0] == 90.0
    from backend.index.query import surface_geotiff
    from rasterio.io import MemoryFile
    with MemoryFile(surface_geotiff(surf)) as mem, mem.open() as ds:
        assert ds.crs.to_epsg() == 32618 and ds.transform == Affine(30, 0, 500000, 0, -30, 4200000)
        np.testing.assert_array_equal(np.isnan(ds.read(1)), ~covered)


def test_rerun_skips_and_a_changed_file_replaces_its_rows(tmp_path, eng):
    a = write_raster(tmp_path / "a.tif", seed=3)
    b = write_raster(tmp_path / "b.tif", seed=4)
    first = build_index(eng, tmp_path / "i", [str(a), str(b)], SETTINGS)
    again = build_index(eng, tmp_path / "i", [str(a), str(b)])
    assert [r["status"] for r in again["rasters"]] == ["unchanged", "unchanged"] and again["rows"] == first["rows"]
    os.utime(a, ns=(1, 1))  # touched, same bytes: the hash says unchanged
    assert build_index(eng, tmp_path / "i", [str(a)], create=False)["rasters"][0]["status"] == "unchanged"
    write_raster(a, seed=5, blank_rows=0)  # new content
    rep = build_index(eng, tmp_path / "i", [str(a)], create=False)
    assert rep["rasters"][0]["status"] == "replaced"
    store = IndexStore.open(tmp_path / "i")
    stored, ids = _stored(store, f"raster = '{a}'")
    want = expected_windows(eng, a)
    assert set(stored) == {(str(a),) + k for k in want} and len(ids) == len(set(ids))
    for k, v in want.items():
        np.testing.assert_allclose(stored[(str(a),) + k], v, atol=2e-5)
    assert len(_stored(store, f"raster = '{b}'")[1]) == first["rasters"][1]["windows"]  # b untouched


def test_cancel_commits_what_was_encoded_and_a_rerun_resumes(tmp_path, eng):
    a = write_raster(tmp_path / "a.tif", seed=6, blank_rows=0)
    calls = []

    def cancel_later(fraction, message):
        calls.append(fraction)
        if len(calls) == 4:
            raise ProtocolError(ErrorCode.CANCELLED, "cancelled")

    with pytest.raises(ProtocolError) as err:
        build_index(eng, tmp_path / "i", [str(a)], SETTINGS, progress=cancel_later, commit_rows=8)
    assert err.value.code == ErrorCode.CANCELLED
    partial = IndexStore.open(tmp_path / "i").row_count()
    rep = build_index(eng, tmp_path / "i", [str(a)])
    assert 0 < partial < rep["rows"] and rep["rasters"][0]["status"] == "resumed"
    stored, ids = _stored(IndexStore.open(tmp_path / "i"))
    assert len(ids) == len(set(ids)) and set(stored) == {(str(a),) + k for k in expected_windows(eng, a)}


# -- bad input -------------------------------------------------------------------------------------------
def _reason(exc_info):
    return exc_info.value.details.get("reason")


def test_bad_rasters_are_refused_and_nothing_indexed_is_lost(tmp_path, eng):
    good = write_raster(tmp_path / "good.tif", seed=7)
    build_index(eng, tmp_path / "i", [str(good)], SETTINGS)
    before = IndexStore.open(tmp_path / "i").row_count()
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + os.urandom(2000))
    nocrs = write_raster(tmp_path / "nocrs.tif", crs=None)
    for path, reason in ((corrupt, "raster_unreadable"), (nocrs, "raster_no_crs"),
                         (tmp_path / "missing.tif", "raster_unreadable")):
        with pytest.raises(ProtocolError) as err:
            build_index(eng, tmp_path / "i", [str(good), str(path)])
        assert _reason(err) == reason, path
        assert IndexStore.open(tmp_path / "i").row_count() == before
    with pytest.raises(ProtocolError):
        build_index(eng, tmp_path / "new", [str(nocrs)], SETTINGS)
    assert not (tmp_path / "new").exists()  # a refused build creates nothing


def test_awkward_rasters_index_with_warnings(tmp_path, eng):
    from rasterio.enums import ColorInterp
    grey = write_raster(tmp_path / "grey.tif", count=1, seed=8)
    deep = write_raster(tmp_path / "deep.tif", dtype="uint16", seed=9, blank_rows=0, nodata=None)
    five = write_raster(tmp_path / "five.tif", count=5, seed=10, blank_rows=0)
    empty = write_raster(tmp_path / "empty.tif", seed=11, blank_rows=150)
    rotated = write_raster(tmp_path / "rot.tif", seed=12, blank_rows=0,
                           transform=Affine(30, 0, 500000, 0, -30, 4200000) @ Affine.rotation(20))
    alpha = write_raster(tmp_path / "alpha.tif", count=4, seed=13, blank_rows=0, nodata=None,
                         colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha])
    with rasterio.open(alpha, "r+") as ds:
        ds.write(np.where(np.arange(190) < 95, 0, 255).astype(np.uint8)[None].repeat(150, 0), 4)
    rep = build_index(eng, tmp_path / "i", [str(p) for p in (grey, deep, five, empty, rotated, alpha)], SETTINGS)
    by = {os.path.basename(r["raster"]): r for r in rep["rasters"]}
    text = " ".join(rep["warnings"])
    assert "one band" in text and "uint16 values scaled" in text and "5 data bands" in text
    assert "all pixels are nodata" in text and "rotated" in text
    assert by["empty.tif"]["windows"] == 0 and by["grey.tif"]["windows"] > 0
    store = IndexStore.open(tmp_path / "i")
    cols = store.scan(f"raster = '{alpha}'", ["col", "width"])
    assert cols.num_rows and min(c + w / 2 for c, w in zip(cols["col"].to_pylist(), cols["width"].to_pylist(),
                                                          strict=True)) >= 95  # alpha 0 on the left half
    stored, _ = _stored(store)
    for name in ("grey.tif", "deep.tif"):
        want = expected_windows(eng, tmp_path / name)
        for k, v in want.items():
            np.testing.assert_allclose(stored[(str(tmp_path / name),) + k], v, atol=2e-5)
    rot = store.scan(f"raster = '{rotated}' AND col = 0 AND row = 0 AND size = 32", ["wkt", "minx", "maxx"])
    assert rot.num_rows == 1
    import shapely
    corners = np.array(shapely.from_wkt(rot["wkt"][0].as_py()).exterior.coords)
    assert len({round(c, 6) for c in corners[:4, 0]}) == 4  # a rotated footprint: no two corners share a lon


def test_bad_index_folders_and_queries(tmp_path, eng, ckpt):
    with pytest.raises(ProtocolError) as err:
        IndexStore.open(tmp_path / "nowhere")
    assert err.value.code == ErrorCode.NOT_FOUND and _reason(err) == "index_missing"
    a = write_raster(tmp_path / "a.tif", seed=14)
    build_index(eng, tmp_path / "i", [str(a)], SETTINGS)
    manifest = json.loads((tmp_path / "i" / MANIFEST).read_text())
    store = IndexStore.open(tmp_path / "i")
    with pytest.raises(ProtocolError) as err:
        query_vector(eng, store, Query())
    assert _reason(err) == "no_query"
    far = {"type": "Polygon", "coordinates": [[[10, 10], [11, 10], [11, 11], [10, 11], [10, 10]]]}
    with pytest.raises(ProtocolError) as err:
        query_vector(eng, store, Query(examples=[far]))
    assert _reason(err) == "examples_outside"
    with pytest.raises(ProtocolError) as err:
        build_index(eng, tmp_path / "i", [str(a)], WindowSettings((48,), CROP, 0.5))
    assert _reason(err) == "index_settings"
    other = engine_from(tiny_checkpoint(tmp_path / "other.pt", seed=1))
    for call in (lambda: build_index(other, tmp_path / "i", [str(a)]),
                 lambda: IndexStore.open(tmp_path / "i", __import__("backend.index.identity").index.identity
                                         .model_identity(other))):
        with pytest.raises(ProtocolError) as err:
            call()
        assert _reason(err) == "index_other_model" and "fingerprint" in err.value.details["differs"]
    (tmp_path / "i" / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ProtocolError) as err:
        IndexStore.open(tmp_path / "i")
    assert _reason(err) == "index_version"
    (tmp_path / "i" / MANIFEST).write_text("{\"format\": \"mapquery-index\", \"form")
    with pytest.raises(ProtocolError) as err:
        IndexStore.open(tmp_path / "i")
    assert _reason(err) == "index_half_written"
    (tmp_path / "i" / MANIFEST).unlink()
    with pytest.raises(ProtocolError) as err:
        build_index(eng, tmp_path / "i", [str(a)])
    assert _reason(err) == "index_half_written"
    (tmp_path / "i" / MANIFEST).write_text(json.dumps(manifest))  # restored: the rows are all there
    assert IndexStore.open(tmp_path / "i").row_count() == store.row_count()
    (tmp_path / "j").mkdir()  # killed after writing index.json, before any table: searching says so
    (tmp_path / "j" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ProtocolError) as err:
        search(IndexStore.open(tmp_path / "j"), np.ones(manifest["dim"], np.float32), 3)
    assert _reason(err) == "index_half_written"
    assert build_index(eng, tmp_path / "j", [str(a)])["rows"] == store.row_count()  # and a build completes it


@pytest.mark.parametrize("kind", ["IVF_FLAT", "IVF_RQ", "IVF_SQ"])
def test_large_tables_get_an_ivf_index_and_search_it_like_exact(tmp_path, eng, monkeypatch, kind):
    """Every partition probed: IVF-FLAT (full vectors) gives the exact ranking and scores; the quantised kinds
    the same windows, with scores within their quantisation error."""
    from backend.index import layout
    monkeypatch.setattr(layout, "ANN_MIN_ROWS", 100)
    monkeypatch.setattr(layout, "ANN_NPROBES", 16)  # every one of the (at least 16) partitions
    monkeypatch.setattr(layout, "ANN_KIND", kind)
    a = write_raster(tmp_path / "a.tif", height=300, width=320, seed=15, blank_rows=0)
    rep = build_index(eng, tmp_path / "i", [str(a)], WindowSettings((32,), CROP, 0.5))
    store = IndexStore.open(tmp_path / "i")
    assert rep["ann"] and store.has_ann() and rep["rows"] >= 100
    assert [str(i.index_type).replace("_", "").upper() for i in store.windows.list_indices()] == \
        [kind.replace("_", "")]
    want = expected_windows(eng, a, sizes=(32,))
    keys = list(want)
    q = query_vector(eng, store, Query(texts=["a harbour"])).vector
    exact = np.stack([want[k] for k in keys]) @ q
    rows = search(store, q, 20)
    got = [(r["size"], *r["window"]) for r in rows]
    scores = np.array([r["score"] for r in rows])
    if kind == "IVF_FLAT":
        assert got == [keys[i] for i in np.argsort(-exact)[:20]]
        np.testing.assert_allclose(scores, np.sort(exact)[::-1][:20], atol=1e-5)
    else:  # ranked by the quantised scores: the best 20 but for near-ties at the cut, each scored closely
        assert len(set(got) & {keys[i] for i in np.argsort(-exact)[:20]}) >= 18
        np.testing.assert_allclose(scores, [exact[keys.index(k)] for k in got], atol=0.02)


def test_rows_added_after_the_ivf_index_are_searched_exactly_until_a_rebuild(tmp_path, eng, monkeypatch):
    """A later build leaves its rows outside the IVF index (found by the exact search beside it) until they pass
    ANN_REBUILD_SHARE of the table; finish() never calls optimize(), which collapses the IVF partitions."""
    from backend.index import layout
    monkeypatch.setattr(layout, "ANN_MIN_ROWS", 100)
    monkeypatch.setattr(layout, "ANN_NPROBES", 16)
    a = write_raster(tmp_path / "a.tif", height=300, width=320, seed=15, blank_rows=0)
    b = write_raster(tmp_path / "b.tif", height=96, width=96, seed=16, blank_rows=0)
    build_index(eng, tmp_path / "i", [str(a)], WindowSettings((32,), CROP, 0.5))
    import lancedb.table
    monkeypatch.setattr(lancedb.table.LanceTable, "optimize",
                        lambda *a, **k: pytest.fail("optimize() collapses the IVF partitions"))
    monkeypatch.setattr(layout, "ANN_REBUILD_SHARE", 1.0)  # no rebuild: b's rows stay outside the index
    rep = build_index(eng, tmp_path / "i", [str(b)])
    store = IndexStore.open(tmp_path / "i")
    want_b = expected_windows(eng, b, sizes=(32,))
    assert rep["ann"] and store.unindexed_rows() == len(want_b) > 0
    key, vec = next(iter(want_b.items()))
    top = search(store, vec, 1)[0]
    assert top["raster"].endswith("b.tif") and (top["size"], *top["window"]) == key
    assert top["score"] == pytest.approx(1.0, abs=1e-5)
    monkeypatch.setattr(layout, "ANN_REBUILD_SHARE", 0.0)
    with store.writing():
        assert store.finish()["unindexed"] == 0  # past the share: the index is built again over every row


def test_a_served_index_is_reused_until_a_commit_and_then_read_again(tmp_path, eng):
    """The server keeps an opened index (and the partitions its searches loaded) while nothing changes, and
    opens it again after any commit, from this process or another: a search then sees the new rows."""
    from types import SimpleNamespace
    from backend.index.service import IndexOps
    a = write_raster(tmp_path / "a.tif", seed=31, blank_rows=0)
    b = write_raster(tmp_path / "b.tif", seed=32, blank_rows=0)
    build_index(eng, tmp_path / "i", [str(a)], SETTINGS)
    ops = IndexOps(eng)
    job = SimpleNamespace(local=True)
    name, first = ops._store(job, str(tmp_path / "i"))
    assert first.is_current() and ops._store(job, name)[1] is first  # nothing committed: the same object
    build_index(eng, tmp_path / "i", [str(b)])  # another writer (its own store objects) commits b's windows
    assert not first.is_current()
    _, second = ops._store(job, name)
    assert second is not first and second.is_current()
    want_b = expected_windows(eng, b)
    key, vec = next(iter(want_b.items()))
    top = search(second, vec, 1)[0]  # b's window is found by its own embedding
    assert top["raster"] == str(b) and (top["size"], *top["window"]) == key
    assert top["score"] == pytest.approx(1.0, abs=1e-5)
    with second.writing():
        second.forget_raster(str(b))  # a delete is a commit too
    assert not second.is_current()
    third = ops._store(job, name)[1]
    assert all(r["raster"] != str(b) for r in search(third, vec, 5))
    (tmp_path / "i" / MANIFEST).write_text((tmp_path / "i" / MANIFEST).read_text())  # the manifest rewritten
    assert not third.is_current()
