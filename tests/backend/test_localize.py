"""SeLo: window geometry by hand, the heatmap against a direct per-window computation, cache, GeoTIFF, polygons."""

import numpy as np
import open_clip
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image

from backend.engine import Engine, EngineConfig
from backend.server import Job
from backend.service import ModelService
from backend.tasks.localize import localize
from shared_protocol.selo import block_kernel, normalize_minmax, render, run_median, smooth_block
from backend.tasks.windows import cell_means, mean_over_windows, selo_windows
from shared_protocol import ErrorCode, ProtocolError, Request


def _no_progress(p, m=""):
    pass


def test_selo_windows_worked_by_hand():
    boxes = {tuple(b) for b in selo_windows(600, 600, 256)}
    starts0, starts128 = [0, 256, 344], [128, 344]  # 512 + 256 > 600 -> clamped to 344; 384 -> 344
    expected = {(x, y, x + 256, y + 256) for x in starts0 for y in starts0}
    expected |= {(x, y, x + 256, y + 256) for x in starts128 for y in starts128}
    assert boxes == expected and len(boxes) == 12
    small = selo_windows(100, 300, 256)  # larger than the canvas: shrinks to it on that axis
    # x: 0 and 256 -> 44 (clamped); the offset grid's 128 -> 44 too; y: only 0 (the offset 128 is past 100)
    assert {tuple(b) for b in small} == {(0, 0, 256, 100), (44, 0, 300, 100)}


def test_mean_over_windows_equals_brute_force(rng):
    h, w = 90, 130
    boxes = np.concatenate([selo_windows(h, w, 32), selo_windows(h, w, 50), selo_windows(h, w, 77)])
    scores = rng.normal(size=(len(boxes), 2))
    total, count = np.zeros((2, h, w)), np.zeros((h, w))
    for (x0, y0, x1, y1), s in zip(boxes, scores):
        total[:, y0:y1, x0:x1] += s[:, None, None]
        count[y0:y1, x0:x1] += 1
    np.testing.assert_allclose(mean_over_windows(boxes, scores, h, w), total / count, rtol=1e-5, atol=1e-6)


def _direct_heatmap(tiny, canvas, query, sizes, crop):
    """The reference algorithm, straightforwardly: per window, PIL resize, open_clip transform, batch of 1."""
    h, w = canvas.shape[:2]
    pre = open_clip.image_transform(tiny.image_size, is_train=False, mean=tiny.mean, std=tiny.std)
    with torch.no_grad():
        text = F.normalize(tiny.model.encode_text(tiny.tokenizer([query])), dim=-1)[0]
        total, count = np.zeros((h, w)), np.zeros((h, w))
        for s in sizes:
            for x0, y0, x1, y1 in selo_windows(h, w, s):
                win = Image.fromarray(canvas[y0:y1, x0:x1]).resize((crop, crop), Image.BICUBIC)
                emb = F.normalize(tiny.model.encode_image(pre(win)[None]), dim=-1)[0]
                total[y0:y1, x0:x1] += float(emb @ text)
                count[y0:y1, x0:x1] += 1
    return total / count


def test_heatmap_equals_the_direct_per_window_computation(engine, tiny, rng):
    canvas = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    canvas[40:110, 60:150] = [30, 120, 40]  # some structure
    params = {"queries": ["a harbour with many boats"], "window_sizes": [48, 96], "crop_size": 64, "smooth": 0,
              "normalize": False}
    heat, info = localize(engine, canvas, params, _no_progress)
    direct = _direct_heatmap(tiny, canvas, params["queries"][0], [48, 96], 64)
    assert heat.shape == (1, 150, 200) and heat.dtype == np.float32
    assert info["windows"] == len(selo_windows(150, 200, 48)) + len(selo_windows(150, 200, 96))
    spread = direct.max() - direct.min()
    assert np.abs(heat[0] - direct).max() < 0.02 * spread  # PIL vs torch resampling: a few 8-bit levels
    assert np.corrcoef(heat[0].ravel(), direct.ravel())[0, 1] > 0.999


def _pixels_as_cells(h: np.ndarray):
    return h[None].astype(np.float32), np.arange(h.shape[0] + 1), np.arange(h.shape[1] + 1)


def test_normalise_and_smooth():
    h = np.arange(12, dtype=np.float32).reshape(3, 4)
    n = normalize_minmax(h)
    assert n.min() == 0 and n.max() == 1 and np.allclose(n, h / 11)
    assert normalize_minmax(np.full((3, 3), 7.0)).max() == 0
    spike = np.zeros((200, 200), np.float32)
    spike[100, 100] = 1
    spike[20:180, 20:180] += 0.5
    out = render(*_pixels_as_cells(spike), 200, 200, 29)[0]  # median over pixels
    assert out.shape == spike.shape and out[100, 100] == 0.5 and out[5, 5] == 0.0  # spike gone, block kept
    big = render(*_pixels_as_cells(spike), 200, 200, 251)[0]  # on 16-px block means
    assert big.shape == spike.shape and np.isfinite(big).all() and big[100, 100] < 0.6


