"""What the three tools share: feedback, outcomes, the tile grid and requests that carry valid-pixel masks.

A tool never touches widgets or map layers: it runs in a worker thread (a ``QgsTask``, a Processing algorithm
or a script), reads a :mod:`sources` source, talks to the backend through the ``Client`` it is given, and
returns rows / arrays (for Processing sinks) or an :class:`Outcome` listing files to load as layers.
"""
from __future__ import annotations

import datetime as _dt
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from shared_protocol import ErrorCode, ProtocolError

from ..capture import Capture
from ..errors import PluginError
from ..masks import all_valid, valid_share
from ..sources import Block

Progress = Callable[[float, str], None]
Ring = List[Tuple[float, float]]
Row = Tuple[Ring, Dict[str, Any]]
TILE_BLOCK = 4096  # whole-raster sources are read in blocks of about this many pixels on a side
MIN_TILE = 8


class Feedback:
    """Progress reporting and cancellation shared by a task and its tool."""

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

    kind: str  # "heatmap", "classification", "ranking", "regions" or "surface" (an index's score surface)
    path: str
    name: str
    classes: List[str] = field(default_factory=list)
    provenance: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    title: str
    layers: List[LayerSpec] = field(default_factory=list)
    rows: List[Dict[str, Any]] = field(default_factory=list)  # e.g. search hits for the dock's list
    summary: str = ""
    warnings: List[str] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=dict)  # the last raw reply result (for scripts, tests)
    where: str = ""  # which raster(s) and area, e.g. "RGB.byte, map view, AOI fields (selection)"
    table: List[Dict[str, Any]] = field(default_factory=list)  # classify: per-class counts and areas

    def group_name(self) -> str:
        return f"{self.title} [{self.where}]" if self.where else self.title


def where_of(source: Any) -> str:
    """A source's description for group names ('' for an anonymous rendering)."""
    name = str(getattr(source, "name", "") or "")
    return "" if name == "render" else name


@dataclass
class Common:
    """What every tool needs besides its own parameters."""

    out_dir: Optional[Path] = None  # where the dock's files go (Processing writes to its own sinks)
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


def tile_pixels(size: float, unit: str, resolution: float) -> int:
    """A tile size in pixels from a size in pixels (``unit`` "pixels") or map units at ``resolution`` units/px."""
    px = int(round(size)) if unit == "pixels" else int(round(size / abs(resolution)))
    if px < MIN_TILE:
        raise PluginError(f"a tile of {size:g} {unit} is {px} pixel(s) at this resolution; tiles need at least "
                          f"{MIN_TILE}")
    return px


PROVENANCE_FIELDS = [("query", "string"), ("model", "string"), ("adapter", "string"), ("resolution", "double"),
                     ("tiling", "string"), ("date", "string")]


