"""Valid-pixel masks (issue 10): no answer comes from invalid pixels, checked against independent numpy
computations; an all-valid mask changes nothing; alpha is the mask when none is sent."""
import math

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from rasterio.features import rasterize
from scipy import ndimage

from backend.models.preprocess import value_scale
from backend.service import ModelService, uniform_image_warnings
from backend.tasks.classify import classify
from backend.tasks.localize import localize
from shared_protocol.selo import block_kernel, nan_median, render, smooth_block, valid_median
from backend.tasks.masks import box_counts, interval_counts, valid_pixels
from backend.tasks.rank import embed, rank
from backend.tasks.windows import cell_means, cells_to_pixels, mean_over_windows, selo_windows
from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.client import CanvasIds
from test_localize import _job

CLASSES = ["river", "forest", "dense residential"]


def _no_progress(p, m=""):
    pass


def _bordered(rng, h, w, border, dtype=np.uint8, nodata=0, channels=3):
    """A random image with a ``border``-px nodata frame (value ``nodata``), and its mask (1 = valid)."""
    hi = 256 if dtype == np.uint8 else 12000
    img = rng.integers(0 if dtype == np.uint8 else 500, hi, (h, w, channels)).astype(dtype)
    valid = np.zeros((h, w), bool)
    valid[border:h - border, border:w - border] = True
    img[~valid] = nodata
    return img, valid.astype(np.uint8)


# -- counting and scaling ------------------------------------------------------------------------------
def test_valid_pixels_from_the_mask_or_alpha_and_box_counts(rng):
    img = rng.integers(0, 256, (2, 6, 5, 4), dtype=np.uint8)
    img[..., 3] = 255
    assert valid_pixels({"tiles": img}, "tiles") is None  # alpha all opaque: all valid
    img[0, 1, 2, 3] = 0
    assert valid_pixels({"tiles": img}, "tiles").sum() == 2 * 6 * 5 - 1
    mask = np.ones((2, 6, 5), np.uint8)
    assert valid_pixels({"tiles": img, "tiles_mask": mask}, "tiles") is None  # the mask wins over alpha
    mask[1, 0, 0] = 0
    np.testing.assert_array_equal(valid_pixels({"tiles": img[..., :3], "tiles_mask": mask * 7}, "tiles"), mask == 1)
    assert valid_pixels({"tiles": img[..., :3]}, "tiles") is None  # 3 channels, no mask: all valid
    valid = rng.random((57, 83)) < 0.6
    boxes = np.array([[0, 0, 83, 57], [3, 4, 20, 30], [10, 10, 11, 11], [82, 56, 83, 57], [5, 5, 5, 9]])
    boxes = np.concatenate([boxes, selo_windows(57, 83, 20)])
    np.testing.assert_array_equal(box_counts(valid, boxes), [valid[y0:y1, x0:x1].sum() for x0, y0, x1, y1 in boxes])


def test_uint16_stretch_comes_from_valid_pixels_only(rng):
    img, mask = _bordered(rng, 60, 80, 15, np.uint16, nodata=65535)
    img[20:25, 20:25] = 0  # valid dark pixels count
    expected = np.percentile(img[mask == 1][:, :3], (2, 98))
    assert value_scale(img[None], None, mask[None] == 1) == tuple(float(v) for v in expected)
    assert value_scale(img[None]) != value_scale(img[None], None, mask[None] == 1)  # the nodata would count
    assert value_scale(img[None], None, np.zeros((1, 60, 80), bool)) == (0.0, 65535.0)  # nothing valid
    assert value_scale(img[None], [0, 10], mask[None] == 1) == (0.0, 10.0)  # value_range wins


