"""Semantic localization (SeLo, REFERENCE section 5): text query -> heatmap at canvas resolution.

1. Windows of each size (default 256, 512, 768) on two grids (offsets 0 and size/2), clamped at edges.
2. Each window resized to ``crop_size`` (256), then the model's own preprocessing.
3. Score = cosine(window embedding, text embedding).
4. Each pixel = mean score of the windows covering it (exact, see ``windows.mean_over_windows``).
5. Min-max normalised to [0, 1], then a median filter of ``smooth`` pixels.

The median filter runs on block means so that its kernel is about ``SMOOTH_WORK_KERNEL`` blocks (a
251-px median at full resolution would cost minutes on a large canvas), and is resized back bilinearly.
All of it is computed from the exact per-pixel means on the cells of the window-edge grid, not from
pixels: a repeat query on a large canvas costs little more than making the final map.
Window embeddings are cached by canvas content, so a second query on the same canvas only encodes text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.ops import SMOOTH_WORK_KERNEL

from ..cache import content_key
from ..engine import Engine, Progress
from ..models.preprocess import value_scale
from .windows import cell_means, cells_to_pixels, selo_windows


@dataclass(frozen=True)
class CanvasRef:
    """A localize request's canvas: its id (content key), size and value scale, and its pixels unless the
    request named a canvas the server holds (``canvas_id``) instead of sending it."""
    key: str
    height: int
    width: int
    scale: Tuple[float, float]
    pixels: Optional[np.ndarray] = None


def canvas_unknown(key: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_FOUND, f"the backend no longer holds canvas {key}: send the canvas again",
                         {"reason": "canvas_unknown", "canvas_id": key})


def resolve_canvas(engine: Engine, canvas: Optional[np.ndarray], params: Dict[str, Any]) -> CanvasRef:
    """The request's canvas: the array sent, or the one its ``canvas_id`` names (remembered in the cache)."""
    value_range = params.get("value_range")
    held_key = ("canvas", tuple(value_range) if value_range else None)
    if canvas is not None:
        ref = CanvasRef(content_key(canvas), canvas.shape[0], canvas.shape[1],
                        value_scale(canvas[None], value_range), canvas)
        engine.cache.put(held_key + (ref.key,), (ref.height, ref.width, ref.scale))
        return ref
    key = params.get("canvas_id")
    if key is None:
        raise ProtocolError(ErrorCode.BAD_PARAMS, "localize needs a 'canvas' array or a 'canvas_id'",
                            {"param": "canvas_id"})
    held = engine.cache.get(held_key + (key,))
    if held is None:
        raise canvas_unknown(key)
    return CanvasRef(key, *held)


def window_embeddings(engine: Engine, canvas: CanvasRef, sizes: Sequence[int], crop_size: Optional[int],
                      adapter: Optional[str], progress: Progress) -> Tuple[np.ndarray, torch.Tensor]:
    """All SeLo windows of the canvas and their embeddings, cached per canvas, window size and settings.

    The sizes not in the cache are encoded in one go, so that their windows share the model's batches.
    """
    h, w = canvas.height, canvas.width
    keys = {int(s): ("windows", adapter, canvas.key, canvas.scale, crop_size, int(s)) for s in sizes}
    found = {s: engine.cache.get(k) for s, k in keys.items()}
    missing = [s for s, v in found.items() if v is None]
    if missing:
        if canvas.pixels is None:  # named by id, and these windows were never encoded or were evicted
            raise canvas_unknown(canvas.key)
        boxes = [selo_windows(h, w, s) for s in missing]
        feats = engine.encode_windows(canvas.pixels, np.concatenate(boxes), crop_size, adapter, canvas.scale,
                                      lambda p, m: progress(0.95 * p, m))
        for s, b, f in zip(missing, boxes, torch.split(feats, [len(b) for b in boxes])):
            f = f.clone() if len(missing) > 1 else f  # its own storage, for the cache's byte count
            found[s] = (b, f)
            engine.cache.put(keys[s], found[s])
    return (np.concatenate([found[int(s)][0] for s in sizes]),
            torch.cat([found[int(s)][1] for s in sizes]))


def normalize_minmax(h: np.ndarray) -> np.ndarray:
    """(h - min) / (max - min) as float32; all zeros for a constant map."""
    lo, hi = float(h.min()), float(h.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(h, dtype=np.float32)
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
           device: torch.device) -> np.ndarray:
    """Q x H x W float32 pixels of a map given on cells (``windows.cell_means``), median-smoothed.

    A ``kernel`` of ``SMOOTH_WORK_KERNEL`` px or more is applied to block means (``smooth_block`` px, blocks
    aligned to the canvas origin, computed from the cells without going through pixels), and the result is
    resized back bilinearly; smaller kernels are medians over pixels. Both medians work on runs of equal
    rows and columns (``run_median``), on ``device``, as does the resize.
    """
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


def localize(engine: Engine, canvas: Union[np.ndarray, CanvasRef, None], params: Dict[str, Any],
             progress: Progress) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Heatmaps (Q x H x W float32) and per-query statistics, with the canvas's ``canvas_id``.

    ``canvas`` is the H x W x C array, or None with ``params["canvas_id"]`` naming a canvas sent before.
    Everything after the window scores is computed on the cells of the window-edge grid (exact per-pixel
    means, their range and mean, the normalisation, the smoothing's block means): only the final map is
    made at full resolution.
    """
    ref = canvas if isinstance(canvas, CanvasRef) else resolve_canvas(engine, canvas, params)
    if params.get("selo_mode") == "reference":  # the original pipeline, step by step
        from .selo_reference import localize_reference
        return localize_reference(engine, ref, params, progress)
    h, w = ref.height, ref.width
    adapter = params.get("adapter")
    sizes = sorted(set(int(s) for s in params["window_sizes"]))
    boxes, feats = window_embeddings(engine, ref, sizes, params.get("crop_size"), adapter, progress)
    texts = engine.encode_texts(params["queries"], adapter)
    scores = (feats @ texts.T).float().cpu().numpy()  # windows x queries
    cells, ys, xs = cell_means(boxes, scores, h, w)
    area = np.outer(np.diff(ys), np.diff(xs)).astype(np.float64)
    stats: List[Dict[str, Any]] = []
    for q in range(cells.shape[0]):
        stats.append({"query": params["queries"][q], "score_min": float(cells[q].min()),
                      "score_max": float(cells[q].max()), "score_mean": float((cells[q] * area).sum() / (h * w))})
        if params.get("normalize", True):
            cells[q] = normalize_minmax(cells[q])
    out = render(cells, ys, xs, h, w, int(params.get("smooth", 0)), engine.device)
    progress(1.0, "heatmaps ready")
    return out, {"windows": int(len(boxes)), "window_sizes": sizes, "queries": stats, "canvas_id": ref.key}
