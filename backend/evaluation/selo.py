"""Semantic-localization metrics Rsu, Ras, Rda, Rmi (REFERENCE section 5), and heatmap/annotation readers.

Computed exactly as the original evaluation code (the ``SLM`` class of xiaoyuan1996/SemanticLocalizationMetrics
``evaluations/SLM.py``, copied into RS5M ``inference/inference_tool.py``), with the same libraries where it
matters (OpenCV ``fillPoly`` and ``boxFilter``, scipy ``maximum_filter``); a test compares it with a small
transcription of that code on random cases. P: probability map in [0, 1], M: filled polygons, H x W:

- region centre ``c`` = mean of its vertices truncated to integers (``int``); radius ``r`` = 1.5 x the mean
  distance from the vertices to that integer centre, truncated to an integer;
- M = ``cv2.fillPoly`` of all the regions' vertices cast to ``int32`` (boundary pixels included);
- Rsu = 1 - exp(-0.707 * [sum(PM) / (sum(P) - sum(PM) + 1e-7)] * [(HW - sum(M)) / sum(M)]);
- attention centres: ``g = uint8(255 P)`` (truncation); ``cv2.boxFilter`` 50 x 50 five times; pixels equal to
  scipy's 1000 x 1000 ``maximum_filter`` (and > 0) kept; centroids of their 8-connected components, truncated
  (x = column, y = row); those with P >= 0.5 kept, sorted by P (descending, stable);
- Ras = (exp(3 mean(offset / r)) - 1) / (exp(3) - 1), offset = mean distance from c to the centres within r
  (r if none); no centre at all: the first region's radius is the only offset, so Ras = 1;
- Rda = mean over regions of n if n <= 1 else 0.5 (1 - mean distance of the n centres to their mean / r)
  + exp(-0.5 (n + 2)), n = centres within r;
- Rmi = 0.4 Rsu + 0.35 (1 - Ras) + 0.25 Rda.

The reference computes these on the probability map it saved as a JPEG and read back (``cv2.imread(...,
IMREAD_GRAYSCALE) / 255``): :func:`read_heatmap` reads image files the same way, and :func:`jpeg_round_trip`
does the same round trip for a map held in memory (``eval selo --reference-jpeg``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

Point = Tuple[float, float]
Region = Sequence[Sequence[float]]  # polygon vertices [[x, y], ...]
PathLike = Union[str, Path]

RSU_BETA, RSU_EPS = 0.707, 1e-7
RADIUS_FACTOR, BOX, BOX_TIMES, PEAK_WINDOW, RAS_BETA, RDA_ETA = 1.5, 50, 5, 1000, 3.0, 0.5
WEIGHTS = (0.4, 0.35, 0.25)


def region_geometry(region: Region) -> Tuple[int, int, int]:
    """(cx, cy, r) as the reference computes them: the vertex mean truncated to integers, and 1.5 x the mean
    vertex distance to that integer centre, truncated."""
    pts = np.asarray(region, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    cx, cy = int(sum(pts[:, 0].tolist()) / n), int(sum(pts[:, 1].tolist()) / n)
    r = int(float(np.mean(np.linalg.norm(pts - np.array([cx, cy], dtype=np.float64), axis=1))) * RADIUS_FACTOR)
    if r <= 0:
        raise ValueError(f"region {pts.tolist()} is too small: its radius truncates to 0 (the reference divides "
                         "by it)")
    return cx, cy, r


def polygon_mask(shape: Tuple[int, int], regions: Sequence[Region]) -> np.ndarray:
    """H x W float mask: ``cv2.fillPoly`` of all regions at once on their vertices cast to int32."""
    import cv2
    mask = np.zeros(shape, dtype=np.float64)
    cv2.fillPoly(mask, [np.array(np.asarray(r, dtype=np.float64).reshape(-1, 2), np.int32) for r in regions], 1)
    return mask


def rsu(prob: np.ndarray, mask: np.ndarray) -> float:
    prob, mask = np.asarray(prob, np.float64), np.asarray(mask, np.float64)
    inside = float((prob * mask).sum())
    area = float(mask.sum())
    if area <= 0:
        raise ValueError("the annotation mask is empty")
    h, w = mask.shape
    left = inside / (float(prob.sum()) - inside + RSU_EPS)
    right = (h * w - area) / area
    return float(1.0 - math.exp(-RSU_BETA * left * right))


def box_smooth(gray: np.ndarray, times: int = BOX_TIMES, size: int = BOX) -> np.ndarray:
    """``times`` passes of OpenCV's ``boxFilter`` (size x size mean, 8-bit in and out, reflect-101 border)."""
    import cv2
    g = np.ascontiguousarray(gray, dtype=np.uint8)
    for _ in range(times):
        g = cv2.boxFilter(g, ddepth=-1, ksize=(size, size))
    return g


def attention_centres(prob: np.ndarray, min_prob: float = 0.5) -> List[Tuple[int, int]]:
    """Integer (x, y) attention centres, sorted by P (descending), with P >= ``min_prob``."""
    prob = np.asarray(prob, dtype=np.float64)
    g = box_smooth(np.asarray(prob * 255.0).astype(np.uint8))
    peaks = (ndimage.maximum_filter(g, size=PEAK_WINDOW) == g) & (g > 0)
    labels, n = ndimage.label(peaks, structure=np.ones((3, 3), dtype=int))
    if n == 0:
        return []
    coms = ndimage.center_of_mass(peaks, labels, list(range(1, n + 1)))
    centres = [(int(col), int(row)) for row, col in coms]
    centres.sort(key=lambda c: prob[c[1], c[0]], reverse=True)
    return [c for c in centres if prob[c[1], c[0]] >= min_prob]


