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
Everything from the window scores on is ``shared_protocol.selo`` (numpy only), which the plugin runs too to
make a whole raster's map from the scores of explicit windows (:func:`window_scores`, each encoded once).
With a mask, the means are still exact on the cells; the valid pixels of each cell (and of each block of
the smoothing) are counted from the mask on the cell grid, and only the smoothing of a mask with a kernel
below ``SMOOTH_WORK_KERNEL`` px runs over pixels (``valid_median``: a few cells per window, not its pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.defaults import MIN_VALID_SHARE
from shared_protocol.ops import WINDOWS_ARRAY, WINDOWS_REFUSE, window_boxes_problem
from shared_protocol.selo import (box_shares, cell_areas, cell_means, interval_counts, normalize_minmax, render,
                                  score_stats, selo_windows)

from ..cache import content_key
from ..engine import Engine, Progress
from ..models.preprocess import value_scale
from .masks import no_valid_pixels, valid_pixels


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


def window_scores(engine: Engine, canvas: CanvasRef, boxes: np.ndarray, params: Dict[str, Any],
                  progress: Progress) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Raw scores (Q x N float32) of exactly the windows ``boxes`` asked for (``ops.WINDOWS_ARRAY``); a window
    below ``min_valid`` is not encoded and scores NaN. The embeddings are cached per canvas and window list, so
    a repeat query on the same canvas and windows encodes only text."""
    problem = window_boxes_problem(boxes, canvas.height, canvas.width)
    if problem:
        raise ProtocolError(ErrorCode.BAD_ARRAY, f"localize: '{WINDOWS_ARRAY}' {problem}", {"name": WINDOWS_ARRAY})
    if params.get("selo_mode") == "reference":
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"localize: explicit '{WINDOWS_ARRAY}' need selo_mode 'fast' (the "
                            "reference mode cuts its own windows)", {"param": "selo_mode"})
    for name in WINDOWS_REFUSE:
        if params.get(name):
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"localize: '{name}' makes a heatmap; with explicit "
                                f"'{WINDOWS_ARRAY}' the reply holds scores", {"param": name})
    boxes = np.asarray(boxes, dtype=np.int64)
    adapter, crop = params.get("adapter"), params.get("crop_size")
    min_valid = params.get("min_valid", MIN_VALID_SHARE)
    key = ("boxes", adapter, canvas.key, canvas.scale, crop, content_key(boxes),
           None if canvas.valid is None else min_valid)
    held = engine.cache.get(key)
    if held is None:
        if canvas.pixels is None:
            raise canvas_unknown(canvas.key)
        keep = np.flatnonzero(box_shares(canvas.valid, boxes) >= min_valid)
        feats = (engine.encode_windows(canvas.pixels, boxes[keep], crop, adapter, canvas.scale,
                                       lambda p, m: progress(0.95 * p, m)) if len(keep) else None)
        held = (keep, feats)
        engine.cache.put(key, held)
    keep, feats = held
    scores = np.full((len(params["queries"]), len(boxes)), np.nan, dtype=np.float32)
    if len(keep):
        texts = engine.encode_texts(params["queries"], adapter)
        scores[:, keep] = (texts @ feats.T).float().cpu().numpy()
    progress(1.0, "scores ready")
    return scores, {"windows": int(len(keep)), "skipped": int(len(boxes) - len(keep)), "canvas_id": canvas.key}


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
    weight = interval_counts(ref.valid, ys, xs) if ref.valid is not None else cell_areas(ys, xs)
    weight[np.isnan(cells[0])] = 0
    if not weight.any():
        raise no_valid_pixels("localize")
    cells[:, weight == 0] = np.nan  # cells without a valid pixel say nothing
    stats: List[Dict[str, Any]] = [{"query": q, **s}
                                   for q, s in zip(params["queries"], score_stats(cells, weight), strict=True)]
    if params.get("normalize", True):
        cells = np.stack([normalize_minmax(c) for c in cells])
    out = render(cells, ys, xs, h, w, int(params.get("smooth", 0)), ref.valid)
    progress(1.0, "heatmaps ready")
    return out, {"windows": int(len(boxes)), "window_sizes": sizes, "queries": stats, "canvas_id": ref.key}
