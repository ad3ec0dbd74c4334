"""SeLo reference mode (``selo_mode="reference"``): the original pipeline step by step, as RS5M's
``inference/inference_tool.py`` (``AIR_SLT.split_image``, ``semantic_localization_evaluation``) runs it:

1. windows cut as ``split_image`` cuts them: for each size s, grids of stride s starting at 0 and at
   ``s - int(s / 2)``, a window reaching the edge moved to ``[dim - s, dim]``, each window once;
2. each window resized to ``crop_size`` (256) x ``crop_size`` with ``cv2.resize(..., INTER_CUBIC)`` (no
   antialiasing), written as a JPEG by OpenCV (its default quality, 95; BGR in, as ``cv2.imread`` gave it) and
   read back with PIL, then the model's PIL preprocessing (Resize bicubic, CenterCrop, ToTensor, Normalize);
3. the raw query as the text (no templates); score = cosine(window, text);
4. each pixel = the mean score of the windows covering it (float64);
5. min-max, ``uint8(255 * p)`` (truncation), ``cv2.medianBlur(..., smooth)`` (251).

The heatmap returned is that 8-bit map / 255. It is slow (every window goes through JPEG and PIL on the CPU)
and exists to measure the fast default against (bench/RESULTS.md) and to reproduce published numbers.
The model runs at the engine's precision: serve with ``--precision fp32`` for the reference's fp32.
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from shared_protocol import ErrorCode, ProtocolError

from ..engine import Engine, Progress

JPEG_BATCH = 64  # windows preprocessed and encoded at once


def reference_windows(height: int, width: int, sizes: Sequence[int]) -> np.ndarray:
    """``split_image``'s windows as (x0, y0, x1, y1), unique, in the order it first writes them.

    A window larger than the canvas along an axis covers the whole axis (the original would slice from a
    negative start there).
    """
    seen: Dict[Tuple[int, int, int, int], None] = {}
    for step in sizes:
        sy, sx = min(step, height), min(step, width)
        for gap in (step, int(0.5 * step)):
            for c in range(step - gap, width, step):
                c0, c1 = (c, c + sx) if c + step < width else (width - sx, width)
                for r in range(step - gap, height, step):
                    r0, r1 = (r, r + sy) if r + step < height else (height - sy, height)
                    seen.setdefault((c0, r0, c1, r1), None)
    return np.array(list(seen), dtype=np.int64).reshape(-1, 4)


def canvas_rgb8(canvas: np.ndarray, scale: Tuple[float, float]) -> np.ndarray:
    """H x W x 3 uint8 RGB, as the original reads its JPEG images (uint16 mapped through ``scale``)."""
    if canvas.dtype != np.uint8:
        lo, hi = scale
        canvas = np.clip(np.rint((canvas.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255.0), 0, 255)
        canvas = canvas.astype(np.uint8)
    if canvas.shape[2] == 1:
        return np.repeat(canvas, 3, axis=2)
    return np.ascontiguousarray(canvas[:, :, :3])


def pil_preprocess(loaded):
    """The model's PIL inference transform (RS5M ``get_preprocess``: Resize bicubic, CenterCrop, RGB,
    ToTensor, Normalize with the model's mean and std)."""
    from torchvision import transforms
    size = int(loaded.image_size[0])
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        lambda im: im.convert("RGB"),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(loaded.mean), std=list(loaded.std)),
    ])


def window_inputs(rgb: np.ndarray, boxes: np.ndarray, crop_size: int, transform) -> torch.Tensor:
    """Windows through cv2.resize (bicubic), an OpenCV JPEG, PIL and the model's transform: N x 3 x S x S."""
    import cv2
    from PIL import Image
    bgr = rgb[:, :, ::-1]
    out = []
    for x0, y0, x1, y1 in boxes:
        crop = cv2.resize(np.ascontiguousarray(bgr[y0:y1, x0:x1]), (crop_size, crop_size),
                          interpolation=cv2.INTER_CUBIC)
        ok, jpeg = cv2.imencode(".jpg", crop)
        if not ok:
            raise ProtocolError(ErrorCode.INTERNAL, "OpenCV could not encode a window as a JPEG")
        with Image.open(io.BytesIO(jpeg.tobytes())) as im:
            out.append(transform(im))
    return torch.stack(out)


