"""Building an index: incremental, resumable, with reading and writing overlapping the encoding.

Three stages run at once: a reader thread cuts windows from block-aligned strips (and computes their
footprints), the calling thread encodes them (``Engine.encode_windows``, as localize does), a writer thread
commits the rows to LanceDB every ``commit_rows`` windows. A raster is marked complete only after its last
window is committed; a rerun skips complete rasters that did not change (size and mtime, else the BLAKE3 of
the bytes), removes the rows of a file that changed, and resumes a partly indexed file where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from ..engine import Engine
from .identity import model_identity
from .layout import IndexStore, WindowSettings, windows_schema
from .query import hit_fields
from .rasters import RasterInfo, WindowBatch, file_hash, footprints, open_raster, read_windows, window_boxes, window_ids

log = logging.getLogger("backend.index")
Progress = Callable[[float, str], None]
COMMIT_ROWS = 512  # windows per LanceDB commit: what a kill -9 may lose at most (plus those being encoded)
PREFETCH = 3  # window batches read ahead of the encoder


def _no_progress(fraction: float, message: str = "") -> None:
    pass


@dataclass
class RasterPlan:
    """One raster of a build and what to do with it."""
    info: RasterInfo
    status: str  # new, resumed, replaced, unchanged
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ids: List[str] = field(default_factory=list)
    todo: List[int] = field(default_factory=list)  # indexes into boxes not stored yet
    stored: int = 0  # windows already stored before this run

    def report(self, added: int, skipped: int) -> Dict[str, Any]:
        return {"raster": self.info.path, "status": self.status, "windows": self.stored + added, "added": added,
                "skipped_nodata": skipped, "warnings": self.info.warnings}


def check_rasters(paths: Sequence[str]) -> List[RasterInfo]:
    """Open and check every raster (each once): a bad one raises before anything is created or written."""
    return [open_raster(p, with_hash=False) for p in dict.fromkeys(os.path.abspath(p) for p in paths)]


def plan_rasters(store: IndexStore, infos: Sequence[RasterInfo]) -> List[RasterPlan]:
    """Decide what each checked raster needs: nothing (unchanged), a new or a replacing build."""
    done = {r["raster"]: r for r in store.raster_rows()}
    plans = []
    for info in infos:
        prev = done.get(info.path)
        if prev and prev["bytes"] == info.bytes and prev["mtime_ns"] == info.mtime_ns:
            info.hash = prev["hash"]
            plans.append(RasterPlan(info, "unchanged"))
            continue
        info.hash = file_hash(info.path)
        if prev and prev["hash"] == info.hash:
            plans.append(RasterPlan(info, "unchanged"))
            continue
        plans.append(RasterPlan(info, "replaced" if prev else "new"))
    return plans


def prepare(store: IndexStore, plan: RasterPlan) -> None:
    """Drop the rows of other versions of the file, and list the windows still to encode."""
    info = plan.info
    store.forget_raster(info.path, keep_id=info.raster_id)
    plan.boxes, plan.sizes = window_boxes(info.height, info.width, store.manifest.windows)
    plan.ids = window_ids(info.raster_id, plan.boxes, plan.sizes)
    stored = store.stored_ids(info.raster_id)
    plan.todo = [i for i, wid in enumerate(plan.ids) if wid not in stored]
    plan.stored = len(plan.ids) - len(plan.todo)
    if plan.stored and plan.status == "new":
        plan.status = "resumed"


def rows_table(plan: RasterPlan, index: np.ndarray, valid: np.ndarray, feats: np.ndarray, dim: int,
               foot: Optional[Dict[str, Any]] = None) -> pa.Table:
    """The ``windows`` rows of some windows of a raster and their embeddings."""
    info = plan.info
    boxes = plan.boxes[index]
    foot = foot if foot is not None else footprints(info, boxes)
    n = len(index)
    cols: Dict[str, Any] = {
        "id": [plan.ids[i] for i in index.tolist()], "raster": [info.path] * n, "raster_id": [info.raster_id] * n,
        "col": boxes[:, 0].astype(np.int32), "row": boxes[:, 1].astype(np.int32),
        "width": (boxes[:, 2] - boxes[:, 0]).astype(np.int32), "height": (boxes[:, 3] - boxes[:, 1]).astype(np.int32),
        "size": plan.sizes[index].astype(np.int32), "crs": [info.crs] * n,
        **{k: foot[k] for k in ("minx", "miny", "maxx", "maxy", "lon_min", "lat_min", "lon_max", "lat_max",
                                "geometry", "wkt")},
        "valid": np.asarray(valid, np.float32), "date": [info.date] * n,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(feats, np.float32).ravel()), dim),
    }
    cols["hit"] = hit_column(cols)
    return pa.table(cols, schema=windows_schema(dim))


HIT_SOURCES = ("id", "raster", "col", "row", "width", "height", "size", "crs", "minx", "miny", "maxx", "maxy",
               "lon_min", "lat_min", "lon_max", "lat_max", "wkt", "valid", "date")


def hit_column(cols: Dict[str, Any]) -> List[str]:
    """The ``hit`` column (``query.hit_fields`` as JSON, one per row) of window rows given column by column."""
    values = [c.tolist() if isinstance(c, np.ndarray) else list(c) for c in (cols[k] for k in HIT_SOURCES)]
    return [json.dumps(hit_fields(dict(zip(HIT_SOURCES, r, strict=True)))) for r in zip(*values, strict=True)]


class _Writer:
    """Commits row tables in a thread, ``commit_rows`` at a time; ``close`` flushes and re-raises its errors."""

    def __init__(self, store: IndexStore, commit_rows: int):
        self.store = store
        self.commit_rows = commit_rows
        self.queue: "queue.Queue[Optional[pa.Table]]" = queue.Queue(maxsize=4)
        self.error: Optional[BaseException] = None
        self.committed = 0
        self.thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        parts: List[pa.Table] = []
        while True:
            item = self.queue.get()
            if item is not None:
                parts.append(item)
            if parts and (item is None or sum(p.num_rows for p in parts) >= self.commit_rows):
                if self.error is None:
                    try:
                        table = pa.concat_tables(parts)
                        self.store.append(table)
                        self.committed += table.num_rows
                    except BaseException as exc:  # reported by put/close
                        self.error = exc
                parts = []
            if item is None:
                return

    def put(self, table: pa.Table) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(table)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def prefetch(items: Iterable[Any], depth: int = PREFETCH) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` ahead (its exceptions re-raised here)."""
    q: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def run() -> None:
        it = iter(items)
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as exc:
            q.put(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # in this thread: a generator holding a rasterio dataset must end where it began

    thread = threading.Thread(target=run, name="index-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


def batches_with_footprints(plan: RasterPlan, batch: int, min_valid: float, skipped: List[int]
                            ) -> Iterator[tuple]:
    """(window batch, footprints) pairs of one raster, for the reader thread."""
    for wb in read_windows(plan.info, plan.boxes, set(plan.todo), batch, min_valid, skipped):
        yield wb, footprints(plan.info, plan.boxes[wb.index])


def build_index(engine: Engine, path: os.PathLike, rasters: Sequence[str], settings: Optional[WindowSettings] = None,
                adapter: Optional[str] = None, create: bool = True, progress: Progress = _no_progress,
                commit_rows: int = COMMIT_ROWS, encoder: Optional[Callable[..., Dict[str, Any]]] = None
                ) -> Dict[str, Any]:
    """Index ``rasters`` into the index at ``path`` (created when missing and ``create``); returns a report.

    ``settings`` None keeps an existing index's window settings (the defaults for a new one). ``progress``
    may raise (a cancel): the rows encoded so far are committed first, and a rerun resumes. ``encoder``
    replaces the in-process encoding loop (the Ray build).
    """
    started = time.perf_counter()
    identity = model_identity(engine, adapter)
    infos = check_rasters(rasters)
    store = IndexStore.create_or_open(path, identity, settings, create)
    with store.writing():
        plans = plan_rasters(store, infos)
        for plan in plans:
            if plan.status != "unchanged":
                prepare(store, plan)
        total = sum(len(p.todo) for p in plans) or 1
        progress(0.0, f"{total} windows to encode in {sum(p.status != 'unchanged' for p in plans)} raster(s)")
        reports, done = [], [0]
        encode = encoder or _encode_local
        for plan in plans:
            if plan.status == "unchanged":
                reports.append(plan.report(0, 0))
                continue
            label = os.path.basename(plan.info.path)
            counts = encode(engine=engine, store=store, plan=plan, adapter=adapter, commit_rows=commit_rows,
                            progress=lambda n, label=label: _step(done, n, total, label, progress))
            store.mark_complete(plan.info.record(plan.stored + counts["added"], counts["skipped"]))
            reports.append(plan.report(counts["added"], counts["skipped"]))
        progress(0.99, "compacting")
        final = store.finish()
    warnings = [w for p in plans for w in p.info.warnings]
    progress(1.0, "done")
    return {"index": str(store.path), "rasters": reports, "rows": final["rows"], "ann": final["ann"],
            "warnings": warnings, "elapsed_s": round(time.perf_counter() - started, 3)}


def _step(done: List[int], n: int, total: int, label: str, progress: Progress) -> None:
    done[0] += n
    progress(min(0.98, done[0] / total), f"{label}: {done[0]}/{total} windows")


def _encode_local(engine: Engine, store: IndexStore, plan: RasterPlan, adapter: Optional[str], commit_rows: int,
                  progress: Callable[[int], None]) -> Dict[str, int]:
    """Encode one raster's remaining windows in this process; returns counts (added, skipped)."""
    settings = store.manifest.windows
    skipped: List[int] = []
    writer = _Writer(store, commit_rows)
    added = 0
    try:
        wb: WindowBatch
        for wb, foot in prefetch(batches_with_footprints(plan, engine.batch_size, settings.min_valid, skipped)):
            feats = engine.encode_windows(wb.canvas, wb.boxes, settings.crop_size, adapter, plan.info.scale)
            writer.put(rows_table(plan, wb.index, wb.valid, feats.float().cpu().numpy(), store.manifest.dim, foot))
            added += len(wb.index)
            progress(len(wb.index))
    finally:
        writer.close()  # commits what was encoded, also on a cancel
    progress(len(skipped))
    return {"added": added, "skipped": len(skipped)}
