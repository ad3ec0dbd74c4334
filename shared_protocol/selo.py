"""SeLo's fast mode from window scores to the map, in numpy only: the backend and the plugin both use this.

Windows are ``int64`` ``(x0, y0, x1, y1)`` boxes, end exclusive: each size on two grids (offsets 0 and
size/2), clamped at the canvas edges (:func:`selo_windows`). The per-pixel mean of the windows covering a pixel
is piecewise constant on the cells between window edges (:func:`cell_means`); everything after it works on
those cells: the min-max over valid pixels, the median smoothing (``smooth`` px; from ``SMOOTH_WORK_KERNEL``
px on, on block means of :func:`smooth_block` px resized back bilinearly) and the final map, made a range
of rows and columns at a time (:class:`MapRenderer`), so a whole raster's map never needs to be held at once.

Valid pixels (an H x W bool mask; None: all): a pixel that is invalid or that no window covers is NaN, the
median ignores NaN (weighted medians over runs of equal values), and block means are means of valid pixels.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from .ops import SMOOTH_WORK_KERNEL


# -- windows and cells ------------------------------------------------------------------------------------
def clamped_starts(dim: int, size: int, offset: int, stride: int) -> List[int]:
    """Starts ``offset, offset + stride, ...`` below ``dim``; a window past the edge moves to ``dim - size``."""
    size = min(size, dim)
    return sorted({min(start, dim - size) for start in range(offset, dim, stride)})


def selo_windows(height: int, width: int, size: int) -> np.ndarray:
    """SeLo windows of one size: two grids of stride ``size``, offsets 0 and ``size // 2`` (REFERENCE 5).

    A window larger than the canvas shrinks to the canvas along that axis.
    """
    sy, sx = min(size, height), min(size, width)
    boxes = set()
    for offset in (0, size // 2):
        for y in clamped_starts(height, size, offset, size):
            for x in clamped_starts(width, size, offset, size):
                boxes.add((x, y, x + sx, y + sy))
    return np.array(sorted(boxes, key=lambda b: (b[1], b[0])), dtype=np.int64).reshape(-1, 4)


def window_edges(boxes: np.ndarray, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ys, xs): the sorted window edges and the canvas's, the cell grid of :func:`cell_means`."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    return (np.unique(np.concatenate([boxes[:, [1, 3]].ravel(), [0, height]])),
            np.unique(np.concatenate([boxes[:, [0, 2]].ravel(), [0, width]])))


def cell_means(boxes: np.ndarray, scores: np.ndarray, height: int, width: int,
               edges: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean score of the windows covering each pixel, for Q score columns, on the grid of window edges.

    Every pixel of a cell between consecutive edges (``ys`` x ``xs``, from 0 to the canvas size) is covered
    by the same windows, so the per-pixel mean is exact on the cells: (Q x Ny x Nx float32, ys, xs), by a
    2-D difference array, O(windows + cells). Cells no window covers are NaN. ``edges``: a finer grid to use
    (it must hold every window edge), e.g. that of more windows than those scored.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(len(boxes), -1)
    ys, xs = window_edges(boxes, height, width) if edges is None else edges
    cx0, cx1 = np.searchsorted(xs, boxes[:, 0]), np.searchsorted(xs, boxes[:, 2])
    cy0, cy1 = np.searchsorted(ys, boxes[:, 1]), np.searchsorted(ys, boxes[:, 3])
    q = scores.shape[1]
    diff = np.zeros((q + 1, len(ys), len(xs)))  # the last plane counts windows
    values = np.concatenate([scores.T, np.ones((1, len(boxes)))])
    for sign, yy, xx in ((1, cy0, cx0), (-1, cy1, cx0), (-1, cy0, cx1), (1, cy1, cx1)):
        np.add.at(diff, (slice(None), yy, xx), sign * values)
    sums = diff.cumsum(axis=1).cumsum(axis=2)[:, :-1, :-1]
    counts = sums[-1]
    means = np.divide(sums[:-1], counts, out=np.full_like(sums[:-1], np.nan), where=counts > 0).astype(np.float32)
    return means, ys, xs


def cell_index(edges: np.ndarray, size: int, start: int = 0) -> np.ndarray:
    """For each pixel row (or column) ``start`` .. ``size - 1``, the cell between ``edges`` it falls in."""
    return np.searchsorted(edges, np.arange(start, size), side="right") - 1


def cells_to_pixels(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Q x Ny x Nx cell values -> Q x H x W pixels (C-contiguous: columns first, then whole rows)."""
    return np.take(np.take(cells, cell_index(xs, width), axis=2), cell_index(ys, height), axis=1)


