"""Semantic localization (SeLo, REFERENCE section 5): text query -> heatmap at canvas resolution.

1. Windows of each size (default 256, 512, 768) on two grids (offsets 0 and size/2), clamped at edges.
2. Each window resized to ``crop_size`` (256), then the model's own preprocessing.
3. Score = cosine(window embedding, text embedding).
4. Each pixel = mean score of the windows covering it (exact, see ``windows.mean_over_windows``).
5. Min-max normalised to [0, 1], then a median filter of ``smooth`` pixels.

Valid pixels (``canvas_mask``, else a 4-channel canvas's alpha; see ``masks``): windows whose valid share is
below ``min_valid`` are not encoded and do not contribute; a pixel that is invalid, or that no kept window
covers, is NaN; the statistics and the normalisation come from valid pixels, and the median ignores NaN.

The median filter runs on block means so that its kernel is about ``SMOOTH_WORK_KERNEL`` blocks (a
251-px median at full resolution would cost minutes on a large canvas), and is resized back bilinearly.
All of it is computed from the exact per-pixel means on the cells of the window-edge grid, not from
pixels: a repeat query on a large canvas costs little more than making the final map.
Window embeddings are cached by canvas content, so a second query on the same canvas only encodes text.
With a mask, the means are still exact on the cells; the valid pixels of each cell (and of each block of
the smoothing) are counted from the mask on the cell grid, and only the smoothing of a mask with a kernel
below ``SMOOTH_WORK_KERNEL`` px runs over pixels (``valid_median``: a few cells per window, not its pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.defaults import MIN_VALID_SHARE
from shared_protocol.ops import SMOOTH_WORK_KERNEL

from ..cache import content_key
from ..engine import Engine, Progress
from ..models.preprocess import value_scale
from .masks import box_shares, interval_counts, no_valid_pixels, valid_pixels
from .windows import cell_means, cells_to_pixels, selo_windows


@dataclass(frozen=True)
class CanvasRef:
    """A localize request's canvas: its id (content key of the pixels and the mask), size, value scale and
    valid pixels (None: all), and its pixels unless the request named a canvas the server holds
    (``canvas_id``) instead of sending it."""
    key: str
    height: int
    width: int
    scale: Tuple[float, float]
    pixels: Optional[np.ndarray] = None
    valid: Optional[np.ndarray] = None


def canvas_unknown(key: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_FOUND, f"the backend no longer holds canvas {key}: send the canvas again",
                         {"reason": "canvas_unknown", "canvas_id": key})


def resolve_canvas(engine: Engine, canvas: Optional[np.ndarray], params: Dict[str, Any],
                   mask: Optional[np.ndarray] = None) -> CanvasRef:
    """The request's canvas (and ``mask``, its ``canvas_mask``): the arrays sent, or the canvas and mask its
    ``canvas_id`` names (remembered in the cache, the mask as bits)."""
    value_range = params.get("value_range")
    held_key = ("canvas", tuple(value_range) if value_range else None)
    if canvas is not None:
        valid = valid_pixels({"canvas": canvas, "canvas_mask": mask}, "canvas")
        key = content_key(canvas) if valid is None else content_key(canvas, valid)
        ref = CanvasRef(key, canvas.shape[0], canvas.shape[1],
                        value_scale(canvas[None], value_range, None if valid is None else valid[None]), canvas,
                        valid)
        bits = None if valid is None else np.packbits(valid)
        engine.cache.put(held_key + (ref.key,), (ref.height, ref.width, ref.scale, bits))
        return ref
    key = params.get("canvas_id")
    if key is None:
        raise ProtocolError(ErrorCode.BAD_PARAMS, "localize needs a 'canvas' array or a 'canvas_id'",
                            {"param": "canvas_id"})
    held = engine.cache.get(held_key + (key,))
    if held is None:
        raise canvas_unknown(key)
    h, w, scale, bits = held
    valid = None if bits is None else np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)
    return CanvasRef(key, h, w, scale, None, valid)


def window_embeddings(engine: Engine, canvas: CanvasRef, sizes: Sequence[int], crop_size: Optional[int],
                      adapter: Optional[str], progress: Progress, min_valid: float = MIN_VALID_SHARE
                      ) -> Tuple[np.ndarray, torch.Tensor]:
    """The SeLo windows of the canvas with a valid share of at least ``min_valid`` and their embeddings, cached
    per canvas (and mask), window size and settings.

    The sizes not in the cache are encoded in one go, so that their windows share the model's batches.
    """
    h, w = canvas.height, canvas.width
    kept_by = None if canvas.valid is None else min_valid  # which windows are kept depends on it with a mask
    keys = {int(s): ("windows", adapter, canvas.key, canvas.scale, crop_size, int(s), kept_by) for s in sizes}
    found = {s: engine.cache.get(k) for s, k in keys.items()}
    missing = [s for s, v in found.items() if v is None]
    if missing:
        if canvas.pixels is None:  # named by id, and these windows were never encoded or were evicted
            raise canvas_unknown(canvas.key)
        boxes = [selo_windows(h, w, s) for s in missing]
        if canvas.valid is not None:
            boxes = [b[box_shares(canvas.valid, b) >= min_valid] for b in boxes]
        feats = engine.encode_windows(canvas.pixels, np.concatenate(boxes), crop_size, adapter, canvas.scale,
                                      lambda p, m: progress(0.95 * p, m))
        for s, b, f in zip(missing, boxes, torch.split(feats, [len(b) for b in boxes])):
            f = f.clone() if len(missing) > 1 else f  # its own storage, for the cache's byte count
            found[s] = (b, f)
            engine.cache.put(keys[s], found[s])
    return (np.concatenate([found[int(s)][0] for s in sizes]),
            torch.cat([found[int(s)][1] for s in sizes]))


def normalize_minmax(h: np.ndarray) -> np.ndarray:
    """(h - min) / (max - min) as float32 over the finite values (NaN stays NaN); zeros for a constant map."""
    lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
    if hi - lo <= 1e-12:
        return np.where(np.isnan(h), np.nan, 0.0).astype(np.float32)
    return ((h - lo) / (hi - lo)).astype(np.float32)


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


def run_median(values: torch.Tensor, row_lengths: np.ndarray, col_lengths: np.ndarray, size: int,
               max_elements: int = 1 << 24) -> torch.Tensor:
    """``size`` x ``size`` median (``size`` odd, edges replicated) of a piecewise-constant Q x H x W map.

    The map is ``values`` (Q x R x C) repeated over runs of ``row_lengths`` rows and ``col_lengths`` columns.
    Each window holds a few runs, so its median is a weighted median of a few values (weight: the pixels
    of each run inside the window), computed once per distinct window pattern: equal to
    ``scipy.ndimage.median_filter(mode="nearest")`` on the full map, at the cost of the runs, not the pixels.
    """
    rr, rw, row_pattern = _window_runs(row_lengths, size)
    cr, cw, col_pattern = _window_runs(col_lengths, size)
    dev = values.device
    rr, rw, cr, cw = (torch.from_numpy(a).to(dev) for a in (rr, rw, cr, cw))
    kr, kc = rr.shape[1], cr.shape[1]
    half = (size * size + 1) // 2  # the median's rank
    q = values.shape[0]
    step = max(1, max_elements // max(1, q * len(cr) * kr * kc))
    med = torch.empty((q, len(rr), len(cr)), dtype=values.dtype, device=dev)
    for a in range(0, len(rr), step):
        b = min(a + step, len(rr))
        vals = values[:, rr[a:b, :, None, None], cr[None, None]]  # Q x P x Kr x Pc x Kc
        vals = vals.permute(0, 1, 3, 2, 4).reshape(q, b - a, len(cr), kr * kc)
        weights = (rw[a:b, :, None, None] * cw[None, None]).permute(0, 2, 1, 3).reshape(b - a, len(cr), kr * kc)
        order = vals.argsort(dim=-1)
        cum = weights.expand(q, -1, -1, -1).gather(-1, order).cumsum(-1)
        pick = order.gather(-1, (cum < half).sum(-1, keepdim=True))
        med[:, a:b] = vals.gather(-1, pick)[..., 0]
    rows, cols = torch.from_numpy(row_pattern).to(dev), torch.from_numpy(col_pattern).to(dev)
    return med.index_select(2, cols).index_select(1, rows)


def _block_overlap(edges: np.ndarray, size: int, block: int) -> np.ndarray:
    """(blocks x cells) share of each block of ``block`` px covered by each cell between ``edges``.

    The map is padded to a multiple of ``block`` by repeating its last row (column): the last cell reaches
    over the padding.
    """
    padded = size + (-size) % block
    e = edges.astype(np.float64)
    e[-1] = padded
    b = np.arange(0, padded + 1, block, dtype=np.float64)
    lo = np.maximum(b[:-1, None], e[None, :-1])
    hi = np.minimum(b[1:, None], e[None, 1:])
    return np.clip(hi - lo, 0, None) / block


def _runs(rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(first row of each run of identical consecutive rows, run lengths)."""
    starts = np.flatnonzero(np.concatenate([[True], np.any(rows[1:] != rows[:-1], axis=1)]))
    return starts, np.diff(np.append(starts, len(rows)))