@pytest.mark.parametrize("size", [1, 3, 15, 31])
def test_run_median_equals_scipy_on_the_full_map(rng, size):
    from scipy import ndimage
    rows, cols = rng.integers(1, 9, 12), np.array([1, 1, 5, 2, 13, 1, 40, 3])  # runs as short as one pixel
    values = rng.random((2, len(rows), len(cols))).astype(np.float32)
    values[:, 3] = values[:, 2]  # equal values in neighbouring runs (ties)
    got = run_median(values, rows, cols, size, max_elements=2000)  # in chunks
    full = np.repeat(np.repeat(values, rows, axis=1), cols, axis=2)
    assert got.shape == full.shape
    for q in range(2):
        np.testing.assert_array_equal(got[q], ndimage.median_filter(full[q], size=size, mode="nearest"))


def _smooth_pixels(h: np.ndarray, kernel: int) -> np.ndarray:
    """The smoothing written over pixels: replicate-pad to whole blocks, block means, median, bilinear."""
    from scipy import ndimage
    if kernel <= 1:
        return h
    block = smooth_block(kernel)
    if block == 1:
        return ndimage.median_filter(h, size=kernel, mode="nearest")
    height, width = h.shape
    t = F.pad(torch.from_numpy(h)[None, None], (0, (-width) % block, 0, (-height) % block), mode="replicate")
    small = ndimage.median_filter(F.avg_pool2d(t, block)[0, 0].numpy(), size=block_kernel(kernel), mode="nearest")
    up = F.interpolate(torch.from_numpy(small)[None, None], scale_factor=block, mode="bilinear", align_corners=False)
    return up[0, 0, :height, :width].numpy()


@pytest.mark.parametrize("kernel", [0, 9, 45, 251])
def test_rendering_from_cells_equals_smoothing_the_pixels(rng, kernel):
    h, w = 203, 317  # not multiples of the blocks: the padding is exercised
    boxes = np.concatenate([selo_windows(h, w, 40), selo_windows(h, w, 96)])
    scores = rng.random((len(boxes), 2))
    cells, ys, xs = cell_means(boxes, scores, h, w)
    got = render(cells, ys, xs, h, w, kernel)
    pixels = mean_over_windows(boxes, scores, h, w)
    assert got.shape == (2, h, w) and got.dtype == np.float32 and got.flags.c_contiguous  # sent without a copy
    for q in range(2):
        np.testing.assert_allclose(got[q], _smooth_pixels(pixels[q], kernel), atol=1e-5)