# -- valid pixels -------------------------------------------------------------------------------------------
def interval_counts(valid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Valid pixels in each cell of the grid whose edges are ``ys`` x ``xs`` (strictly increasing, from 0 to
    the mask's height / width): an (len(ys) - 1) x (len(xs) - 1) int64 array."""
    cols = np.add.reduceat(valid.view(np.uint8), np.asarray(xs[:-1], dtype=np.intp), axis=1, dtype=np.int32)
    return np.add.reduceat(cols, np.asarray(ys[:-1], dtype=np.intp), axis=0, dtype=np.int64)


def add_region_counts(total: np.ndarray, ys: np.ndarray, xs: np.ndarray, valid: np.ndarray, row: int,
                      col: int) -> None:
    """Add the valid pixels of a region (``valid``, h x w, at ``row``, ``col`` of the canvas) to ``total``, the
    counts of the cells of the canvas grid ``ys`` x ``xs``: a canvas's counts, one region at a time."""
    h, w = valid.shape
    ly = np.union1d(ys[(ys > row) & (ys < row + h)], [row, row + h])
    lx = np.union1d(xs[(xs > col) & (xs < col + w)], [col, col + w])
    counts = interval_counts(valid, ly - row, lx - col)
    iy = np.searchsorted(ys, ly[:-1], side="right") - 1
    ix = np.searchsorted(xs, lx[:-1], side="right") - 1
    np.add.at(total, (iy[:, None], ix[None, :]), counts)


def box_counts(valid: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Valid pixels in each ``(x0, y0, x1, y1)`` box (end exclusive) of an H x W mask."""
    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    h, w = valid.shape
    xs = np.unique(np.concatenate([boxes[:, [0, 2]].ravel(), [0, w]]))
    ys = np.unique(np.concatenate([boxes[:, [1, 3]].ravel(), [0, h]]))
    table = np.zeros((len(ys), len(xs)), dtype=np.int64)  # summed-area table of the cells
    table[1:, 1:] = interval_counts(valid, ys, xs).cumsum(axis=0).cumsum(axis=1)
    x0, x1 = np.searchsorted(xs, boxes[:, 0]), np.searchsorted(xs, boxes[:, 2])
    y0, y1 = np.searchsorted(ys, boxes[:, 1]), np.searchsorted(ys, boxes[:, 3])
    return table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]


def box_shares(valid: Optional[np.ndarray], boxes: np.ndarray) -> np.ndarray:
    """The valid share of each box over a canvas (all 1 when ``valid`` is None)."""
    if valid is None:
        return np.ones(len(boxes))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return box_counts(valid, boxes) / np.maximum(area, 1)


def cell_areas(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Pixels in each cell (every pixel valid)."""
    return np.outer(np.diff(ys), np.diff(xs)).astype(np.int64)


# -- normalisation ------------------------------------------------------------------------------------------
def normalize_minmax(h: np.ndarray) -> np.ndarray:
    """(h - min) / (max - min) as float32 over the finite values (NaN stays NaN); zeros for a constant map."""
    lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
    if hi - lo <= 1e-12:
        return np.where(np.isnan(h), np.nan, 0.0).astype(np.float32)
    return ((h - lo) / (hi - lo)).astype(np.float32)


def score_stats(cells: np.ndarray, counts: np.ndarray) -> List[dict]:
    """Per query: min, max and pixel-weighted mean of the cells that hold valid pixels (``counts``: valid pixels
    per cell). ``cells`` must already be NaN where ``counts`` is 0."""
    weight = counts.astype(np.float64)
    return [{"score_min": float(np.nanmin(c)), "score_max": float(np.nanmax(c)),
             "score_mean": float(np.nansum(c * weight) / weight.sum())} for c in cells]


# -- smoothing ----------------------------------------------------------------------------------------------
def smooth_block(kernel: int) -> int:
    """The block size (px) the median filter of ``kernel`` px works on."""
    return max(1, kernel // SMOOTH_WORK_KERNEL)


def block_kernel(kernel: int) -> int:
    """The median's size in blocks (odd) for a ``kernel``-px median."""
    return max(1, round(kernel / smooth_block(kernel))) | 1


def _window_runs(lengths: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a ``size``-long median window (edges replicated) sliding over runs of ``lengths`` positions:
    the distinct (runs, counts) patterns it sees, as (P x K run ids, P x K counts, per-position pattern)."""
    n, r = int(lengths.sum()), size // 2
    run_of = np.repeat(np.arange(len(lengths)), lengths)
    ids = run_of[np.clip(np.arange(n)[:, None] + np.arange(-r, r + 1)[None], 0, n - 1)]  # n x size, sorted
    first, last = ids[:, 0], ids[:, -1]
    k = int((last - first).max()) + 1
    runs = first[:, None] + np.arange(k)[None]
    counts = np.where(runs <= last[:, None], (ids[:, :, None] == runs[:, None, :]).sum(1), 0)
    patterns, inverse = np.unique(np.concatenate([np.minimum(runs, len(lengths) - 1), counts], axis=1), axis=0,
                                  return_inverse=True)
    return patterns[:, :k], patterns[:, k:], inverse.reshape(-1)


def _weighted_median(vals: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The lower weighted median along the last axis, ignoring NaN values; NaN where no weight is left."""
    finite = np.isfinite(vals)
    weights = np.where(finite, weights, 0)
    vals = np.where(finite, vals, np.inf)
    order = np.argsort(vals, axis=-1, kind="stable")
    cum = np.take_along_axis(weights, order, -1).cumsum(-1)
    total = cum[..., -1:]
    pick = np.minimum((cum < (total + 1) // 2).sum(-1, keepdims=True), vals.shape[-1] - 1)
    med = np.take_along_axis(vals, np.take_along_axis(order, pick, -1), -1)[..., 0]
    return np.where(total[..., 0] > 0, med, np.nan)


def run_median(values: np.ndarray, row_lengths: np.ndarray, col_lengths: np.ndarray, size: int,
               max_elements: int = 1 << 20) -> np.ndarray:
    """``size`` x ``size`` median (``size`` odd, edges replicated, NaN ignored; of an even count the lower middle
    value) of a Q x H x W map given as ``values`` (Q x R x C) repeated over runs of ``row_lengths`` rows and
    ``col_lengths`` columns.

    Each window holds a few runs, so its median is a weighted median of a few values (weight: the pixels of
    each run inside the window), computed once per distinct window pattern: equal to
    ``scipy.ndimage.median_filter(mode="nearest")`` on the full map (without NaN), at the cost of the runs.
    """
    rr, rw, row_pattern = _window_runs(np.asarray(row_lengths), size)
    cr, cw, col_pattern = _window_runs(np.asarray(col_lengths), size)
    kr, kc = rr.shape[1], cr.shape[1]
    q = values.shape[0]
    step = max(1, max_elements // max(1, q * len(cr) * kr * kc))
    med = np.empty((q, len(rr), len(cr)), dtype=values.dtype)
    for a in range(0, len(rr), step):
        b = min(a + step, len(rr))
        vals = values[:, rr[a:b, :, None, None], cr[None, None]]  # Q x P x Kr x Pc x Kc
        vals = vals.transpose(0, 1, 3, 2, 4).reshape(q, b - a, len(cr), kr * kc)
        weights = (rw[a:b, :, None, None] * cw[None, None]).transpose(0, 2, 1, 3).reshape(b - a, len(cr), kr * kc)
        med[:, a:b] = _weighted_median(vals, np.broadcast_to(weights, vals.shape))
    return med[:, row_pattern][:, :, col_pattern]


def _runs(rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(first row of each run of identical consecutive rows (NaN equal to NaN), run lengths)."""
    same = (rows[1:] == rows[:-1]) | (np.isnan(rows[1:]) & np.isnan(rows[:-1]))
    starts = np.flatnonzero(np.concatenate([[True], ~np.all(same, axis=1)]))
    return starts, np.diff(np.append(starts, len(rows)))


def nan_median(values: np.ndarray, size: int, max_elements: int = 1 << 20) -> np.ndarray:
    """``size`` x ``size`` median of a Q x R x C map ignoring NaN (edges replicated; of an even count the lower
    middle value); NaN where the whole window is NaN. Runs of equal rows and columns are medianed once."""
    q, rows, cols = values.shape
    ry, ly = _runs(values.transpose(1, 0, 2).reshape(rows, -1))
    rx, lx = _runs(values.transpose(2, 0, 1).reshape(cols, -1))
    return run_median(values[:, ry][:, :, rx], ly, lx, size, max_elements)


def _window_cells(edges: np.ndarray, n: int, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a ``size``-long window (edges replicated: ``size // 2`` positions of padding each side) centred on
    each position 0 .. n - 1: the K cells it reaches (n x K ids) and the bounds of its part of each, in padded
    coordinates (n x K lo, hi; empty parts have lo == hi)."""
    r = size // 2
    padded = edges.astype(np.int64) + r
    padded[0], padded[-1] = 0, n + 2 * r  # the padding belongs to the edge cells
    pos = np.arange(n)
    first = np.searchsorted(padded, pos, side="right") - 1
    last = np.searchsorted(padded, pos + size - 1, side="right") - 1
    ids = first[:, None] + np.arange(int((last - first).max()) + 1)[None]
    inside = ids <= last[:, None]
    ids = np.minimum(ids, len(edges) - 2)
    lo = np.maximum(pos[:, None], padded[ids])
    hi = np.where(inside, np.minimum(pos[:, None] + size, padded[ids + 1]), lo)
    return ids, lo, hi


def valid_median(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, valid: np.ndarray, size: int,
                 max_elements: int = 1 << 20) -> np.ndarray:
    """``size`` x ``size`` median over the valid pixels of a map piecewise constant on cells (NaN cells count
    as invalid), edges replicated, at the valid pixels: :func:`nan_median` of the full map there, without
    going through its windows (invalid pixels get their cell's value: the caller masks them).

    A window inside one cell has that cell's value (the valid pixel it is centred on is in it). Elsewhere
    (near cell edges) the valid pixels of the window's part of each cell come from a summed-area table of
    the mask, and the median is the weighted (lower) median of those cells' values: the cost is the pixels
    near cell edges times the cells per window, not pixels x ``size`` squared.
    """
    r = size // 2
    h, w = valid.shape
    out = cells_to_pixels(cells, ys, xs, h, w)
    table = np.zeros((h + 2 * r + 1, w + 2 * r + 1), dtype=np.int32)
    table[1:, 1:] = np.pad(valid, r, mode="edge").cumsum(axis=0, dtype=np.int32).cumsum(axis=1, dtype=np.int32)
    rows, cols = _window_cells(ys, h, size), _window_cells(xs, w, size)
    multi_r, multi_c = (rows[2] > rows[1]).sum(1) > 1, (cols[2] > cols[1]).sum(1) > 1
    q = cells.shape[0]
    for rsel, csel in ((np.flatnonzero(multi_r), np.arange(w)), (np.flatnonzero(~multi_r), np.flatnonzero(multi_c))):
        if not len(rsel) or not len(csel):
            continue
        ci, clo, chi = (a[csel][None, :, None, :] for a in cols)
        kr, kc = rows[0].shape[1], ci.shape[-1]
        step = max(1, max_elements // max(1, (q + 2) * len(csel) * kr * kc))
        for a in range(0, len(rsel), step):
            sel = rsel[a:a + step]
            i, lo, hi = (x[sel][:, None, :, None] for x in rows)
            counts = table[hi, chi] - table[lo, chi] - table[hi, clo] + table[lo, clo]  # rows x cols x Kr x Kc
            vals = cells[:, i, ci].reshape(q, len(sel), len(csel), -1)
            weights = np.broadcast_to(counts.reshape(len(sel), len(csel), -1)[None], vals.shape)
            out[:, sel[:, None], csel[None, :]] = _weighted_median(vals, weights)
    return out


# -- blocks of the smoothing ---------------------------------------------------------------------------------
class SubcellGrid(NamedTuple):
    """The canvas, padded to whole smoothing blocks by repeating its last row (column), cut by both the cell
    edges and the block edges: each sub-cell lies in one cell and one block."""

    ys: np.ndarray  # sub-cell edges, 0 .. padded height
    xs: np.ndarray
    cell_y: np.ndarray  # the cell of each sub-cell row (column)
    cell_x: np.ndarray
    first_y: np.ndarray  # each block's first sub-cell row (column)
    first_x: np.ndarray

    @classmethod
    def of(cls, ys: np.ndarray, xs: np.ndarray, height: int, width: int, block: int) -> "SubcellGrid":
        parts = []
        for edges, size in ((ys, height), (xs, width)):
            padded = size + (-size) % block
            starts = np.union1d(edges[:-1], np.arange(0, padded, block))  # all below the canvas size
            parts.append((np.append(starts, padded), np.searchsorted(edges, starts, side="right") - 1,
                          np.searchsorted(starts, np.arange(0, padded, block))))
        (sy, cy, fy), (sx, cx, fx) = parts
        return cls(sy, sx, cy, cx, fy, fx)

    def counts(self, valid: Optional[np.ndarray]) -> np.ndarray:
        """Valid pixels of each sub-cell (None: all valid; the padding repeats the last row and column)."""
        if valid is None:
            return cell_areas(self.ys, self.xs)
        hp, wp = int(self.ys[-1]), int(self.xs[-1])
        h, w = valid.shape
        padded = np.pad(valid, ((0, hp - h), (0, wp - w)), mode="edge") if (hp, wp) != (h, w) else valid
        return interval_counts(padded, self.ys, self.xs)

    def block_means(self, cells: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Q x By x Bx means of the valid pixels of each block (NaN: none), exact from the cells and the valid
        pixels of each sub-cell (``counts``)."""
        values = cells[:, self.cell_y][:, :, self.cell_x].astype(np.float64)  # Q x Sy x Sx
        weights = counts.astype(np.float64) * ~np.isnan(values[0])
        values = np.nan_to_num(values) * weights

        def block_sums(a: np.ndarray) -> np.ndarray:
            return np.add.reduceat(np.add.reduceat(a, self.first_x, axis=-1), self.first_y, axis=-2)
        total = block_sums(weights)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, block_sums(values) / total, np.nan).astype(np.float32)


def _linear(n_out: int, n_in: int, scale: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resize by ``scale`` along one axis as ``torch.nn.functional.interpolate(align_corners=False)``:
    for each output position, its two inputs and the second one's weight."""
    src = np.maximum((np.arange(n_out) + 0.5) / scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def _widen(r: np.ndarray, scale: int, col0: int, col1: int) -> np.ndarray:
    """Columns ``col0`` .. ``col1`` of ``r`` (... x Bx) resized ``scale`` times along its last axis, as
    :func:`_linear` says, without gathers: output column ``scale * k + m`` blends input columns ``k - 1`` and
    ``k`` (``m`` below ``scale / 2``) or ``k`` and ``k + 1``, edges replicated, with weights that depend on
    ``m`` only."""
    k0, k1 = col0 // scale, -(-col1 // scale)
    padded = np.concatenate([r[..., :1], r, r[..., -1:]], axis=-1)  # padded[k + 1] = r[k], edges repeated
    m = (np.arange(scale) + 0.5) / scale  # where output column m of a block falls in it
    half = int((m < 0.5).sum())
    f = np.where(m < 0.5, m + 0.5, m - 0.5).astype(np.float32)
    a, b, c = (padded[..., k0 + i:k1 + i] for i in range(3))
    counts = [half, scale - half]  # lo + (hi - lo) f: (a, b) for the first half of a block, (b, c) after
    out = np.repeat(np.stack([b - a, c - b], axis=-1), counts, axis=-1)
    out *= f
    out += np.repeat(np.stack([a, b], axis=-1), counts, axis=-1)
    if k0 == 0:  # torch clamps the source below 0 to 0: the first half block is the first column exactly
        out[..., 0, :half] = r[..., :1]
    flat = out.reshape(r.shape[:-1] + ((k1 - k0) * scale,))
    return flat[..., col0 - k0 * scale:col1 - k0 * scale]


def upsample(small: np.ndarray, block: int, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
    """Rows ``row0`` .. ``row1`` and columns ``col0`` .. ``col1`` of the Q x By x Bx block map resized ``block``
    times bilinearly, normalised by the finite blocks each pixel draws on (NaN blocks never pull; NaN where
    all four are NaN). Columns ``col1`` may reach ``block * Bx``."""
    i0, i1, fy = _linear(row1, small.shape[1], block)
    i0, i1, fy = i0[row0:], i1[row0:], fy[row0:, None]

    def resize(a: np.ndarray) -> np.ndarray:
        return _widen(a[:, i0] * (1 - fy) + a[:, i1] * fy, block, col0, col1)  # rows (small), then columns
    finite = np.isfinite(small)
    if finite.all():
        return resize(small.astype(np.float32))
    with np.errstate(invalid="ignore", divide="ignore"):
        return resize(np.where(finite, small, 0.0).astype(np.float32)) / resize(finite.astype(np.float32))


class MapRenderer:
    """The final map of SeLo's fast mode from (normalised) cells, a box of rows and columns at a time.

    ``kernel`` <= 1: the cells as they are. Below ``SMOOTH_WORK_KERNEL`` px: a median over the valid pixels
    (:func:`valid_median`, needs ``valid``, the whole mask). From it on: a median of ``block_kernel`` blocks
    over the valid pixels' block means (from ``subcell_counts``, the valid pixels of each sub-cell of
    ``SubcellGrid.of(ys, xs, height, width, smooth_block(kernel))``, or from ``valid``), resized back
    bilinearly. :meth:`rows` makes the pixels; invalid pixels and cells no window covers are NaN.
    """

    def __init__(self, cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, height: int, width: int, kernel: int,
                 valid: Optional[np.ndarray] = None, subcell_counts: Optional[np.ndarray] = None):
        self.cells, self.ys, self.xs, self.height, self.width = cells, ys, xs, height, width
        self.kernel, self.block = int(kernel), smooth_block(int(kernel))
        self.covered = ~np.isnan(cells[0])
        self.full: Optional[np.ndarray] = None
        self.small: Optional[np.ndarray] = None
        if self.kernel <= 1:
            return
        if self.block == 1:
            mask = np.ones((height, width), bool) if valid is None else valid
            self.full = valid_median(cells, ys, xs, mask, self.kernel)
            return
        grid = SubcellGrid.of(ys, xs, height, width, self.block)
        counts = grid.counts(valid) if subcell_counts is None else subcell_counts
        self.small = nan_median(grid.block_means(cells, counts), block_kernel(self.kernel))

    def rows(self, row0: int, row1: int, valid: Optional[np.ndarray] = None, col0: int = 0,
             col1: Optional[int] = None) -> np.ndarray:
        """Q x (row1 - row0) x (col1 - col0) float32 pixels (columns: all by default); ``valid``: their mask
        (None: all valid)."""
        col1 = self.width if col1 is None else col1
        cols, rows = cell_index(self.xs, col1, col0), cell_index(self.ys, row1, row0)
        if self.small is not None:
            out = upsample(self.small, self.block, row0, row1, col0, col1)
        elif self.full is not None:
            out = self.full[:, row0:row1, col0:col1]
        else:
            out = np.take(np.take(self.cells, cols, axis=2), rows, axis=1)
        covered = np.take(np.take(self.covered, cols, axis=1), rows, axis=0)
        bad = ~covered if valid is None else ~(covered & valid)
        out = (np.array(out, dtype=np.float32, order="C") if self.full is not None  # a view of self.full: copied
               else np.ascontiguousarray(out, dtype=np.float32))
        if bad.any():
            out[:, bad] = np.nan
        return out


def render(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, height: int, width: int, kernel: int,
           valid: Optional[np.ndarray] = None) -> np.ndarray:
    """The whole Q x H x W map of :class:`MapRenderer` at once."""
    return MapRenderer(cells, ys, xs, height, width, kernel, valid).rows(0, height, valid)
