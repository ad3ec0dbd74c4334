"""The three tools as plain processors: capture in, backend request(s), output files out.

A processor never touches widgets or map layers: it runs in a worker thread (inside a ``QgsTask``) or in
a script, talks to the backend through the ``Client`` it is given and returns an :class:`Outcome` that
lists the files to load as layers on the main thread.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from shared_protocol import ErrorCode, ProtocolError

from .capture import Capture
from .errors import PluginError
from .outputs import slug, unique_path, write_geotiff, write_polygons_gpkg

Progress = Callable[[float, str], None]


class Feedback:
    """Progress reporting and cancellation shared by a task and its processor."""

    def __init__(self, on_progress: Optional[Progress] = None, cancel: Optional[threading.Event] = None):
        self._on_progress = on_progress
        self.cancel = cancel or threading.Event()

    def progress(self, fraction: float, message: str = "") -> None:
        if self._on_progress is not None:
            self._on_progress(min(max(float(fraction), 0.0), 1.0), message)

    def scaled(self, lo: float, hi: float) -> Progress:
        return lambda p, m="": self.progress(lo + (hi - lo) * p, m)

    def check(self) -> None:
        if self.cancel.is_set():
            raise ProtocolError(ErrorCode.CANCELLED, "cancelled by the user")


@dataclass
class LayerSpec:
    """A file to load as a layer once the task is done."""

    kind: str  # "heatmap", "classification" or "ranking"
    path: str
    name: str
    classes: List[str] = field(default_factory=list)


@dataclass
class Outcome:
    title: str
    layers: List[LayerSpec] = field(default_factory=list)
    rows: List[Dict[str, Any]] = field(default_factory=list)  # e.g. search hits for the dock's list
    summary: str = ""
    warnings: List[str] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=dict)  # the raw reply result (for scripts, tests)


@dataclass
class Common:
    """What every tool needs besides its own parameters."""

    out_dir: Path
    adapter: Optional[str] = None
    taken: Sequence[str] = ()  # sources of the project's layers: never reuse one as an output name


def grid_windows(height: int, width: int, tile: int, stride: Optional[int] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Cells (clipped) and full-size windows of a grid, like the backend's classify grid (x0, y0, x1, y1)."""
    stride = stride or tile
    th, tw = min(tile, height), min(tile, width)
    cells, windows = [], []
    for y in range(0, height, stride):
        for x in range(0, width, stride):
            cells.append((x, y, min(x + tile, width), min(y + tile, height)))
            wx, wy = max(0, min(x, width - tw)), max(0, min(y, height - th))
            windows.append((wx, wy, wx + tw, wy + th))
    return np.array(cells, dtype=np.int64).reshape(-1, 4), np.array(windows, dtype=np.int64).reshape(-1, 4)


def tile_pixels(size: float, unit: str, capture: Capture) -> int:
    """A tile size in pixels from a size in pixels or ground (map) units."""
    if unit == "pixels":
        px = int(round(size))
    else:
        res = abs(capture.transform[0])
        px = int(round(size / res))
    if px < 8:
        raise PluginError(f"a tile of {size:g} {unit} is {px} pixel(s) at this resolution; tiles need at least 8")
    return px


def _warnings(result: Dict[str, Any]) -> List[str]:
    return [str(w) for w in result.get("warnings", [])]


class ClassifyProcessor:
    """Zero-shot labels on a grid over the capture -> a GeoPackage grid with label and score."""

    def __init__(self, capture: Capture, classes: Sequence[str], tile_px: int, common: Common,
                 stride_px: Optional[int] = None, top_k: int = 3, templates: str = "georsclip"):
        classes = [c.strip() for c in classes if c.strip()]
        if not classes:
            raise PluginError("give at least one class name")
        self.capture, self.classes, self.tile_px, self.common = capture, list(classes), int(tile_px), common
        self.stride_px, self.top_k, self.templates = stride_px, int(top_k), templates
        self.title = f"classify ({len(self.classes)} classes, {self.tile_px} px tiles)"

    def run(self, client: Any, fb: Feedback) -> Outcome:
        fb.check()
        cap = self.capture
        reply = client.classify(self.classes, canvas=cap.pixels, tile_size=self.tile_px, stride=self.stride_px,
                                top_k=min(self.top_k, len(self.classes)), templates=self.templates,
                                adapter=self.common.adapter, on_progress=fb.scaled(0.0, 0.9), cancel=fb.cancel)
        boxes = reply.arrays.get("boxes")
        if boxes is None:
            boxes, _ = grid_windows(cap.height, cap.width, self.tile_px, self.stride_px)
        rows = []
        for tile, box in zip(reply.result["tiles"], boxes):
            top = tile["top"]
            attrs = {"tile": int(tile["index"]), "label": top[0]["label"], "score": float(top[0]["score"]),
                     "top": "; ".join(f"{t['label']} {t['score']:.3f}" for t in top)}
            rows.append((cap.box_to_map(*[int(v) for v in box]), attrs))
        fb.check()
        path = unique_path(self.common.out_dir, "classify", ".gpkg", self.common.taken)
        write_polygons_gpkg(path, "classification", [("tile", "int"), ("label", "string"), ("score", "double"),
                                                     ("top", "string")], rows, cap.qgs_crs())
        fb.progress(1.0, "done")
        counts: Dict[str, int] = {}
        for _, a in rows:
            counts[a["label"]] = counts.get(a["label"], 0) + 1
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        return Outcome(self.title, [LayerSpec("classification", str(path), "classification", self.classes)],
                       [a for _, a in rows], f"{len(rows)} tiles; {summary}", _warnings(reply.result),
                       reply.result)