def render(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, height: int, width: int, kernel: int,
           device: torch.device, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Q x H x W float32 pixels of a map given on cells (``windows.cell_means``), median-smoothed.

    A ``kernel`` of ``SMOOTH_WORK_KERNEL`` px or more is applied to block means (``smooth_block`` px, blocks
    aligned to the canvas origin, computed from the cells without going through pixels), and the result is
    resized back bilinearly; smaller kernels are medians over pixels. Both medians work on runs of equal
    rows and columns (``run_median``), on ``device``, as does the resize.

    With ``valid`` (H x W bool) or NaN cells (no valid pixel, no window), see :func:`render_valid`.
    """
    if valid is not None or np.isnan(cells).any():
        return render_valid(cells, ys, xs, height, width, kernel, device, valid)
    if kernel <= 1:
        return cells_to_pixels(cells, ys, xs, height, width)
    block = smooth_block(kernel)
    if block == 1:
        out = run_median(torch.from_numpy(cells).to(device), np.diff(ys), np.diff(xs), kernel)
        return out.contiguous().cpu().numpy()
    ay, ax = _block_overlap(ys, height, block), _block_overlap(xs, width, block)
    (ry, ly), (rx, lx) = _runs(ay), _runs(ax)  # blocks in one run have the same cells: the same mean
    small = np.einsum("by,qyx,cx->qbc", ay[ry], cells.astype(np.float64), ax[rx], optimize=True)
    small = run_median(torch.from_numpy(small.astype(np.float32)).to(device), ly, lx, block_kernel(kernel))
    up = F.interpolate(small[:, None], scale_factor=block, mode="bilinear", align_corners=False)[:, 0]
    return up[:, :height, :width].contiguous().cpu().numpy()  # (cropped: contiguous before the copy out)


def nan_median(values: torch.Tensor, size: int, max_elements: int = 1 << 24) -> torch.Tensor:
    """``size`` x ``size`` median of a Q x R x C map ignoring NaN (edges replicated; of an even count, the lower
    middle value, as ``run_median`` picks); NaN where the whole window is NaN."""
    r = size // 2
    q, rows, cols = values.shape
    padded = F.pad(values[None], (r, r, r, r), mode="replicate")[0]
    out = torch.empty_like(values)
    step = max(1, max_elements // max(1, q * cols * size * size))
    for a in range(0, rows, step):
        b = min(a + step, rows)
        win = padded[:, a:b + 2 * r].unfold(1, size, 1).unfold(2, size, 1)  # Q x (b - a) x C x size x size
        out[:, a:b] = win.reshape(q, b - a, cols, size * size).nanmedian(dim=-1).values
    return out


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
                 device: torch.device, max_elements: int = 1 << 24) -> torch.Tensor:
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
    out = torch.from_numpy(cells_to_pixels(cells, ys, xs, h, w)).to(device)
    table = np.zeros((h + 2 * r + 1, w + 2 * r + 1), dtype=np.int32)
    table[1:, 1:] = np.pad(valid, r, mode="edge").cumsum(axis=0, dtype=np.int32).cumsum(axis=1, dtype=np.int32)
    table_t, values = torch.from_numpy(table).to(device), torch.from_numpy(cells).to(device)
    rows, cols = _window_cells(ys, h, size), _window_cells(xs, w, size)
    multi_r, multi_c = (rows[2] > rows[1]).sum(1) > 1, (cols[2] > cols[1]).sum(1) > 1
    for rsel, csel in ((np.flatnonzero(multi_r), np.arange(w)), (np.flatnonzero(~multi_r), np.flatnonzero(multi_c))):
        if not len(rsel) or not len(csel):
            continue
        ci, clo, chi = (torch.from_numpy(a[csel]).to(device)[None, :, None, :] for a in cols)
        q, kr, kc = values.shape[0], rows[0].shape[1], ci.shape[-1]
        step = max(1, max_elements // max(1, (q + 2) * len(csel) * kr * kc))
        cc = torch.from_numpy(csel).to(device)
        for a in range(0, len(rsel), step):
            sel = rsel[a:a + step]
            i, lo, hi = (torch.from_numpy(x[sel]).to(device)[:, None, :, None] for x in rows)
            counts = table_t[hi, chi] - table_t[lo, chi] - table_t[hi, clo] + table_t[lo, clo]
            vals = values[:, i, ci].reshape(q, len(sel), len(csel), -1)  # Q x rows x cols x cells
            finite = torch.isfinite(vals)
            weights = torch.where(finite, counts.reshape(len(sel), len(csel), -1)[None], 0)
            vals = torch.where(finite, vals, torch.inf)
            order = vals.argsort(dim=-1)
            cum = weights.gather(-1, order).cumsum(-1)
            total = cum[..., -1:]
            pick = ((cum < (total + 1) // 2).sum(-1, keepdim=True)).clamp_(max=cum.shape[-1] - 1)
            med = vals.gather(-1, order.gather(-1, pick))[..., 0]
            rr = torch.from_numpy(sel).to(device)
            out[:, rr[:, None], cc[None, :]] = torch.where(total[..., 0] > 0, med, torch.nan)
    return out


def _valid_block_means(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, valid: np.ndarray,
                       block: int) -> np.ndarray:
    """Q x By x Bx means of the valid pixels of each ``block`` px block (NaN: none), exact from the cells.

    The map is padded to whole blocks by repeating its last row (column), as :func:`render` does. The blocks
    and cells split the canvas into sub-cells, each in one cell and one block: their valid pixels are
    counted from the mask (``masks.interval_counts``), and each block's mean is the sub-cells' weighted mean.
    """
    h, w = valid.shape
    hp, wp = h + (-h) % block, w + (-w) % block
    padded = np.pad(valid, ((0, hp - h), (0, wp - w)), mode="edge") if (hp, wp) != (h, w) else valid
    sub, cell, first = [], [], []
    for edges, size in ((ys, hp), (xs, wp)):
        starts = np.union1d(edges[:-1], np.arange(0, size, block))  # all below the canvas size
        sub.append(np.append(starts, size))
        cell.append(np.searchsorted(edges, starts, side="right") - 1)
        first.append(np.searchsorted(starts, np.arange(0, size, block)))  # each block's first sub-cell
    values = cells[:, cell[0]][:, :, cell[1]].astype(np.float64)  # Q x Sy x Sx
    weights = interval_counts(padded, sub[0], sub[1]).astype(np.float64) * ~np.isnan(values[0])
    values = np.nan_to_num(values) * weights

    def block_sums(a: np.ndarray) -> np.ndarray:
        return np.add.reduceat(np.add.reduceat(a, first[1], axis=-1), first[0], axis=-2)
    total = block_sums(weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, block_sums(values) / total, np.nan).astype(np.float32)


def render_valid(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, height: int, width: int, kernel: int,
                 device: torch.device, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`render` for a map with invalid pixels (``valid``, H x W bool; None: all valid) and NaN cells
    (cells with no valid pixel or no window): NaN there, and the smoothing never lets them pull valid pixels.

    The median ignores NaN (``valid_median`` over pixels, ``nan_median`` over blocks); with blocks, each block
    is the mean of its valid pixels (exact from the cells) and the bilinear resize is normalised by the finite
    blocks it draws on.
    """
    if valid is None:
        valid = np.ones((height, width), dtype=bool)
    bad = ~valid | cells_to_pixels(np.isnan(cells[:1]), ys, xs, height, width)[0]
    block = smooth_block(kernel)
    if kernel <= 1:
        out = cells_to_pixels(cells, ys, xs, height, width)
    elif block == 1:
        out = valid_median(cells, ys, xs, valid, kernel, device).cpu().numpy()
    else:
        small = torch.from_numpy(_valid_block_means(cells, ys, xs, valid, block)).to(device)
        small = nan_median(small, block_kernel(kernel))
        finite = torch.isfinite(small)

        def up(t: torch.Tensor) -> torch.Tensor:
            t = F.interpolate(t[:, None], scale_factor=block, mode="bilinear", align_corners=False)[:, 0]
            return t[:, :height, :width]
        with np.errstate(invalid="ignore"):
            out = (up(torch.where(finite, small, 0.0)) / up(finite.float())).cpu().numpy()
    out[:, bad] = np.nan
    return np.ascontiguousarray(out, dtype=np.float32)


def valid_cell_pixels(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, valid: Optional[np.ndarray]
                      ) -> np.ndarray:
    """Ny x Nx valid pixels of each cell that some window covers (0 for the others)."""
    counts = (np.outer(np.diff(ys), np.diff(xs)) if valid is None else interval_counts(valid, ys, xs))
    return np.where(np.isnan(cells[0]), 0, counts).astype(np.float64)


def localize(engine: Engine, canvas: Union[np.ndarray, CanvasRef, None], params: Dict[str, Any],
             progress: Progress, mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Heatmaps (Q x H x W float32, NaN where invalid) and per-query statistics, with the canvas's ``canvas_id``.

    ``canvas`` is the H x W x C array (with ``mask``, its ``canvas_mask``), or None with ``params["canvas_id"]``
    naming a canvas sent before. Everything after the window scores is computed on the cells of the
    window-edge grid (exact per-pixel means, their range and mean over valid pixels, the normalisation, the
    smoothing's block means): only the final map is made at full resolution.
    """
    ref = canvas if isinstance(canvas, CanvasRef) else resolve_canvas(engine, canvas, params, mask)
    if params.get("selo_mode") == "reference":  # the original pipeline, step by step
        from .selo_reference import localize_reference
        heat, result = localize_reference(engine, ref, params, progress)
        if ref.valid is not None:  # the original has no nodata: it scores every window; the mask blanks the map
            heat[:, ~ref.valid] = np.nan
            result.setdefault("warnings", []).append(
                "selo_mode 'reference' scores every window, nodata included, as the original pipeline does; the "
                "mask only blanks the map (NaN). Use 'fast' to keep nodata out of the windows")
        return heat, result
    h, w = ref.height, ref.width
    adapter = params.get("adapter")
    sizes = sorted(set(int(s) for s in params["window_sizes"]))
    boxes, feats = window_embeddings(engine, ref, sizes, params.get("crop_size"), adapter, progress,
                                     params.get("min_valid", MIN_VALID_SHARE))
    if not len(boxes):
        raise no_valid_pixels("localize")
    texts = engine.encode_texts(params["queries"], adapter)
    scores = (feats @ texts.T).float().cpu().numpy()  # windows x queries
    cells, ys, xs = cell_means(boxes, scores, h, w)  # NaN on cells no kept window covers
    weight = valid_cell_pixels(cells, ys, xs, ref.valid)
    if not weight.any():
        raise no_valid_pixels("localize")
    cells[:, weight == 0] = np.nan  # cells without a valid pixel say nothing
    stats: List[Dict[str, Any]] = []
    for q in range(cells.shape[0]):
        stats.append({"query": params["queries"][q], "score_min": float(np.nanmin(cells[q])),
                      "score_max": float(np.nanmax(cells[q])),
                      "score_mean": float(np.nansum(cells[q] * weight) / weight.sum())})
        if params.get("normalize", True):
            cells[q] = normalize_minmax(cells[q])
    out = render(cells, ys, xs, h, w, int(params.get("smooth", 0)), engine.device, ref.valid)
    progress(1.0, "heatmaps ready")
    return out, {"windows": int(len(boxes)), "window_sizes": sizes, "queries": stats, "canvas_id": ref.key}
