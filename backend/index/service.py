"""The ``index_build``, ``index_search`` and ``index_info`` operations, for :class:`backend.service.ModelService`.

Several indexes stay open at once, each under a name the server gives it (the folder's name, made unique);
requests name an index by that name or by its folder. A client on the loopback interface (or over ipc) is
the local user and may name any path; any other client only paths under the server's ``--data-dir``
folders (after resolving links), and relative paths are taken from the first of them.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from shared_protocol import ErrorCode, ProtocolError, Reply

from ..engine import Engine
from .build import build_index
from .errors import OUTSIDE_DATA_DIRS, index_error
from .identity import model_identity
from .layout import IndexStore, WindowSettings, read_manifest
from .layout import check_model as check_model_of
from .query import Query, extent_where, query_vector, score_surface, search, surface_geotiff

MAX_SURFACES = 16  # score surfaces in one reply


class IndexOps:
    """Serves the index operations with one engine; ``data_dirs`` bound what remote clients may name."""

    def __init__(self, engine: Engine, data_dirs: Sequence[str] = ()):
        self.engine = engine
        self.data_dirs = [Path(d).resolve() for d in data_dirs]
        self.open: Dict[str, IndexStore] = {}  # name -> store
        self._lock = threading.Lock()

    def handlers(self) -> Dict[str, Callable[[Any], Reply]]:
        return {"index_build": self.build, "index_search": self.search, "index_info": self.info}

    # -- access -------------------------------------------------------------------------------------
    def _path(self, job: Any, value: str, what: str) -> Path:
        """A path a client named, resolved; refused for a remote client outside the data folders."""
        local = bool(getattr(job, "local", False))
        p = Path(value).expanduser()
        if not p.is_absolute():
            base = Path.cwd() if local or not self.data_dirs else self.data_dirs[0]
            p = base / p
        p = p.resolve()
        if local:
            return p
        if not any(p == d or d in p.parents for d in self.data_dirs):
            raise index_error(ErrorCode.UNAUTHORIZED, OUTSIDE_DATA_DIRS, f"{what} {value!r} is outside the folders "
                              "this backend serves to remote clients (serve --data-dir)" if self.data_dirs else
                              f"this backend serves no folders to remote clients (serve --data-dir DIR): {what} "
                              f"{value!r} is refused", data_dirs=len(self.data_dirs))
        return p

    def _name_for(self, path: Path) -> str:
        with self._lock:
            for name, store in self.open.items():
                if store.path == path:
                    return name
            base, n = path.name or "index", 1
            name = base
            while name in self.open:
                n += 1
                name = f"{base}-{n}"
            return name

    def _store(self, job: Any, ref: str, check_model: bool = True) -> tuple:
        """(name, store) for an index named by the server's name or by its folder."""
        store = self.open.get(ref)
        path = store.path if store is not None else self._path(job, ref, "index")
        self._path(job, str(path), "index")  # an index opened by a local client stays local
        name = self._name_for(path)
        store = self.open.get(name)
        if store is not None and store.is_current():  # nothing committed since: reuse it and its warm caches
            if check_model:
                check_model_of(store.manifest, model_identity(self.engine, store.manifest.model.get("adapter")),
                               path)
            return name, store
        identity = model_identity(self.engine, read_manifest(path).model.get("adapter")) if check_model else None
        fresh = IndexStore.open(path, identity)  # re-read: another process may have added to it
        with self._lock:
            self.open[name] = fresh
        return name, fresh

    # -- operations ---------------------------------------------------------------------------------
    def build(self, job: Any) -> Reply:
        p = job.request.params
        path = self._path(job, p["index"], "index")
        rasters = [str(self._path(job, r, "raster")) for r in p["rasters"]]
        settings = None
        if p.get("window_sizes") or p.get("crop_size") or p.get("min_valid") is not None:
            defaults = WindowSettings()
            settings = WindowSettings(tuple(p.get("window_sizes") or defaults.sizes),
                                      p.get("crop_size") or defaults.crop_size,
                                      defaults.min_valid if p.get("min_valid") is None else p["min_valid"])
        report = build_index(self.engine, path, rasters, settings, adapter=p.get("adapter"),
                             create=p.get("create", True), progress=job.progress)
        name, _ = self._store(job, str(path))
        report["name"] = name
        return Reply.ok(job.request.id, job.request.op, report)

    def search(self, job: Any) -> Reply:
        p, arrays = job.request.params, job.request.arrays
        name, store = self._store(job, p["index"])
        chips = list(arrays["images"]) if "images" in arrays else []
        query = Query(texts=p.get("texts") or (), chips=chips, examples=[p["examples"]] if p.get("examples") else (),
                      negatives=[p["negatives"]] if p.get("negatives") else (),
                      negative_texts=p.get("negative_texts") or (), crs=p.get("examples_crs") or "EPSG:4326")
        qv = query_vector(self.engine, store, query)
        job.progress(0.3, "searching")
        where = extent_where(p.get("extent"), p.get("extent_crs"))
        exclude = qv.example_ids if p.get("exclude_examples", True) else []
        rows = search(store, qv.vector, p["top_k"], where, exclude)
        result: Dict[str, Any] = {"index": name, "path": str(store.path), "rows": rows, "warnings": qv.warnings,
                                  "query": qv.parts, "total_rows": store.row_count(), "ann": store.has_ann()}
        out_arrays: Dict[str, np.ndarray] = {"query_vector": qv.vector}
        if p.get("surface"):
            rasters = surface_rasters(store, where, p.get("surface_raster"))
            if len(rasters) > MAX_SURFACES:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(rasters)} rasters match; at most {MAX_SURFACES} "
                                    "score surfaces fit in one reply: narrow the extent or name surface_raster",
                                    {"limit": MAX_SURFACES})
            result["surfaces"] = []
            for i, raster in enumerate(rasters):
                job.progress(0.5 + 0.5 * i / len(rasters), f"score surface {i + 1}/{len(rasters)}")
                surf = score_surface(store, qv.vector, raster, p["surface_max_size"])
                out_arrays[f"surface_{i}"] = np.frombuffer(surface_geotiff(surf), np.uint8)
                result["surfaces"].append({"raster": surf.raster, "array": f"surface_{i}", "step": surf.step,
                                           "shape": list(surf.scores.shape)})
        job.progress(1.0, "done")
        return Reply.ok(job.request.id, job.request.op, result, out_arrays)

    def info(self, job: Any) -> Reply:
        ref = job.request.params.get("index")
        if ref is None:
            with self._lock:
                items = list(self.open.items())
            local = bool(getattr(job, "local", False))
            listed = [{"name": n, "path": str(s.path), "rows": s.row_count()} for n, s in items
                      if local or any(s.path == d or d in s.path.parents for d in self.data_dirs)]
            return Reply.ok(job.request.id, job.request.op, {"indexes": listed})
        name, store = self._store(job, ref, check_model=False)
        return Reply.ok(job.request.id, job.request.op, describe(store, name, self.engine))