# -- classify ------------------------------------------------------------------------------------------
def test_classify_tiles_skips_those_below_min_valid(engine, rng):
    tiles = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mask = np.ones((5, 32, 32), np.uint8)
    mask[1, :, :20] = 0  # 37.5 % valid: skipped
    mask[2, :, :10] = 0  # 68.75 %: kept
    mask[4] = 0
    result, arrays = classify(engine, {"classes": CLASSES, "top_k": 2}, {"tiles": tiles, "tiles_mask": mask},
                              _no_progress)
    assert result["skipped"] == 2
    assert [t["skipped"] for t in result["tiles"]] == [False, True, False, False, True]
    for i in (1, 4):
        assert result["tiles"][i] == {"index": i, "skipped": True, "label": None, "top": []}
        assert np.isnan(arrays["probs"][i]).all()
    _, alone = classify(engine, {"classes": CLASSES}, {"tiles": tiles[[0, 2, 3]]}, _no_progress)
    np.testing.assert_array_equal(arrays["probs"][[0, 2, 3]], alone["probs"])
    result, _ = classify(engine, {"classes": CLASSES, "min_valid": 0.3}, {"tiles": tiles, "tiles_mask": mask},
                         _no_progress)
    assert [t["skipped"] for t in result["tiles"]] == [False, False, False, False, True]


def _grid_windows(cells, h, w, tile):
    """The window classifying each grid cell, written out: full size, ending at the canvas edge if need be."""
    x0 = np.maximum(0, np.minimum(cells[:, 0], w - tile))
    y0 = np.maximum(0, np.minimum(cells[:, 1], h - tile))
    return np.stack([x0, y0, np.minimum(x0 + tile, w), np.minimum(y0 + tile, h)], axis=1)


def test_classify_canvas_with_a_nodata_border_labels_no_tile_on_nodata(engine, rng):
    canvas, mask = _bordered(rng, 150, 170, 40, np.uint16, nodata=65535)
    params = {"classes": CLASSES, "tile_size": 32, "stride": 24}
    result, arrays = classify(engine, params, {"canvas": canvas, "canvas_mask": mask}, _no_progress)
    cells = arrays["boxes"].astype(np.int64)
    windows = _grid_windows(cells, 150, 170, 32)
    share = [min(mask[y0:y1, x0:x1].mean(), mask[b:d, a:c].mean())
             for (x0, y0, x1, y1), (a, b, c, d) in zip(cells, windows)]
    expected = [s < 0.5 for s in share]
    assert [t["skipped"] for t in result["tiles"]] == expected and 0 < sum(expected) < len(expected)
    assert result["skipped"] == sum(expected)
    for t, (x0, y0, x1, y1) in zip(result["tiles"], cells):
        if t["label"] is not None:  # no label on a cell that is mostly nodata
            assert mask[y0:y1, x0:x1].mean() >= 0.5
    # kept tiles: exactly the answer without the mask, stretched like the valid pixels
    lo, hi = np.percentile(canvas[mask == 1][:, :3], (2, 98))
    _, plain = classify(engine, {**params, "value_range": [float(lo), float(hi)]}, {"canvas": canvas}, _no_progress)
    kept = ~np.array(expected)
    np.testing.assert_allclose(arrays["probs"][kept], plain["probs"][kept], atol=1e-6)
    assert np.isnan(arrays["probs"][~kept]).all()


def test_an_all_valid_mask_changes_nothing_and_alpha_is_the_mask(engine, rng):
    canvas, mask = _bordered(rng, 100, 120, 30)
    base = {"classes": CLASSES, "tile_size": 32}
    _, plain = classify(engine, base, {"canvas": canvas}, _no_progress)
    _, ones = classify(engine, base, {"canvas": canvas, "canvas_mask": np.full((100, 120), 9, np.uint8)},
                       _no_progress)
    np.testing.assert_array_equal(ones["probs"], plain["probs"])
    rgba = np.concatenate([canvas, mask[..., None] * 255], axis=2)
    r_alpha, alpha = classify(engine, base, {"canvas": rgba}, _no_progress)
    r_mask, explicit = classify(engine, base, {"canvas": canvas, "canvas_mask": mask}, _no_progress)
    assert r_alpha["tiles"] == r_mask["tiles"] and r_alpha["skipped"] > 0
    np.testing.assert_array_equal(alpha["probs"], explicit["probs"])
    tiles = np.stack([rgba[:32, :32], rgba[40:72, 40:72]])
    _, t_alpha = classify(engine, {"classes": CLASSES}, {"tiles": tiles}, _no_progress)
    _, t_mask = classify(engine, {"classes": CLASSES}, {"tiles": tiles[..., :3], "tiles_mask": tiles[..., 3]},
                         _no_progress)
    np.testing.assert_array_equal(t_alpha["probs"], t_mask["probs"])
    assert np.isnan(t_alpha["probs"][0]).all() and np.isfinite(t_alpha["probs"][1]).all()