def reference_window_features(engine: Engine, rgb: np.ndarray, boxes: np.ndarray, crop_size: int,
                              adapter, progress: Progress) -> torch.Tensor:
    """L2-normalised embeddings of the windows, the reference way (batched; the scores do not depend on it)."""
    transform = pil_preprocess(engine.loaded)
    feats: List[torch.Tensor] = []
    for start in range(0, len(boxes), JPEG_BATCH):
        progress(start / max(len(boxes), 1), f"encoding windows (reference) {start}/{len(boxes)}")
        x = window_inputs(rgb, boxes[start:start + JPEG_BATCH], crop_size, transform).to(engine.device)
        feats.append(engine.encode_pixels(x, adapter))
    return torch.cat(feats)


def mean_map(boxes: np.ndarray, scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """The per-pixel mean of the scores of the windows covering each pixel (float64, as the original)."""
    heat = np.zeros((height, width), dtype=np.float64)
    num = np.zeros((height, width), dtype=np.float64)
    for (x0, y0, x1, y1), s in zip(boxes, scores):
        heat[y0:y1, x0:x1] += s
        num[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return heat / num


def probability_map(heat: np.ndarray, smooth: int) -> np.ndarray:
    """min-max, ``uint8(255 p)``, ``cv2.medianBlur(., smooth)``: the original's 8-bit probability map."""
    import cv2
    adaptive = heat - np.min(heat)
    top = np.max(adaptive)
    probmap = np.uint8(255 * (adaptive / top)) if top > 0 else np.zeros(heat.shape, np.uint8)
    if smooth > 1:
        probmap = cv2.medianBlur(probmap, smooth)
    return probmap


def localize_reference(engine: Engine, canvas, params: Dict[str, Any], progress: Progress
                       ) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Heatmaps (Q x H x W float32, the 8-bit maps / 255) and per-query statistics, the reference way.

    ``canvas`` is a ``localize.CanvasRef``; window scores are cached per canvas, sizes, crop size and adapter.
    """
    if not params.get("normalize", True):
        raise ProtocolError(ErrorCode.BAD_PARAMS, "selo_mode 'reference' always min-max normalises (as the "
                            "original): leave normalize true", {"param": "normalize"})
    h, w = canvas.height, canvas.width
    adapter = params.get("adapter")
    sizes = [int(s) for s in dict.fromkeys(params["window_sizes"])]
    crop = int(params.get("crop_size") or 256)
    key = ("reference-windows", adapter, canvas.key, canvas.scale, crop, tuple(sizes))
    cached = engine.cache.get(key)
    if cached is None:
        if canvas.pixels is None:
            from .localize import canvas_unknown
            raise canvas_unknown(canvas.key)
        boxes = reference_windows(h, w, sizes)
        feats = reference_window_features(engine, canvas_rgb8(canvas.pixels, canvas.scale), boxes, crop, adapter,
                                          lambda p, m: progress(0.9 * p, m))
        cached = (boxes, feats)
        engine.cache.put(key, cached)
    boxes, feats = cached
    with torch.inference_mode():
        texts = torch.cat([engine.encode_texts([q], adapter, use_cache=False) for q in params["queries"]])
        scores = (F.normalize(feats.float(), dim=-1) @ texts.float().T).cpu().numpy().astype(np.float64)
    out = np.empty((len(params["queries"]), h, w), dtype=np.float32)
    stats: List[Dict[str, Any]] = []
    for q, query in enumerate(params["queries"]):
        heat = mean_map(boxes, scores[:, q], h, w)
        stats.append({"query": query, "score_min": float(heat.min()), "score_max": float(heat.max()),
                      "score_mean": float(heat.mean())})
        out[q] = probability_map(heat, int(params.get("smooth", 0))) / np.float32(255.0)
    progress(1.0, "heatmaps ready (reference)")
    return out, {"windows": int(len(boxes)), "window_sizes": sizes, "queries": stats, "canvas_id": canvas.key,
                 "selo_mode": "reference"}