class SearchProcessor:
    """Rank the tiles of the capture against a text query (batched) -> the top-k tiles with scores."""

    def __init__(self, capture: Capture, query: str, tile_px: int, common: Common, top_k: int = 10,
                 batch: int = 64):
        if not query.strip():
            raise PluginError("type a query to search for")
        self.capture, self.query, self.tile_px, self.common = capture, query.strip(), int(tile_px), common
        self.top_k, self.batch = int(top_k), max(1, int(batch))
        self.title = f"search: {self.query}"

    def run(self, client: Any, fb: Feedback) -> Outcome:
        cap = self.capture
        _, windows = grid_windows(cap.height, cap.width, self.tile_px)
        px = cap.pixels
        hits: List[Tuple[float, int]] = []
        result: Dict[str, Any] = {}
        n = len(windows)
        for start in range(0, n, self.batch):
            fb.check()
            part = windows[start:start + self.batch]
            tiles = np.stack([px[y0:y1, x0:x1] for x0, y0, x1, y1 in part])
            lo, hi = start / n, min(n, start + self.batch) / n
            reply = client.rank(tiles, [self.query], top_k=min(self.top_k, len(part)), adapter=self.common.adapter,
                                on_progress=fb.scaled(0.9 * lo, 0.9 * hi), cancel=fb.cancel)
            result = reply.result
            hits += [(float(m["score"]), start + int(m["index"])) for m in reply.result["by_query"][0]]
        hits.sort(key=lambda h: (-h[0], h[1]))
        rows, attrs_list = [], []
        for rank, (score, index) in enumerate(hits[:self.top_k], start=1):
            x0, y0, x1, y1 = (int(v) for v in windows[index])
            ring = cap.box_to_map(x0, y0, x1, y1)
            xs, ys = zip(*ring)
            attrs = {"rank": rank, "score": score, "tile": index, "query": self.query,
                     "xmin": min(xs), "ymin": min(ys), "xmax": max(xs), "ymax": max(ys)}
            rows.append((ring, attrs))
            attrs_list.append(attrs)
        fb.check()
        path = unique_path(self.common.out_dir, f"search_{slug(self.query)}", ".gpkg", self.common.taken)
        write_polygons_gpkg(path, "search", [("rank", "int"), ("score", "double"), ("tile", "int"),
                                             ("query", "string")], rows, cap.qgs_crs())
        fb.progress(1.0, "done")
        best = f"best score {hits[0][0]:.3f}" if hits else "no tiles"
        return Outcome(self.title, [LayerSpec("ranking", str(path), f"top {len(rows)}: {self.query}")], attrs_list,
                       f"{n} tiles ranked; {best}", _warnings(result), result)


def auto_window_sizes(height: int, width: int) -> List[int]:
    """SeLo's 256/512/768 px windows, scaled down for canvases smaller than 1024 px."""
    side = min(height, width)
    if side >= 1024:
        return [256, 512, 768]
    return sorted({max(16, int(side * f)) for f in (0.25, 0.5, 0.75)})


def auto_smooth(height: int, width: int) -> int:
    """SeLo's 251 px median for large canvases; about 1/8 of the short side (odd) for small ones."""
    k = min(251, max(0, min(height, width) // 8))
    return k | 1 if k > 1 else 0


class LocalizeProcessor:
    """Semantic localization: a heatmap per query over the capture -> GeoTIFFs in the capture's CRS."""

    def __init__(self, capture: Capture, queries: Sequence[str], common: Common,
                 window_sizes: Optional[Sequence[int]] = None, smooth: Optional[int] = None):
        queries = [q.strip() for q in queries if q.strip()]
        if not queries:
            raise PluginError("type a query to localize")
        self.capture, self.queries, self.common = capture, queries, common
        h, w = capture.height, capture.width
        self.window_sizes = list(window_sizes) if window_sizes else auto_window_sizes(h, w)
        self.smooth = auto_smooth(h, w) if smooth is None else int(smooth)
        self.title = "localize: " + "; ".join(self.queries)

    def run(self, client: Any, fb: Feedback) -> Outcome:
        fb.check()
        cap = self.capture
        reply = client.localize(cap.pixels, self.queries, window_sizes=self.window_sizes, smooth=self.smooth,
                                transform=list(cap.transform), crs=cap.crs_param, adapter=self.common.adapter,
                                on_progress=fb.scaled(0.0, 0.9), cancel=fb.cancel)
        heat = reply.arrays["heatmaps"]
        if heat.shape[1:] != (cap.height, cap.width):
            raise PluginError(f"the backend sent heatmaps of {heat.shape[2]} x {heat.shape[1]} for a "
                              f"{cap.width} x {cap.height} canvas")
        specs = []
        for q, query in enumerate(self.queries):
            fb.check()
            path = unique_path(self.common.out_dir, f"heatmap_{slug(query)}", ".tif", self.common.taken)
            write_geotiff(path, heat[q], cap.transform, cap.crs_wkt, [f"heatmap: {query}"])
            specs.append(LayerSpec("heatmap", str(path), f"heatmap: {query}"))
        fb.progress(1.0, "done")
        stats = reply.result.get("queries", [])
        return Outcome(self.title, specs, [dict(s) for s in stats if isinstance(s, dict)],
                       f"{len(specs)} heatmap(s) of {cap.width} x {cap.height} px from "
                       f"{reply.result.get('windows', '?')} windows", _warnings(reply.result), reply.result)
