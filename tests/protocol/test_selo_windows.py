"""localize with explicit windows on the wire (the 'windows' array, the 'scores' reply) and shared_protocol.selo, the
numpy-only SeLo map both sides run, against brute-force pixel computations (under both interpreters)."""
import subprocess
import sys
import warnings

import numpy as np
import pytest

from shared_protocol import ErrorCode, ProtocolError, Request, decode_request
from shared_protocol.client import Client
from shared_protocol.ops import (MAX_WINDOWS, SCORES_ARRAY, WINDOWS_ARRAY, window_boxes_problem,
                                 window_scores_problem)
from shared_protocol.selo import (MapRenderer, SubcellGrid, add_region_counts, block_kernel, cell_means,
                                  interval_counts, render, selo_windows, smooth_block)
from stubs import running_server


def test_the_windows_array_is_int32_n_by_4():
    canvas = np.zeros((10, 12, 3), np.uint8)
    ok = decode_request(Request("localize", "r", {"queries": ["a"]},
                                {"canvas": canvas, WINDOWS_ARRAY: np.array([[0, 0, 4, 4]], np.int32)}).encode())
    assert ok.arrays[WINDOWS_ARRAY].dtype == np.int32
    for bad in (np.array([[0, 0, 4, 4]], np.int64), np.array([0, 0, 4, 4], np.int32)):
        with pytest.raises(ProtocolError) as e:
            decode_request(Request("localize", "r", {"queries": ["a"]},
                                   {"canvas": canvas, WINDOWS_ARRAY: bad}).encode())
        assert e.value.code == ErrorCode.BAD_ARRAY


@pytest.mark.parametrize("boxes, problem", [
    (np.array([[0, 0, 12, 10]]), None),
    (np.array([[0, 0, 13, 10]]), "outside"),
    (np.array([[0, -1, 12, 10]]), "outside"),
    (np.array([[3, 3, 3, 5]]), "empty"),
    (np.zeros((0, 4)), "N x 4"),
    (np.zeros((3, 2)), "N x 4"),
    (np.zeros((MAX_WINDOWS + 1, 4)), "N x 4"),
])
def test_window_boxes_problem(boxes, problem):
    got = window_boxes_problem(boxes, 10, 12)
    assert got is None if problem is None else problem in got


def test_window_scores_problem():
    assert window_scores_problem(np.zeros((2, 5), np.float32), 2, 5) is None
    for bad in (np.zeros((2, 5)), np.zeros((5, 2), np.float32), np.zeros((2, 4), np.float32), None):
        assert "float32" in window_scores_problem(bad, 2, 5)


def test_the_client_sends_the_windows_with_the_canvas_and_with_its_id(addr):
    from stubs import CanvasService
    service = CanvasService()
    canvas = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 30, 20]])
    with running_server(addr, service), Client(addr, timeout=5) as c:
        first = c.localize(canvas, ["q", "r"], windows=boxes)
        again = c.localize(canvas.copy(), ["q"], windows=boxes)
    assert service.sent == [True, False]  # the second time only the id, the windows both times
    assert all(np.array_equal(w, boxes) and w.dtype == np.int32 for w in service.windows)
    sums = [canvas[y0:y1, x0:x1, 0].sum() for x0, y0, x1, y1 in boxes]
    np.testing.assert_array_equal(first.arrays[SCORES_ARRAY], [sums, sums])
    np.testing.assert_array_equal(again.arrays[SCORES_ARRAY], [sums])


