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


def median_filter(x: torch.Tensor, size: int, max_elements: int = 1 << 25) -> torch.Tensor:
    """``size`` x ``size`` median (``size`` odd) of each Q x H x W plane, edges replicated, on x's device.

    Equals ``scipy.ndimage.median_filter(mode="nearest")``; rows are done in chunks of bounded memory.
    """
    if size <= 1:
        return x
    r = size // 2
    padded = F.pad(x[:, None], (r, r, r, r), mode="replicate")[:, 0]
    q, h, w = x.shape
    rows = max(1, max_elements // max(1, q * w * size * size))
    out = torch.empty_like(x)
    for y in range(0, h, rows):
        part = padded[:, y:y + min(rows, h - y) + 2 * r].unfold(1, size, 1).unfold(2, size, 1)
        out[:, y:y + part.shape[1]] = part.reshape(*part.shape[:3], -1).median(dim=-1).values
    return out


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


def render(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, height: int, width: int, kernel: int,
           device: torch.device) -> np.ndarray:
    """Q x H x W float32 pixels of a map given on cells (``windows.cell_means``), median-smoothed.

    A ``kernel`` of ``SMOOTH_WORK_KERNEL`` px or more is applied to block means (``smooth_block`` px, blocks
    aligned to the canvas origin, computed from the cells without going through pixels), and the result is
    resized back bilinearly; block means, median and resize run on ``device``. Smaller kernels are exact
    medians over pixels.
    """
    block = smooth_block(kernel)
    if kernel <= 1 or block == 1:
        pixels = cells_to_pixels(cells, ys, xs, height, width)
        if kernel <= 1:
            return pixels
        return median_filter(torch.from_numpy(pixels), kernel).numpy()
    ay, ax = _block_overlap(ys, height, block), _block_overlap(xs, width, block)
    small = np.einsum("by,qyx,cx->qbc", ay, cells.astype(np.float64), ax, optimize=True).astype(np.float32)
    small = median_filter(torch.from_numpy(small).to(device), block_kernel(kernel))
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
