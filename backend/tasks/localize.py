"""Semantic localization (SeLo, REFERENCE section 5): text query -> heatmap at canvas resolution.

1. Windows of each size (default 256, 512, 768) on two grids (offsets 0 and size/2), clamped at edges.
2. Each window resized to ``crop_size`` (256), then the model's own preprocessing.
3. Score = cosine(window embedding, text embedding).
4. Each pixel = mean score of the windows covering it (exact, see ``windows.mean_over_windows``).
5. Min-max normalised to [0, 1], then a median filter of ``smooth`` pixels.

The median filter runs on a block-averaged copy so that its kernel is about ``SMOOTH_WORK_KERNEL`` cells
(a 251-px median at full resolution would cost minutes on a large canvas), and is resized back bilinearly.
Window embeddings are cached by canvas content, so a second query on the same canvas only encodes text.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from shared_protocol.ops import SMOOTH_WORK_KERNEL

from ..cache import content_key
from ..engine import Engine, Progress
from ..models.preprocess import value_scale
from .windows import mean_over_windows, selo_windows


def window_embeddings(engine: Engine, canvas: np.ndarray, sizes: Sequence[int], crop_size: Optional[int],
                      adapter: Optional[str], scale: Tuple[float, float], progress: Progress,
                      canvas_key: Optional[str] = None) -> Tuple[np.ndarray, torch.Tensor]:
    """All SeLo windows of the canvas and their embeddings, cached per canvas, window size and settings.

    The sizes not in the cache are encoded in one go, so that their windows share the model's batches.
    """
    h, w = canvas.shape[:2]
    canvas_key = canvas_key or content_key(canvas)
    keys = {int(s): ("windows", adapter, canvas_key, scale, crop_size, int(s)) for s in sizes}
    found = {s: engine.cache.get(k) for s, k in keys.items()}
    missing = [s for s, v in found.items() if v is None]
    if missing:
        boxes = [selo_windows(h, w, s) for s in missing]
        feats = engine.encode_windows(canvas, np.concatenate(boxes), crop_size, adapter, scale,
                                      lambda p, m: progress(0.95 * p, m))
        for s, b, f in zip(missing, boxes, torch.split(feats, [len(b) for b in boxes])):
            f = f.clone() if len(missing) > 1 else f  # its own storage, for the cache's byte count
            found[s] = (b, f)
            engine.cache.put(keys[s], found[s])
    return (np.concatenate([found[int(s)][0] for s in sizes]),
            torch.cat([found[int(s)][1] for s in sizes]))


def normalize_minmax(h: np.ndarray) -> np.ndarray:
    lo, hi = float(h.min()), float(h.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(h, dtype=np.float32)
    return ((h - lo) / (hi - lo)).astype(np.float32)


def smooth_block(kernel: int) -> int:
    """The block size (px) the median filter of ``kernel`` px works on."""
    return max(1, kernel // SMOOTH_WORK_KERNEL)


def smooth_heatmap(h: np.ndarray, kernel: int) -> np.ndarray:
    """Median filter of ``kernel`` pixels (odd), computed on a block-averaged copy when the kernel is large.

    Blocks are aligned to the canvas origin (the edge is padded by replication), so two canvases whose
    origins differ by a multiple of the block smooth their common pixels alike.
    """
    if kernel <= 1:
        return h
    from scipy import ndimage
    factor = smooth_block(kernel)
    if factor == 1:
        return ndimage.median_filter(h, size=kernel, mode="nearest").astype(np.float32)
    height, width = h.shape
    t = torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32))[None, None]
    t = F.pad(t, (0, (-width) % factor, 0, (-height) % factor), mode="replicate")
    small = F.avg_pool2d(t, factor)[0, 0].numpy()
    small = ndimage.median_filter(small, size=max(1, round(kernel / factor)) | 1, mode="nearest")
    up = F.interpolate(torch.from_numpy(small)[None, None], scale_factor=factor, mode="bilinear",
                       align_corners=False)
    return up[0, 0, :height, :width].numpy().astype(np.float32)


def score_heatmaps(boxes: np.ndarray, window_feats: torch.Tensor, text_feats: torch.Tensor, height: int,
                   width: int) -> np.ndarray:
    """Raw SeLo score maps (Q x H x W): mean cosine of the windows covering each pixel."""
    scores = (window_feats @ text_feats.T).float().cpu().numpy()  # windows x queries
    return mean_over_windows(boxes, scores, height, width)


def localize(engine: Engine, canvas: np.ndarray, params: Dict[str, Any], progress: Progress,
             canvas_key: Optional[str] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Heatmaps (Q x H x W float32) and per-query statistics."""
    h, w = canvas.shape[:2]
    adapter = params.get("adapter")
    scale = value_scale(canvas[None], params.get("value_range"))
    sizes = sorted(set(int(s) for s in params["window_sizes"]))
    boxes, feats = window_embeddings(engine, canvas, sizes, params.get("crop_size"), adapter, scale, progress,
                                     canvas_key)
    texts = engine.encode_texts(params["queries"], adapter)
    raw = score_heatmaps(boxes, feats, texts, h, w)
    stats: List[Dict[str, Any]] = []
    out = np.empty_like(raw)
    for q in range(raw.shape[0]):
        stats.append({"query": params["queries"][q], "score_min": float(raw[q].min()),
                      "score_max": float(raw[q].max()), "score_mean": float(raw[q].mean())})
        hm = normalize_minmax(raw[q]) if params.get("normalize", True) else raw[q]
        out[q] = smooth_heatmap(hm, int(params.get("smooth", 0)))
    progress(1.0, "heatmaps ready")
    return out, {"windows": int(len(boxes)), "window_sizes": sizes, "queries": stats}