def test_second_query_on_the_same_canvas_encodes_only_text(engine, rng, monkeypatch):
    canvas = rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)
    base = {"window_sizes": [32, 64], "crop_size": 32, "smooth": 0, "normalize": True}
    localize(engine, canvas, {**base, "queries": ["farmland"]}, _no_progress)
    calls = []
    original = engine.loaded.model.encode_image
    monkeypatch.setattr(engine.loaded.model, "encode_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    heat, _ = localize(engine, canvas.copy(), {**base, "queries": ["airport"]}, _no_progress)
    assert calls == [] and heat.shape == (1, 120, 120)
    localize(engine, canvas[:, ::-1].copy(), {**base, "queries": ["airport"]}, _no_progress)
    assert calls  # other pixels: encoded again


def test_only_the_window_sizes_not_cached_are_encoded_and_in_one_go(engine, tiny, rng, monkeypatch):
    canvas = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    base = {"crop_size": 32, "smooth": 0, "normalize": False, "queries": ["a river"]}
    calls = []
    original = engine.encode_windows
    monkeypatch.setattr(engine, "encode_windows", lambda c, boxes, *a, **k: calls.append(
        sorted({int(b[2] - b[0]) for b in boxes})) or original(c, boxes, *a, **k))
    localize(engine, canvas, {**base, "window_sizes": [32, 64]}, _no_progress)
    assert calls == [[32, 64]]  # both sizes share one call (and the model's batches)
    heat, info = localize(engine, canvas, {**base, "window_sizes": [48, 32]}, _no_progress)
    assert calls == [[32, 64], [48]]  # 32 came from the cache
    fresh = Engine(tiny, EngineConfig(batch_size=3, precision="fp32"))  # other batches, nothing cached
    expected, _ = localize(fresh, canvas, {**base, "window_sizes": [32, 48]}, _no_progress)
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    assert info["window_sizes"] == [32, 48]


def _job(params, canvas):
    req = Request("localize", "r1", {"window_sizes": [32, 64], "crop_size": 32, "smooth": 0, "normalize": True,
                                     "geotiff": False, "polygons": False, "threshold": 0.5, "transform": None,
                                     "crs": None, "value_range": None, "adapter": None, "canvas_id": None,
                                     **params},
                  {"canvas": canvas} if canvas is not None else {})
    return Job(req, b"peer", lambda peer, reply: None)


def test_a_canvas_held_by_the_server_is_named_by_its_id(engine, rng):
    service = ModelService(engine)
    canvas = (rng.integers(0, 4000, (90, 120, 3))).astype(np.uint16)  # uint16: the scale is remembered too
    first = service.handle(_job({"queries": ["a river"], "smooth": 9}, canvas))
    cid = first.result["canvas_id"]
    again = service.handle(_job({"queries": ["a river"], "smooth": 9, "canvas_id": cid}, None))
    np.testing.assert_array_equal(again.arrays["heatmaps"], first.arrays["heatmaps"])
    assert again.result["canvas_id"] == cid and again.result["queries"] == first.result["queries"]
    other = service.handle(_job({"queries": ["farmland"], "canvas_id": cid}, None))  # a new query: text only
    assert other.arrays["heatmaps"].shape == (1, 90, 120)
    for params in ({"window_sizes": [48]},  # windows never encoded for this canvas
                   {"value_range": [0, 4000]},  # another scaling of the pixels
                   {"adapter": None, "crop_size": 64},
                   {"canvas_id": "ffff"}):  # never seen
        with pytest.raises(ProtocolError) as e:
            service.handle(_job({"queries": ["x"], "canvas_id": cid, **params}, None))
        assert e.value.code == ErrorCode.NOT_FOUND and e.value.details["reason"] == "canvas_unknown"
    with pytest.raises(ProtocolError) as e:
        service.handle(_job({"queries": ["x"]}, None))
    assert e.value.code == ErrorCode.BAD_PARAMS and "canvas" in e.value.message
    engine.cache.clear()  # evicted: the id is refused, the canvas itself still works
    with pytest.raises(ProtocolError) as e:
        service.handle(_job({"queries": ["x"], "canvas_id": cid}, None))
    assert e.value.details["reason"] == "canvas_unknown"
    assert service.handle(_job({"queries": ["x"], "canvas_id": cid}, canvas)).result["canvas_id"] == cid


def test_geotiff_and_polygons_are_georeferenced(engine, rng):
    canvas = rng.integers(0, 256, (100, 160, 3), dtype=np.uint8)
    transform = [30.0, 0.0, 500000.0, 0.0, -30.0, 4200000.0]
    service = ModelService(engine)
    reply = service.handle(_job({"queries": ["river", "forest"], "transform": transform, "crs": "EPSG:32618",
                                 "geotiff": True, "polygons": True, "threshold": 0.6}, canvas))
    heat = reply.arrays["heatmaps"]
    assert heat.shape == (2, 100, 160) and reply.result["crs"] == "EPSG:32618"
    with rasterio.MemoryFile(reply.arrays["geotiff_1"].tobytes()) as mem, mem.open() as ds:
        assert ds.crs.to_epsg() == 32618 and list(ds.transform)[:6] == transform
        np.testing.assert_array_equal(ds.read(1), heat[1])
    west, north = 500000.0, 4200000.0
    east, south = west + 160 * 30, north - 100 * 30
    for fc, hm in zip(reply.result["polygons"], heat):
        assert fc["features"], "some region is above the threshold after min-max normalisation"
        area = sum(f["properties"]["area"] for f in fc["features"])
        assert area == pytest.approx((hm >= 0.6).sum() * 900)  # pixel-exact regions, in m^2
        for f in fc["features"]:
            xs = [p[0] for ring in f["geometry"]["coordinates"] for p in ring]
            ys = [p[1] for ring in f["geometry"]["coordinates"] for p in ring]
            assert west <= min(xs) and max(xs) <= east and south <= min(ys) and max(ys) <= north
            assert f["properties"]["score_mean"] >= 0.6


def test_localize_limits(engine):
    service = ModelService(engine, max_canvas_pixels=100 * 100)
    with pytest.raises(ProtocolError) as e:
        service.handle(_job({"queries": ["x"]}, np.zeros((101, 100, 3), np.uint8)))
    assert e.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError) as e:
        service.handle(_job({"queries": ["x"], "crs": "EPSG:nope"}, np.zeros((50, 50, 3), np.uint8)))
    assert e.value.code == ErrorCode.BAD_PARAMS