def test_selo_imports_numpy_only():
    code = ("import sys, shared_protocol.selo; bad = {'torch', 'scipy', 'cv2'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the map, against brute force over pixels ---------------------------------------------------------------
def _scene(rng, h=70, w=90, sizes=(12, 20)):
    boxes = np.concatenate([selo_windows(h, w, s) for s in sizes])
    valid = np.ones((h, w), bool)
    valid[:9] = False
    valid[30:45, 50:80] = False
    keep = np.array([valid[y0:y1, x0:x1].mean() >= 0.5 for x0, y0, x1, y1 in boxes])
    scores = rng.normal(size=(int(keep.sum()), 2))
    return boxes[keep], scores, valid


def _pixel_means(boxes, scores, valid):
    total, count = np.zeros((scores.shape[1],) + valid.shape), np.zeros(valid.shape)
    for (x0, y0, x1, y1), s in zip(boxes, scores, strict=True):
        total[:, y0:y1, x0:x1] += s[:, None, None]
        count[y0:y1, x0:x1] += 1
    return np.where(valid & (count > 0), total / np.maximum(count, 1), np.nan)


def _lower_nanmedian(values, size):
    """Brute force: the size x size median of each pixel's window (edges replicated), NaN ignored, lower middle."""
    r = size // 2
    q, h, w = values.shape
    padded = np.pad(values, ((0, 0), (r, r), (r, r)), mode="edge")
    out = np.full(values.shape, np.nan)
    for y in range(h):
        for x in range(w):
            for k in range(q):
                v = np.sort(padded[k, y:y + size, x:x + size].ravel())
                v = v[np.isfinite(v)]
                if len(v):
                    out[k, y, x] = v[(len(v) - 1) // 2]
    return out


def _bilinear_normalised(small, block, h, w):
    """Brute force of torch's bilinear (align_corners=False) resize, normalised by the finite inputs."""
    q, by, bx = small.shape
    out = np.zeros((q, h, w))
    for y in range(h):
        sy = max((y + 0.5) / block - 0.5, 0.0)
        y0 = min(int(sy), by - 1)
        y1, fy = min(y0 + 1, by - 1), sy - y0
        for x in range(w):
            sx = max((x + 0.5) / block - 0.5, 0.0)
            x0 = min(int(sx), bx - 1)
            x1, fx = min(x0 + 1, bx - 1), sx - x0
            num = den = 0.0
            for yy, wy in ((y0, 1 - fy), (y1, fy)):
                for xx, wx in ((x0, 1 - fx), (x1, fx)):
                    v = small[:, yy, xx]
                    num = num + np.where(np.isfinite(v), v, 0) * wy * wx
                    den = den + np.isfinite(v[0]) * wy * wx
            out[:, y, x] = num / den if den > 0 else np.nan
    return out


@pytest.mark.parametrize("kernel", [0, 5, 45])
def test_the_map_equals_brute_force_over_pixels(kernel):
    rng = np.random.default_rng(3)
    h, w = 70, 90
    boxes, scores, valid = _scene(rng, h, w)
    pixels = _pixel_means(boxes, scores, valid)
    cells, ys, xs = cell_means(boxes, scores, h, w)
    cells[:, interval_counts(valid, ys, xs) == 0] = np.nan
    got = render(cells, ys, xs, h, w, kernel, valid)
    if kernel <= 1:
        expected = pixels
    elif smooth_block(kernel) == 1:
        expected = _lower_nanmedian(pixels, kernel)
    else:
        block = smooth_block(kernel)
        hp, wp = h + (-h) % block, w + (-w) % block
        padded = np.pad(pixels, ((0, 0), (0, hp - h), (0, wp - w)), mode="edge")
        blocks = padded.reshape(2, hp // block, block, wp // block, block)
        with warnings.catch_warnings():  # blocks without a valid pixel: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            small = np.nanmean(blocks, axis=(2, 4))
        expected = _bilinear_normalised(_lower_nanmedian(small, block_kernel(kernel)), block, h, w)
    expected[:, ~valid | np.isnan(pixels[0])] = np.nan
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("kernel", [0, 5, 45])
def test_rows_at_a_time_and_counts_by_regions_equal_the_whole(kernel):
    """What the plugin does: sub-cell counts added region by region (the smoothing's padding repeating the last
    row and column), the map made a block at a time: the same as the whole canvas at once."""
    rng = np.random.default_rng(4)
    h, w = 70, 90
    boxes, scores, valid = _scene(rng, h, w)
    cells, ys, xs = cell_means(boxes, scores, h, w)
    cells[:, interval_counts(valid, ys, xs) == 0] = np.nan
    whole = render(cells, ys, xs, h, w, kernel, valid)
    counts = np.zeros((len(ys) - 1, len(xs) - 1), np.int64)
    grid = SubcellGrid.of(ys, xs, h, w, max(2, smooth_block(kernel)))
    sub = np.zeros((len(grid.ys) - 1, len(grid.xs) - 1), np.int64)
    for r0 in range(0, h, 25):
        for c0 in range(0, w, 40):
            inner = valid[r0:r0 + 25, c0:c0 + 40]
            add_region_counts(counts, ys, xs, inner, r0, c0)
            pad = ((0, int(grid.ys[-1]) - h if r0 + 25 >= h else 0), (0, int(grid.xs[-1]) - w if c0 + 40 >= w else 0))
            add_region_counts(sub, grid.ys, grid.xs, np.pad(inner, pad, mode="edge"), r0, c0)
    assert np.array_equal(counts, interval_counts(valid, ys, xs))
    assert np.array_equal(sub, grid.counts(valid))
    renderer = MapRenderer(cells, ys, xs, h, w, kernel, valid if 1 < kernel < 15 else None,
                           sub if smooth_block(kernel) > 1 else None)
    pieces = np.concatenate([np.concatenate([renderer.rows(r, min(h, r + 25), valid[r:r + 25, c:c + 40], c,
                                                           min(w, c + 40)) for c in range(0, w, 40)], axis=2)
                             for r in range(0, h, 25)], axis=1)
    np.testing.assert_array_equal(pieces, whole)