def surface_rasters(store: IndexStore, where: Optional[str], raster: Optional[str]) -> List[Dict[str, Any]]:
    """The indexed rasters a score surface is made for: the one named, else those with windows in the extent."""
    rows = store.raster_rows()
    if raster:
        rows = [r for r in rows if r["raster"] == os.path.abspath(raster) or os.path.basename(r["raster"]) == raster]
        if not rows:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"{raster!r} is not in the index", {"raster": raster})
    if where:
        from .layout import sql_str
        rows = [r for r in rows if store.windows.count_rows(f"raster_id = {sql_str(r['raster_id'])} AND {where}")]
    return rows


def describe(store: IndexStore, name: Optional[str] = None, engine: Optional[Engine] = None) -> Dict[str, Any]:
    """What ``index info`` shows: manifest, rasters, rows, ANN, and whether the model in use can query it."""
    m = store.manifest
    out: Dict[str, Any] = {"name": name, "path": str(store.path), "format_version": m.format_version,
                           "created": m.created, "model": m.model, "windows": m.windows.to_dict(), "dim": m.dim,
                           "rows": store.row_count(), "ann": bool(store.windows is not None and store.has_ann()),
                           "rasters": [{k: r[k] for k in ("raster", "windows", "skipped", "crs", "width", "height",
                                                          "date", "indexed_at")} for r in store.raster_rows()]}
    if engine is not None:
        try:
            check_model_of(m, model_identity(engine, m.model.get("adapter")), store.path)
            out["queryable"] = True
        except ProtocolError as exc:
            out["queryable"] = False
            out["not_queryable_because"] = exc.message
    return out
