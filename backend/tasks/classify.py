"""Zero-shot classification of tiles (REFERENCE section 3): top-k labels and probabilities per tile."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from shared_protocol import ErrorCode, ProtocolError

from ..cache import content_key
from ..engine import Engine, Progress
from ..models.preprocess import preprocess_batch, value_scale
from .templates import get_templates, normalize_classname
from .windows import grid_cells

LOGIT_SCALE = 100.0


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


def class_vectors(engine: Engine, classes: Sequence[str], params: Dict[str, Any]) -> torch.Tensor:
    """C x D class embeddings: a prompt learner's own (CoOp), else prompt ensembling over templates."""
    adapter = params.get("adapter")
    learned = getattr(engine.model_for(adapter), "class_embeddings", None)
    if learned is not None:
        with torch.inference_mode(), engine.autocast():
            vecs = learned(list(classes))
        if vecs is not None:
            return F.normalize(vecs.float(), dim=-1)
    templates = params.get("custom_templates") or get_templates(params.get("templates") or "georsclip")
    return engine.class_embeddings(classes, templates, params.get("ensemble", "georsclip"), adapter)


def probabilities(image_feats: torch.Tensor, class_feats: torch.Tensor) -> torch.Tensor:
    """softmax(100 * cosine) over classes; both inputs L2-normalised."""
    if class_feats.ndim == 3:  # per-image class features
        logits = LOGIT_SCALE * torch.einsum("nd,ncd->nc", image_feats, class_feats)
    else:
        logits = LOGIT_SCALE * image_feats @ class_feats.T
    return logits.softmax(dim=-1)


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


def conditioned_probabilities(engine: Engine, classes: Sequence[str], tiles: np.ndarray, scale,
                              adapter: Optional[str], progress: Progress) -> torch.Tensor:
    """Probabilities from a prompt learner whose class features depend on each image (GDPL), batch by batch."""
    model = engine.model_for(adapter)
    out = []
    for start in range(0, len(tiles), engine.batch_size):
        progress(start / max(len(tiles), 1), f"classifying {start}/{len(tiles)}")
        x = preprocess_batch(tiles[start:start + engine.batch_size], engine.loaded, scale=scale)
        with torch.inference_mode(), engine.autocast():
            img = F.normalize(model.encode_image(x).float(), dim=-1)
            txt = F.normalize(model.class_embeddings(list(classes), x).float(), dim=-1)
        out.append(probabilities(img, txt))
    return torch.cat(out)


def classify(engine: Engine, params: Dict[str, Any], arrays: Dict[str, np.ndarray],
             progress: Progress) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    classes = check_classes(params["classes"])
    tiles, cells, canvas = tiles_from_request(params, arrays)
    adapter = params.get("adapter")
    if getattr(engine.model_for(adapter), "image_conditioned", False):
        source = tiles if canvas is None else np.stack([canvas[y0:y1, x0:x1] for x0, y0, x1, y1 in tiles])
        scale = value_scale(source if canvas is None else canvas[None], params.get("value_range"))
        probs_t = conditioned_probabilities(engine, classes, source, scale, adapter,
                                            lambda p, m: progress(0.9 * p, m))
    else:
        if canvas is None:
            scale = value_scale(tiles, params.get("value_range"))
            feats = engine.encode_images(tiles, adapter, scale=scale, progress=lambda p, m: progress(0.9 * p, m))
        else:
            scale = value_scale(canvas[None], params.get("value_range"))
            key = ("grid", adapter, scale, content_key(canvas), content_key(tiles))
            feats = engine.cache.get_or_compute(key, lambda: engine.encode_windows(
                canvas, tiles, None, adapter, scale, lambda p, m: progress(0.9 * p, m)))
        head = getattr(engine.model_for(adapter), "classify_features", None)  # an instant adapter's own head
        probs_t = head(feats, classes).softmax(dim=-1) if head is not None else \
            probabilities(feats, class_vectors(engine, classes, params))
    probs = probs_t.cpu().numpy().astype(np.float32)
    k = min(params.get("top_k", 5), len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    margins = top2_margins(probs)
    results = [{"index": i, "label": classes[order[i, 0]], "margin": float(margins[i]),
                "top": [{"label": classes[j], "score": float(probs[i, j])} for j in order[i]]}
               for i in range(len(probs))]
    out_arrays = {"probs": probs}
    if cells is not None:
        out_arrays["boxes"] = cells.astype(np.int32)
    return {"classes": classes, "tiles": results}, out_arrays