# -- rank and embed ------------------------------------------------------------------------------------
def test_rank_never_ranks_images_on_nodata(engine, rng):
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    mask = np.ones((6, 32, 32), np.uint8)
    mask[[1, 4]] = 0
    mask[3, :20] = 0  # 37.5 % valid
    texts = ["a river", "an airport"]
    result, arrays = rank(engine, {"texts": texts, "top_k": 10}, {"images": images, "images_mask": mask},
                          _no_progress)
    skipped = [i for i in range(6) if mask[i].mean() < 0.5]
    assert result["skipped"] == skipped == [1, 3, 4]
    kept = [0, 2, 5]
    for ranks in result["by_query"]:
        assert sorted(r["index"] for r in ranks) == kept
    assert all(result["by_image"][i] == [] for i in skipped) and all(result["by_image"][i] for i in kept)
    assert np.isnan(arrays["similarity"][skipped]).all()
    plain, plain_arrays = rank(engine, {"texts": texts, "top_k": 10}, {"images": images[kept]}, _no_progress)
    np.testing.assert_array_equal(arrays["similarity"][kept], plain_arrays["similarity"])
    assert [[kept[r["index"]] for r in ranks] for ranks in plain["by_query"]] == \
        [[r["index"] for r in ranks] for ranks in result["by_query"]]
    same, same_arrays = rank(engine, {"texts": texts}, {"images": images, "images_mask": np.ones_like(mask)},
                             _no_progress)
    ref, ref_arrays = rank(engine, {"texts": texts}, {"images": images}, _no_progress)
    assert same["by_query"] == ref["by_query"] and same["skipped"] == ref["skipped"] == []
    np.testing.assert_array_equal(same_arrays["similarity"], ref_arrays["similarity"])
    with pytest.raises(ProtocolError) as e:
        rank(engine, {"texts": None}, {"images": images, "query_images": images[:2], "query_images_mask": mask[:2]},
             _no_progress)
    assert e.value.code == ErrorCode.BAD_PARAMS and "query image 1 has too few valid pixels" in e.value.message


def test_embed_says_which_images_it_skipped(engine, rng):
    images = rng.integers(0, 256, (3, 32, 32, 4), dtype=np.uint8)
    images[..., 3] = 255
    images[1, ..., 3] = 0  # transparent: alpha is the mask
    result, arrays = embed(engine, {"texts": None}, {"images": images}, _no_progress)
    assert result["skipped"] == [1] and np.isnan(arrays["image_embeddings"][1]).all()
    _, alone = embed(engine, {"texts": None}, {"images": images[[0, 2], :, :, :3]}, _no_progress)
    np.testing.assert_array_equal(arrays["image_embeddings"][[0, 2]], alone["image_embeddings"])


# -- localize ------------------------------------------------------------------------------------------
def _direct_masked_heatmap(tiny, canvas, valid, query, sizes, crop, min_valid=0.5):
    """SeLo with a mask, written out: windows below min_valid are dropped; each pixel is the mean over the
    kept windows covering it (PIL resize, open_clip transform, one window at a time); NaN where invalid or
    covered by no kept window."""
    import open_clip
    h, w = canvas.shape[:2]
    pre = open_clip.image_transform(tiny.image_size, is_train=False, mean=tiny.mean, std=tiny.std)
    total, count, kept = np.zeros((h, w)), np.zeros((h, w)), 0
    with torch.no_grad():
        text = F.normalize(tiny.model.encode_text(tiny.tokenizer([query])), dim=-1)[0]
        for s in sizes:
            for x0, y0, x1, y1 in selo_windows(h, w, s):
                if valid[y0:y1, x0:x1].mean() < min_valid:
                    continue
                win = Image.fromarray(canvas[y0:y1, x0:x1]).resize((crop, crop), Image.BICUBIC)
                emb = F.normalize(tiny.model.encode_image(pre(win)[None]), dim=-1)[0]
                total[y0:y1, x0:x1] += float(emb @ text)
                count[y0:y1, x0:x1] += 1
                kept += 1
    with np.errstate(invalid="ignore"):
        out = total / count
    out[(count == 0) | ~valid] = np.nan
    return out, kept


