"""Zero-shot classification of tiles (REFERENCE section 3): top-k labels and probabilities per tile."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.defaults import MIN_VALID_SHARE

from .. import zeroshot
from ..cache import content_key
from ..engine import Engine, Progress
from ..models.preprocess import preprocess_batch, value_scale
from .masks import box_shares, image_shares, skipped, valid_pixels
from .templates import get_templates, normalize_classname
from .windows import grid_cells


def check_classes(classes: Sequence[str]) -> List[str]:
    """Reject class lists whose names collide once normalised (they could never be told apart)."""
    seen: Dict[str, str] = {}
    for name in classes:
        norm = normalize_classname(name)
        if not norm:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"class name {name!r} is empty once normalised")
        if norm in seen:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"class names {seen[norm]!r} and {name!r} are the same "
                                f"once normalised ({norm!r})", {"param": "classes"})
        seen[norm] = name
    return list(classes)


def class_vectors(engine: Engine, classes: Sequence[str], params: Dict[str, Any],
                  progress: Optional[Progress] = None) -> torch.Tensor:
    """C x D class features (``backend.zeroshot``'s rule), cached per class list, templates and adapter."""
    adapter = params.get("adapter")
    custom = tuple(params.get("custom_templates") or ())
    named = params.get("templates") or "georsclip"
    ensemble = params.get("ensemble", "georsclip")

    def compute() -> torch.Tensor:
        templates = list(custom) or get_templates(named)  # resolved only when templates are used
        with torch.inference_mode(), engine.autocast():
            return zeroshot.class_features(engine.model_for(adapter), classes, lambda prompts: engine.encode_texts(
                prompts, adapter, normalize=False, use_cache=False), templates, ensemble,
                progress=progress)
    key = ("classes", adapter, ensemble, custom or named, tuple(classes))
    return engine.cache.get_or_compute(key, compute)


def top2_margins(probs: np.ndarray) -> np.ndarray:
    """Per tile, the best class's probability minus the second best's (small = unsure; 1 with one class)."""
    if probs.shape[1] < 2:
        return np.ones(len(probs), np.float32)
    top2 = -np.partition(-probs, 1, axis=1)[:, :2]
    return (top2[:, 0] - top2[:, 1]).astype(np.float32)


def tiles_from_request(params: Dict[str, Any], arrays: Dict[str, np.ndarray]
                       ) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(tiles, cells, canvas-or-None): the tiles array as sent, or a grid cut from the canvas."""
    tiles, canvas = arrays.get("tiles"), arrays.get("canvas")
    if (tiles is None) == (canvas is None):
        raise ProtocolError(ErrorCode.BAD_PARAMS, "classify needs either 'tiles' or a 'canvas' (with tile_size)")
    if tiles is not None:
        if params.get("tile_size") is not None:
            raise ProtocolError(ErrorCode.BAD_PARAMS, "tile_size applies to a canvas, not to tiles")
        return tiles, None, None
    tile = params.get("tile_size")
    if tile is None:
        raise ProtocolError(ErrorCode.BAD_PARAMS, "a canvas needs 'tile_size' (grid tile size in pixels)")
    h, w = canvas.shape[:2]
    cells, windows = grid_cells(h, w, tile, params.get("stride") or tile)
    return windows, cells, canvas


def conditioned_probabilities(engine: Engine, classifier: zeroshot.Classifier, tiles: np.ndarray, scale,
                              progress: Progress) -> torch.Tensor:
    """Probabilities from a prompt learner whose class features depend on each image (GDPL), batch by batch."""
    out = []
    for start in range(0, len(tiles), engine.batch_size):
        progress(start / max(len(tiles), 1), f"classifying {start}/{len(tiles)}")
        x = preprocess_batch(tiles[start:start + engine.batch_size], engine.loaded, scale=scale)
        with torch.inference_mode(), engine.autocast():
            out.append(classifier.probabilities(zeroshot.image_features(classifier.model, x), x))
    return torch.cat(out)


def tile_shares(tiles: np.ndarray, cells: Optional[np.ndarray], canvas: Optional[np.ndarray],
                valid: Optional[np.ndarray]) -> np.ndarray:
    """The valid share of each tile: a sent tile's own; a grid tile's is the smaller of its cell's (what the
    label covers) and its window's (what the model sees, larger than the cell at the right and bottom edges)."""
    if valid is None:
        return np.ones(len(tiles))
    if canvas is None:
        return image_shares(valid, len(tiles))
    return np.minimum(box_shares(valid, cells), box_shares(valid, tiles))


def classify(engine: Engine, params: Dict[str, Any], arrays: Dict[str, np.ndarray],
             progress: Progress) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Top-k labels per tile; tiles with too few valid pixels (``min_valid``) are skipped, not encoded."""
    classes = check_classes(params["classes"])
    tiles, cells, canvas = tiles_from_request(params, arrays)
    valid = valid_pixels(arrays, "tiles" if canvas is None else "canvas")
    skip = skipped(tile_shares(tiles, cells, canvas, valid), params.get("min_valid", MIN_VALID_SHARE))
    keep = np.setdiff1d(np.arange(len(tiles)), skip)
    scale = value_scale(tiles if canvas is None else canvas[None], params.get("value_range"),
                        valid if valid is None or canvas is None else valid[None])
    tiles = tiles[keep]  # the tiles (or grid windows) encoded
    adapter = params.get("adapter")
    classifier = zeroshot.Classifier(engine.model_for(adapter), classes, lambda: class_vectors(
        engine, classes, params, lambda p, m: progress(0.9 + 0.09 * p, m)))
    if not len(tiles):
        probs_t = torch.zeros((0, len(classes)))
    elif classifier.image_conditioned:
        source = tiles if canvas is None else np.stack([canvas[y0:y1, x0:x1] for x0, y0, x1, y1 in tiles])
        probs_t = conditioned_probabilities(engine, classifier, source, scale, lambda p, m: progress(0.9 * p, m))
    else:
        if canvas is None:
            feats = engine.encode_images(tiles, adapter, scale=scale, progress=lambda p, m: progress(0.9 * p, m))
        else:
            key = ("grid", adapter, scale, content_key(canvas), content_key(tiles))
            feats = engine.cache.get_or_compute(key, lambda: engine.encode_windows(
                canvas, tiles, None, adapter, scale, lambda p, m: progress(0.9 * p, m)))
        with torch.inference_mode():
            probs_t = classifier.probabilities(feats)
    probs = np.full((len(keep) + len(skip), len(classes)), np.nan, dtype=np.float32)
    probs[keep] = probs_t.float().cpu().numpy()
    k = min(params.get("top_k", 5), len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    margins = top2_margins(probs)
    results = [{"index": i, "skipped": False, "label": classes[order[i, 0]], "margin": float(margins[i]),
                "top": [{"label": classes[j], "score": float(probs[i, j])} for j in order[i]]}
               for i in range(len(probs))]
    for i in skip:
        results[i] = {"index": i, "skipped": True, "label": None, "top": []}
    out_arrays = {"probs": probs}
    if cells is not None:
        out_arrays["boxes"] = cells.astype(np.int32)
    return {"classes": classes, "tiles": results, "skipped": len(skip)}, out_arrays