def ras(regions: Sequence[Region], centres: Sequence[Point]) -> float:
    geo = [region_geometry(r) for r in regions]
    if not centres:
        ratios = [1.0]  # the reference: the first region's radius as the only offset
    else:
        pts = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        ratios = []
        for cx, cy, r in geo:
            d = np.linalg.norm(pts - [cx, cy], axis=1)
            d = d[d <= r]
            ratios.append((float(d.mean()) if d.size else r) / r)
    g = float(np.mean(ratios))
    return float((math.exp(RAS_BETA * g) - 1.0) / (math.exp(RAS_BETA) - 1.0))


def rda(regions: Sequence[Region], centres: Sequence[Point]) -> float:
    pts = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    scores = []
    for cx, cy, r in (region_geometry(reg) for reg in regions):
        inside = pts[np.linalg.norm(pts - [cx, cy], axis=1) <= r] if len(pts) else pts
        n = len(inside)
        if n <= 1:
            scores.append(float(n))
            continue
        spread = float(np.linalg.norm(inside - inside.mean(axis=0), axis=1).mean()) / r
        scores.append(0.5 * (1.0 - spread) + math.exp(-RDA_ETA * (n + 2)))
    return float(np.mean(scores))


def rmi(rsu_v: float, ras_v: float, rda_v: float) -> float:
    return WEIGHTS[0] * rsu_v + WEIGHTS[1] * (1.0 - ras_v) + WEIGHTS[2] * rda_v


def selo_metrics(prob: np.ndarray, regions: Sequence[Region]) -> Dict[str, object]:
    """All four metrics for one probability map and its annotated regions."""
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2:
        raise ValueError(f"the heatmap must be 2-D, got shape {prob.shape}")
    if not regions:
        raise ValueError("no annotated regions")
    mask = polygon_mask(prob.shape, regions)
    centres = attention_centres(prob)
    su, as_, da = rsu(prob, mask), ras(regions, centres), rda(regions, centres)
    return {"rsu": su, "ras": as_, "rda": da, "rmi": rmi(su, as_, da),
            "centres": [list(c) for c in centres], "height": int(prob.shape[0]), "width": int(prob.shape[1])}


def to_grey(prob: np.ndarray) -> np.ndarray:
    """A probability map as the reference stores it: ``uint8(255 P)`` (truncation)."""
    return np.uint8(255 * np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0))


def jpeg_round_trip(prob: np.ndarray) -> np.ndarray:
    """The map the reference's metrics read: ``uint8(255 P)`` written by ``cv2.imwrite`` as a JPEG (OpenCV's
    default quality, 95) and read back with ``cv2.imread(..., IMREAD_GRAYSCALE) / 255``."""
    import cv2
    ok, buf = cv2.imencode(".jpg", to_grey(prob))
    if not ok:
        raise ValueError("OpenCV could not encode the heatmap as a JPEG")
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) / 255.0


# -- readers ------------------------------------------------------------------------------------------------
def _to_unit(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    a = np.nan_to_num(a.astype(np.float64))
    if a.size and (a.min() < 0.0 or a.max() > 1.0):  # not probabilities: min-max normalise
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


def read_heatmap(path: PathLike) -> np.ndarray:
    """A probability map in [0, 1] from .npy, .tif/.tiff (band 1, rasterio) or .png/.jpg (grey, OpenCV).

    uint8 maps to /255, uint16 to /65535; float maps are taken as they are when inside [0, 1], otherwise
    min-max normalised. A 3-D .npy / image keeps its first channel.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such heatmap")
    if suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        a = a[..., 0] if a.ndim == 3 and a.shape[-1] <= 4 else (a[0] if a.ndim == 3 else a)
    elif suffix in (".tif", ".tiff"):
        import rasterio
        with rasterio.open(path) as ds:
            a = ds.read(1)
    elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        import cv2  # as the reference reads its probmap JPEGs: OpenCV's grey decoding
        a = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | (cv2.IMREAD_ANYDEPTH if suffix == ".png" else 0))
        if a is None:
            raise ValueError(f"{path}: OpenCV cannot read this image")
    else:
        raise ValueError(f"{path}: heatmaps must be .npy, .tif or .png")
    if a.ndim != 2:
        raise ValueError(f"{path}: heatmap is not 2-D (shape {a.shape})")
    return _to_unit(a)


def read_annotations(path: PathLike, image: str, caption: Optional[str] = None) -> Tuple[str, List[Region]]:
    """(caption, polygons) of one query on one image from an AIR-SLT annotations JSON
    (a list of ``{"caption", "jpg_name", "points": [[[x, y], ...], ...]}``). ``image`` matches the file name
    or its stem; ``caption`` is needed when the image has several queries (its text or its 0-based index)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("annotations", data.get("items", []))
    want = Path(image).name
    entries = [e for e in data if isinstance(e, dict) and (e.get("jpg_name") == want or
                                                           Path(str(e.get("jpg_name", ""))).stem == Path(want).stem)]
    if not entries:
        raise ValueError(f"{path}: no annotation for image {image!r}")
    if caption is not None:
        picked = [e for e in entries if e.get("caption") == caption]
        if not picked and caption.isdigit() and int(caption) < len(entries):
            picked = [entries[int(caption)]]
        if not picked:
            raise ValueError(f"{path}: image {image!r} has no query {caption!r}; it has "
                             f"{[e.get('caption') for e in entries]}")
        entries = picked
    elif len({e.get('caption') for e in entries}) > 1:
        raise ValueError(f"{path}: image {image!r} has {len(entries)} queries; pick one with --caption: "
                         f"{[e.get('caption') for e in entries]}")
    regions: List[Region] = []
    for e in entries:
        for poly in e.get("points", []):
            regions.append([[float(x), float(y)] for x, y in poly])
    return str(entries[0].get("caption", "")), regions