def test_masked_heatmap_equals_the_direct_per_window_computation(engine, tiny, rng):
    canvas, mask = _bordered(rng, 150, 200, 0)
    canvas[40:110, 60:150] = [30, 120, 40]
    valid = np.ones((150, 200), bool)
    valid[:, :70] = False  # a wide nodata band on the left
    valid[100:, 150:] = False
    valid[20:30, 100:110] = False  # a hole inside
    canvas[~valid] = 0
    params = {"queries": ["a harbour"], "window_sizes": [48, 96], "crop_size": 64, "smooth": 0, "normalize": False}
    heat, info = localize(engine, canvas, params, _no_progress, mask=valid.astype(np.uint8))
    direct, kept = _direct_masked_heatmap(tiny, canvas, valid, "a harbour", [48, 96], 64)
    assert info["windows"] == kept < len(selo_windows(150, 200, 48)) + len(selo_windows(150, 200, 96))
    np.testing.assert_array_equal(np.isnan(heat[0]), np.isnan(direct))  # NaN exactly where invalid / uncovered
    assert np.isnan(heat[0][~valid]).all() and np.isfinite(heat[0][40:100, 120:150]).all()
    finite = np.isfinite(direct)
    spread = direct[finite].max() - direct[finite].min()
    assert np.abs(heat[0][finite] - direct[finite]).max() < 0.02 * spread  # PIL vs torch resampling
    stats = info["queries"][0]  # from valid pixels only
    assert stats["score_min"] == pytest.approx(float(np.nanmin(heat[0])), abs=1e-6)
    assert stats["score_max"] == pytest.approx(float(np.nanmax(heat[0])), abs=1e-6)
    assert stats["score_mean"] == pytest.approx(float(np.nanmean(heat[0].astype(np.float64))), abs=1e-6)
    norm, _ = localize(engine, canvas, {**params, "normalize": True}, _no_progress, mask=valid.astype(np.uint8))
    got = norm[0][finite]
    assert got.min() == 0 and got.max() == 1 and np.isnan(norm[0][~finite]).all()
    raw = heat[0][finite]
    np.testing.assert_allclose(got, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5)