def provenance(source: Any, common: Common, result: Dict[str, Any], query: str, tiling: str) -> Dict[str, Any]:
    """Where an answer comes from (layer metadata and attributes): query, model, adapter, resolution (map units per
    pixel), tiling and date (UTC)."""
    return {"query": query, "model": str(result.get("model") or "?"), "adapter": common.adapter or "(base model)",
            "resolution": float(abs(source.transform[0])), "tiling": tiling,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def warnings_of(result: Dict[str, Any]) -> List[str]:
    return [str(w) for w in result.get("warnings", [])]


# -- requests with masks ------------------------------------------------------------------------------
_NO_MASKS: set = set()  # addresses of backends that refused mask arrays (older versions)
_NO_MASKS_LOCK = threading.Lock()
NO_MASKS_WARNING = ("the backend does not take valid-pixel masks (an older version): tiles and heatmaps are "
                    "limited to valid pixels by the plugin, but scores near nodata may still be pulled by it")


def _refuses_masks(exc: ProtocolError, names: Sequence[str]) -> bool:
    if exc.code not in (ErrorCode.BAD_ARRAY, ErrorCode.BAD_PARAMS):
        return False
    unknown = set((exc.details or {}).get("unknown") or ())
    return bool(unknown & ({f"{n}_mask" for n in names} | {"min_valid"}))


class Wire:
    """A client's requests with ``NAME_mask`` arrays (and ``min_valid``) beside the images, as the protocol's
    mask contract says. Masks that mark every pixel valid are left out. A backend that refuses them (it predates
    masks) is asked again without, that is remembered per address, and :attr:`warnings` says so."""

    def __init__(self, client: Any, fb: Feedback, min_valid: float):
        self.client, self.fb, self.min_valid = client, fb, float(min_valid)
        self.warnings: List[str] = []

    @property
    def address(self) -> str:
        return str(getattr(self.client, "address", ""))

    def masks_accepted(self) -> bool:
        with _NO_MASKS_LOCK:
            return self.address not in _NO_MASKS

    def _refused(self) -> None:
        with _NO_MASKS_LOCK:
            _NO_MASKS.add(self.address)

    def _without_masks(self) -> None:
        if NO_MASKS_WARNING not in self.warnings:
            self.warnings.append(NO_MASKS_WARNING)

    def request(self, op: str, params: Dict[str, Any], arrays: Dict[str, np.ndarray],
                masks: Dict[str, Optional[np.ndarray]], progress: Tuple[float, float] = (0.0, 1.0)) -> Any:
        kw = {"on_progress": self.fb.scaled(*progress), "cancel": self.fb.cancel}
        masks = {n: m for n, m in masks.items() if not all_valid(m)}
        if masks and self.masks_accepted():
            mask_arrays = {f"{n}_mask": np.ascontiguousarray(m, dtype=np.uint8) for n, m in masks.items()}
            try:
                return self.client.request(op, {**params, "min_valid": self.min_valid}, {**arrays, **mask_arrays},
                                           **kw)
            except ProtocolError as exc:
                if not _refuses_masks(exc, list(masks)):
                    raise
                self._refused()
        if masks:
            self._without_masks()
        return self.client.request(op, params, arrays, **kw)

    def localize(self, canvas: np.ndarray, mask: Optional[np.ndarray], params: Dict[str, Any],
                 progress: Tuple[float, float] = (0.0, 1.0)) -> Any:
        """``localize`` on a canvas and its mask through ``Client.localize``: a canvas the server holds goes as
        its ``canvas_id`` (the id names the pixels and the mask together)."""
        kw = {"on_progress": self.fb.scaled(*progress), "cancel": self.fb.cancel}
        queries = params["queries"]
        rest = {k: v for k, v in params.items() if k != "queries"}
        if not all_valid(mask) and self.masks_accepted():
            try:
                return self.client.localize(canvas, queries, **rest, min_valid=self.min_valid,
                                            canvas_mask=np.ascontiguousarray(mask, dtype=np.uint8), **kw)
            except ProtocolError as exc:
                if not _refuses_masks(exc, ["canvas"]):
                    raise
                self._refused()
        if not all_valid(mask):
            self._without_masks()
        return self.client.localize(canvas, queries, **rest, **kw)


# -- tiles --------------------------------------------------------------------------------------------
@dataclass
class TileBatch:
    """Tiles cut from one block, to be sent in one request: ``cells`` are their (clipped) grid cells,
    ``windows`` the full-size windows sent, ``numbers`` their numbers in the whole grid; tiles below the valid
    share were left out (counted in ``skipped``)."""

    capture: Capture
    cells: np.ndarray
    windows: np.ndarray
    numbers: List[int]
    tiles: np.ndarray
    masks: Optional[np.ndarray]
    skipped: int
    progress: Tuple[float, float]


def tile_batches(source: Any, tile: int, stride: Optional[int], batch: int, min_valid: float,
                 fb: Feedback) -> Iterator[TileBatch]:
    """The grid's tiles, block by block, in batches of at most ``batch``; a tile whose valid share is below
    ``min_valid`` is never sent (it is counted as skipped: no answer comes from nodata)."""
    block_px = max(tile, (TILE_BLOCK // tile) * tile)
    number = 0
    blk: Block
    for blk in source.blocks(block_px):
        fb.check()
        cap = blk.capture
        cells, windows = grid_windows(cap.height, cap.width, tile, stride)
        valid = cap.valid()
        keep: List[int] = []
        skipped = 0
        for i, (x0, y0, x1, y1) in enumerate(windows):
            if valid_share(valid[y0:y1, x0:x1]) < min_valid or not valid[y0:y1, x0:x1].any():
                skipped += 1
            else:
                keep.append(i)
        n = max(1, len(keep))
        if not keep:
            yield TileBatch(cap, cells[:0], windows[:0], [], np.zeros((0,)), None, skipped,
                            ((blk.index + 1) / blk.count, (blk.index + 1) / blk.count))
        for start in range(0, len(keep), batch):
            part = keep[start:start + batch]
            tiles = np.stack([cap.pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in windows[part]])
            boxes = windows[part]
            masks = None if cap.mask is None else np.stack([cap.mask[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes])
            lo = (blk.index + start / n) / blk.count
            hi = (blk.index + min(n, start + batch) / n) / blk.count
            yield TileBatch(cap, cells[part], boxes, [number + i for i in part], tiles, masks,
                            skipped if start == 0 else 0, (lo, hi))
        number += len(windows)