def _lower_nanmedian(values):
    v = np.sort(values[~np.isnan(values)])
    return v[(len(v) - 1) // 2] if len(v) else np.nan


def test_nan_median_ignores_nan(rng):
    values = rng.random((2, 23, 31)).astype(np.float32)
    values[:, 5:9, 3:20] = np.nan
    values[:, :, 25:] = np.nan
    for size in (1, 3, 7):
        got = nan_median(values, size, max_elements=3000)
        for q in range(2):
            ref = ndimage.generic_filter(values[q], _lower_nanmedian, size=size, mode="nearest")
            np.testing.assert_array_equal(got[q], ref.astype(np.float32))


@pytest.mark.parametrize("size", [3, 7, 13])
def test_valid_median_equals_nan_median_of_the_pixels(rng, size):
    h, w = 41, 57
    boxes = np.concatenate([selo_windows(h, w, 6), selo_windows(h, w, 20)])  # cells narrower than the kernel
    boxes = boxes[~((boxes[:, 0] < 30) & (boxes[:, 2] > 25) & (boxes[:, 1] < 20) & (boxes[:, 3] > 15))]
    cells, ys, xs = cell_means(boxes, rng.random((len(boxes), 2)), h, w)
    valid = rng.random((h, w)) < 0.7
    valid[:, :9] = False
    got = valid_median(cells, ys, xs, valid, size, max_elements=500)  # in chunks
    pixels = cells_to_pixels(cells, ys, xs, h, w)
    pixels[:, ~valid] = np.nan
    ref = nan_median(pixels, size)
    ok = valid & ~np.isnan(pixels[0])
    np.testing.assert_array_equal(got[:, ok], ref[:, ok])


def _smooth_valid_pixels(pixels, bad, kernel):
    """The NaN-aware smoothing written over pixels: invalid pixels are NaN; with blocks, each block is the mean
    of its valid pixels (replicate-padded), the median ignores NaN, the bilinear resize is normalised by the
    finite blocks."""
    h = np.where(bad, np.nan, pixels)
    if kernel > 1 and smooth_block(kernel) == 1:
        h = ndimage.generic_filter(h, _lower_nanmedian, size=kernel, mode="nearest")
    elif kernel > 1:
        block = smooth_block(kernel)
        height, width = h.shape
        p = np.pad(h, ((0, (-height) % block), (0, (-width) % block)), mode="edge")
        ok = ~np.isnan(p)
        shape = (p.shape[0] // block, block, p.shape[1] // block, block)
        sums = np.where(ok, p, 0).reshape(shape).sum(axis=(1, 3))
        counts = ok.reshape(shape).sum(axis=(1, 3))
        with np.errstate(invalid="ignore"):
            small = np.where(counts > 0, sums / counts, np.nan)
        small = ndimage.generic_filter(small, _lower_nanmedian, size=block_kernel(kernel), mode="nearest")
        finite = np.isfinite(small)

        def up(a):
            t = torch.from_numpy(a.astype(np.float32))[None, None]
            return F.interpolate(t, scale_factor=block, mode="bilinear", align_corners=False)[0, 0].numpy()
        with np.errstate(invalid="ignore"):
            h = (up(np.where(finite, small, 0)) / up(finite.astype(np.float32)))[:height, :width]
    return np.where(bad, np.nan, h)


@pytest.mark.parametrize("kernel", [0, 3, 13, 45, 251])
def test_rendering_with_a_mask_equals_nan_aware_smoothing_of_the_pixels(rng, kernel):
    h, w = 203, 317
    boxes = np.concatenate([selo_windows(h, w, 40), selo_windows(h, w, 96)])
    hits = (boxes[:, 0] < 60) & (boxes[:, 2] > 20) & (boxes[:, 1] < 140) & (boxes[:, 3] > 100)
    boxes = boxes[~hits]  # dropped windows leave cells that nothing covers
    scores = rng.random((len(boxes), 2))
    valid = np.ones((h, w), bool)
    valid[:, 250:] = False
    valid[60:90, 30:200] = False
    valid[rng.random((h, w)) < 0.05] = False  # scattered invalid pixels: not aligned with any cell
    cells, ys, xs = cell_means(boxes, scores, h, w)
    got = render(cells, ys, xs, h, w, kernel, valid)
    pixels = mean_over_windows(boxes, scores, h, w)
    bad = ~valid | np.isnan(pixels[0])
    assert bad.sum() > (~valid).sum()  # some valid pixels are uncovered
    assert got.shape == (2, h, w) and got.dtype == np.float32 and got.flags.c_contiguous
    for q in range(2):
        ref = _smooth_valid_pixels(pixels[q], bad, kernel)
        np.testing.assert_array_equal(np.isnan(got[q]), bad)
        np.testing.assert_allclose(got[q][~bad], ref[~bad], atol=1e-5)
    # an invalid pixel never pulls a valid one: wild values on cells without a valid pixel change nothing
    wild = cells.copy()
    wild[:, interval_counts(valid, ys, xs) == 0] = 1000.0
    assert (wild == 1000).any()
    np.testing.assert_array_equal(render(wild, ys, xs, h, w, kernel, valid), got)


def test_all_valid_mask_and_alpha_in_localize(engine, rng):
    canvas, mask = _bordered(rng, 120, 140, 30)
    params = {"queries": ["a river"], "window_sizes": [32, 64], "crop_size": 32, "smooth": 9}
    plain, p_info = localize(engine, canvas, params, _no_progress)
    ones, o_info = localize(engine, canvas, params, _no_progress, mask=np.ones((120, 140), np.uint8))
    np.testing.assert_array_equal(ones, plain)
    assert o_info == p_info  # the same canvas_id too
    rgba = np.concatenate([canvas, mask[..., None] * 200], axis=2)
    alpha, _ = localize(engine, rgba, params, _no_progress)
    explicit, _ = localize(engine, canvas, params, _no_progress, mask=mask)
    np.testing.assert_array_equal(alpha, explicit)
    assert np.isnan(alpha[0][mask == 0]).all() and np.isfinite(alpha[0][45:75, 45:95]).all()


def test_canvas_id_names_the_mask_too(engine, rng):
    service = ModelService(engine)
    canvas = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    a = np.ones((96, 128), np.uint8)
    a[:, :48] = 0
    b = np.ones((96, 128), np.uint8)
    b[48:] = 0
    first = service.handle(_masked_job({"queries": ["a river"], "smooth": 9}, canvas, a))
    second = service.handle(_masked_job({"queries": ["a river"], "smooth": 9}, canvas, b))
    plain = service.handle(_job({"queries": ["a river"], "smooth": 9}, canvas))
    ids = {first.result["canvas_id"], second.result["canvas_id"], plain.result["canvas_id"]}
    assert len(ids) == 3
    for reply, mask in ((first, a), (second, b)):
        np.testing.assert_array_equal(np.isnan(reply.arrays["heatmaps"][0]), mask == 0)
        again = service.handle(_job({"queries": ["a river"], "smooth": 9, "canvas_id": reply.result["canvas_id"]},
                                    None))
        np.testing.assert_array_equal(again.arrays["heatmaps"], reply.arrays["heatmaps"])
        assert again.result["queries"] == reply.result["queries"]
    # the client's memory of canvas ids tells the masks apart too
    assert len({CanvasIds.digest(canvas), CanvasIds.digest(canvas, a), CanvasIds.digest(canvas, b)}) == 3


def _masked_job(params, canvas, mask):
    job = _job(params, canvas)
    job.request.arrays["canvas_mask"] = mask
    return job


def test_geotiff_nodata_and_polygons_never_over_nan(engine, rng):
    canvas, mask = _bordered(rng, 100, 160, 0)
    mask[:, 100:] = 0
    mask[30:60, 20:50] = 0
    transform = [30.0, 0.0, 500000.0, 0.0, -30.0, 4200000.0]
    service = ModelService(engine)
    reply = service.handle(_masked_job({"queries": ["river"], "transform": transform, "crs": "EPSG:32618",
                                        "geotiff": True, "polygons": True, "threshold": 0.3, "smooth": 0}, canvas,
                                       mask))
    heat = reply.arrays["heatmaps"][0]
    assert np.isnan(heat[mask == 0]).all()
    with rasterio.MemoryFile(reply.arrays["geotiff_0"].tobytes()) as mem, mem.open() as ds:
        assert math.isnan(ds.nodata)
        np.testing.assert_array_equal(ds.read(1), heat)
        assert (ds.read_masks(1) == 0).sum() == np.isnan(heat).sum()
    features = reply.result["polygons"][0]["features"]
    assert features
    covered = rasterize([(f["geometry"], 1) for f in features], out_shape=heat.shape,
                        transform=rasterio.Affine(*transform), fill=0, dtype="uint8").astype(bool)
    assert not np.isnan(heat[covered]).any()
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(covered, heat >= 0.3)


def test_no_kept_window_is_a_clear_error(engine, rng):
    canvas = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    for mask in (np.zeros((80, 80), np.uint8), np.pad(np.ones((10, 10), np.uint8), 35)):  # a speck only
        with pytest.raises(ProtocolError) as e:
            localize(engine, canvas, {"queries": ["x"], "window_sizes": [32], "crop_size": 32, "smooth": 0},
                     _no_progress, mask=mask)
        assert e.value.code == ErrorCode.BAD_PARAMS and e.value.details["reason"] == "no_valid_pixels"


def test_uniform_warnings_count_valid_pixels_and_kept_tiles_only(rng):
    canvas, mask = _bordered(rng, 50, 60, 10)
    assert uniform_image_warnings({"canvas": canvas, "canvas_mask": mask}) == []
    canvas[mask == 1] = 7  # valid pixels of one value, nodata 0 around them
    assert uniform_image_warnings({"canvas": canvas}) == []  # two values, counting the nodata
    assert any("single value" in w for w in uniform_image_warnings({"canvas": canvas, "canvas_mask": mask}))
    tiles = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    tiles[:3] = 0
    tmask = np.ones((5, 8, 8), np.uint8)
    tmask[:3] = 0
    assert uniform_image_warnings({"tiles": tiles}) == ["3 of 5 'tiles' hold a single value (nodata or blank)"]
    assert uniform_image_warnings({"tiles": tiles, "tiles_mask": tmask}) == []  # skipped, and said so elsewhere
