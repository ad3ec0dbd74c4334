"""The index on disk: a folder with ``index.json`` (format version, model, adapter, window settings) and two
LanceDB tables, ``windows`` (one row per embedded window) and ``rasters`` (one row per completely indexed
raster file).

Every write is one Lance commit (atomic: a ``kill -9`` leaves the previous version), ``index.json`` is written
through the atomic writer before any table, and a raster's row in ``rasters`` is committed only after all of
its windows: a raster without that row is resumed, skipping the windows already stored.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared_protocol import ErrorCode
from shared_protocol.ops import INDEX_WINDOW_SIZES

from ..files import atomic_write
from .errors import (INDEX_BUSY, INDEX_HALF_WRITTEN, INDEX_MISSING, INDEX_OTHER_MODEL, INDEX_SETTINGS, INDEX_VERSION,
                     bad, index_error)

log = logging.getLogger("backend.index")
FORMAT = "mapquery-index"
FORMAT_VERSION = 2  # 2: the 'hit' column
MANIFEST = "index.json"
LOCK = ".lock"
WINDOWS, RASTERS = "windows", "rasters"
ANN_MIN_ROWS = 65_536  # below: exact (flat) search; from here: an IVF index
ANN_KIND = "IVF_FLAT"  # full vectors in each partition: exact scores, no refine (bench/RESULTS.md)
ANN_RQ_BITS = 8  # IVF_RQ (RaBitQ): bits per dimension
ANN_NPROBES = 8
ANN_REFINE: Optional[int] = None  # for a quantised kind (IVF_SQ, IVF_PQ): re-rank that many x k exactly
INDEX_CACHE_BYTES = 2 << 30  # the process's cache of loaded index partitions (shared by every index it opens)
ANN_REBUILD_SHARE = 0.1  # rebuild the ANN index when more than this share of the rows is not in it
KEEP_VERSIONS = dt.timedelta(minutes=10)
for _var in ("LANCE_LOG", "LANCEDB_LOG"):  # lance's Rust log ('No existing dataset ... will be created')
    os.environ.setdefault(_var, "error")


@dataclass(frozen=True)
class WindowSettings:
    """Which windows an index holds: SeLo's grids (two per size, offsets 0 and size/2) of each size, each
    resized to ``crop_size`` before the model's preprocessing; windows with less than ``min_valid`` valid
    pixels are left out."""
    sizes: Sequence[int] = INDEX_WINDOW_SIZES
    crop_size: int = 256
    min_valid: float = 0.5
    grid: str = "selo"

    def to_dict(self) -> Dict[str, Any]:
        return {"sizes": sorted(int(s) for s in self.sizes), "crop_size": int(self.crop_size),
                "min_valid": float(self.min_valid), "grid": self.grid}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "WindowSettings":
        return cls(tuple(int(s) for s in d["sizes"]), int(d["crop_size"]), float(d["min_valid"]), d["grid"])


@dataclass
class Manifest:
    """``index.json``: what an index holds and which model made it."""
    model: Dict[str, Any]  # identity.model_identity: name, arch, embed_dim, weights, fingerprint, adapter
    windows: WindowSettings
    dim: int
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["windows"] = self.windows.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Manifest":
        return cls(model=dict(d["model"]), windows=WindowSettings.from_dict(d["windows"]), dim=int(d["dim"]),
                   created=str(d["created"]), format=d["format"], format_version=int(d["format_version"]))


def windows_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string()),  # raster_id:size:col:row, unique
        pa.field("raster", pa.string()),  # absolute path
        pa.field("raster_id", pa.string()),  # the file's fingerprint (changes when the file does)
        pa.field("col", pa.int32()), pa.field("row", pa.int32()),
        pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("size", pa.int32()),
        pa.field("crs", pa.string()),  # the raster's CRS
        pa.field("minx", pa.float64()), pa.field("miny", pa.float64()),  # footprint bounds in the raster CRS
        pa.field("maxx", pa.float64()), pa.field("maxy", pa.float64()),
        pa.field("lon_min", pa.float64()), pa.field("lat_min", pa.float64()),  # EPSG:4326 bounds
        pa.field("lon_max", pa.float64()), pa.field("lat_max", pa.float64()),
        pa.field("geometry", pa.binary()),  # EPSG:4326 polygon, WKB
        pa.field("wkt", pa.string()),  # the same polygon, WKT
        pa.field("valid", pa.float32()),  # share of valid pixels
        pa.field("date", pa.string()),  # the raster's date (TIFFTAG_DATETIME, else the file's mtime), ISO
        # the search hit (query.hit_fields) as JSON: a search reads this one column of its k rows, where the
        # 19 columns above cost a random read each (~55 ms for 100 hits at 1M rows, bench/RESULTS.md)
        pa.field("hit", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), dim)),  # L2-normalised embedding
    ])


RASTERS_SCHEMA = pa.schema([
    pa.field("raster", pa.string()), pa.field("raster_id", pa.string()),
    pa.field("bytes", pa.int64()), pa.field("mtime_ns", pa.int64()), pa.field("hash", pa.string()),
    pa.field("crs", pa.string()), pa.field("width", pa.int32()), pa.field("height", pa.int32()),
    pa.field("transform", pa.string()),  # JSON [a, b, c, d, e, f]
    pa.field("bands", pa.string()),  # JSON band indexes used as RGB
    pa.field("scale_lo", pa.float64()), pa.field("scale_hi", pa.float64()),
    pa.field("windows", pa.int64()), pa.field("skipped", pa.int64()),  # stored / left out (nodata)
    pa.field("date", pa.string()), pa.field("indexed_at", pa.string()),
])


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def read_manifest(path: Path) -> Manifest:
    """The manifest of the index at ``path``, or a typed error (missing, half-written, other version)."""
    mpath = path / MANIFEST
    if not path.is_dir():
        raise index_error(ErrorCode.NOT_FOUND, INDEX_MISSING, f"no index at {path}: the folder does not exist",
                          path=str(path))
    if not mpath.is_file():
        if (path / f"{WINDOWS}.lance").exists():
            raise bad(INDEX_HALF_WRITTEN, f"{path} holds index tables but no {MANIFEST}: a half-written or "
                      "damaged index; rebuild it into a new folder", path=str(path))
        raise index_error(ErrorCode.NOT_FOUND, INDEX_MISSING, f"no index at {path} (no {MANIFEST})", path=str(path))
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}")
        version = int(data["format_version"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise bad(INDEX_HALF_WRITTEN, f"{mpath} is not a readable index manifest ({exc})", path=str(path)) from None
    if version != FORMAT_VERSION:
        raise bad(INDEX_VERSION, f"{path} is index format version {version}; this backend reads version "
                  f"{FORMAT_VERSION}: rebuild the index with this version", path=str(path), version=version,
                  supported=FORMAT_VERSION)
    try:
        return Manifest.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise bad(INDEX_HALF_WRITTEN, f"{mpath} misses fields ({exc})", path=str(path)) from None


def check_model(manifest: Manifest, identity: Dict[str, Any], path: Path) -> None:
    """Refuse to mix embeddings of another model, adapter or weights with the index's."""
    keys = ("arch", "embed_dim", "fingerprint", "adapter")
    mine = {k: manifest.model.get(k) for k in keys}
    theirs = {k: identity.get(k) for k in keys}
    if mine != theirs:
        diff = sorted(k for k in keys if mine[k] != theirs[k])
        raise bad(INDEX_OTHER_MODEL, f"{path} was built with model {manifest.model.get('name')} "
                  f"({manifest.model.get('arch')}, adapter {manifest.model.get('adapter')}, weights "
                  f"{manifest.model.get('weights')}); the model in use is {identity.get('name')} "
                  f"({identity.get('arch')}, adapter {identity.get('adapter')}, weights {identity.get('weights')}): "
                  "they differ in "
                  f"{', '.join(diff)}, so their embeddings cannot be compared", path=str(path), differs=diff,
                  index_model=manifest.model, model=identity)


class IndexStore:
    """An open index folder: its manifest and LanceDB tables."""

    def __init__(self, path: Path, manifest: Manifest, db: Any, manifest_id: Optional[tuple] = None):
        self.path = path
        self.manifest = manifest
        self.db = db
        self._windows = None
        self._rasters = None
        self._lance: Dict[str, Any] = {}  # table name -> Lance dataset (the version this object reads) or None
        self._opened = None if manifest_id is None else self._stamp(manifest_id, latest=False)

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: os.PathLike, identity: Optional[Dict[str, Any]] = None) -> "IndexStore":
        """Open an existing index for reading (``identity``: the model in use, checked against the index's)."""
        import lancedb
        path = Path(path).resolve()
        manifest_id = file_id(path / MANIFEST)  # before reading it: a manifest replaced after is seen as a change
        manifest = read_manifest(path)
        if identity is not None:
            check_model(manifest, identity, path)
        return cls(path, manifest, lancedb.connect(str(path)), manifest_id)

    def _stamp(self, manifest_id: Optional[tuple], latest: bool) -> tuple:
        """(manifest, windows version, rasters version): the versions this object reads, or the latest ones
        committed (``latest``; a table that appeared since counts as a change)."""
        parts: List[Any] = [manifest_id]
        for name in (WINDOWS, RASTERS):
            ds = self._lance_table(name)
            if ds is not None:
                parts.append(ds.latest_version if latest else ds.version)
            else:
                parts.append("appeared" if latest and (self.path / f"{name}.lance" / "_versions").is_dir()
                             else "missing")
        return tuple(parts)

    def is_current(self) -> bool:
        """Whether nothing was committed to the index since this object opened it for reading (then it may be
        reused, with the caches it warmed): one stat and two reads of Lance's latest-version hint."""
        return self._opened is not None and self._stamp(file_id(self.path / MANIFEST), latest=True) == self._opened

    def _lance_table(self, name: str) -> Any:
        """A table as a Lance dataset in the process's shared session (opened once per object), or None."""
        if name not in self._lance:
            import lance
            try:
                self._lance[name] = lance.dataset(str(self.path / f"{name}.lance"), session=lance_session())
            except Exception:  # missing, no committed version yet, or unreadable: _table() gives the typed error
                self._lance[name] = None
        return self._lance[name]

    @classmethod
    def create_or_open(cls, path: os.PathLike, identity: Dict[str, Any], settings: Optional[WindowSettings],
                       create: bool = True) -> "IndexStore":
        """Open an index for building: created (manifest first) when ``create`` and missing; the settings of
        an existing one must equal ``settings`` (None: take the index's)."""
        import lancedb
        path = Path(path).resolve()
        if create and not (path / MANIFEST).exists() and not (path / f"{WINDOWS}.lance").exists():
            if path.exists() and not path.is_dir():
                raise bad(INDEX_MISSING, f"{path} exists and is not a folder", path=str(path))
            path.mkdir(parents=True, exist_ok=True)
            manifest = Manifest(model=dict(identity), windows=settings or WindowSettings(),
                                dim=int(identity["embed_dim"]))
            atomic_write(path / MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode())
        manifest = read_manifest(path)
        check_model(manifest, identity, path)
        if settings is not None and settings.to_dict() != manifest.windows.to_dict():
            raise bad(INDEX_SETTINGS, f"{path} holds windows {manifest.windows.to_dict()}; this build asks for "
                      f"{settings.to_dict()}: build into another folder, or leave the window settings out to use "
                      "the index's", path=str(path), index=manifest.windows.to_dict(), asked=settings.to_dict())
        store = cls(path, manifest, lancedb.connect(str(path)))
        store._ensure_tables()
        return store

    def _open_table(self, name: str, schema: Optional[pa.Schema]) -> Any:
        """Open a table; with ``schema``, create it when missing (also after a kill before its first commit)."""
        try:
            return self.db.open_table(name)
        except Exception as exc:  # missing, or a folder without a committed version
            if schema is None:
                if (self.path / f"{name}.lance").exists():
                    raise bad(INDEX_HALF_WRITTEN, f"{self.path}: table {name} cannot be read ({exc})",
                              path=str(self.path)) from None
                return None
        folder = self.path / f"{name}.lance"
        if folder.exists():
            if any((folder / "_versions").glob("*")):  # committed data that cannot be read: never overwrite it
                raise bad(INDEX_HALF_WRITTEN, f"{self.path}: table {name} cannot be read", path=str(self.path))
            log.warning("%s: table %s has no committed version; recreating it", self.path, name)
        return self.db.create_table(name, schema=schema, mode="overwrite")

    def _ensure_tables(self) -> None:
        self._windows = self._open_table(WINDOWS, windows_schema(self.manifest.dim))
        self._rasters = self._open_table(RASTERS, RASTERS_SCHEMA)

    @property
    def windows(self) -> Any:
        if self._windows is None:
            self._windows = self._open_table(WINDOWS, None)
        return self._windows

    @property
    def rasters(self) -> Any:
        if self._rasters is None:
            self._rasters = self._open_table(RASTERS, None)
        return self._rasters

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's write lock (one writer at a time, across processes)."""
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise index_error(ErrorCode.BUSY, INDEX_BUSY, f"another process is writing {self.path}",
                                  path=str(self.path)) from None
            yield
        finally:
            os.close(fd)

    # -- reading ------------------------------------------------------------------------------------
    def _table(self) -> Any:
        """The windows table, or a typed error for an index whose first build stopped before any commit."""
        if self.windows is None:
            raise bad(INDEX_HALF_WRITTEN, f"{self.path} holds no windows yet: its first build stopped before "
                      "committing any; run the build again", path=str(self.path))
        return self.windows

    def row_count(self) -> int:
        return 0 if self.windows is None else int(self.windows.count_rows())

    def raster_rows(self) -> List[Dict[str, Any]]:
        """The completely indexed rasters (one dict per file)."""
        if self.rasters is None:
            return []
        return self.rasters.to_arrow().to_pylist()

    def stored_ids(self, raster_id: str) -> Set[str]:
        """Ids of the windows of one raster version already stored (to resume a build)."""
        t = self._table().search().where(f"raster_id = {sql_str(raster_id)}").select(["id"]).limit(None).to_arrow()
        return set(t["id"].to_pylist())

    def scan(self, where: Optional[str], columns: Sequence[str]) -> pa.Table:
        q = self._table().search()
        if where:
            q = q.where(where)
        return q.select(list(columns)).limit(None).to_arrow()

    def has_ann(self) -> bool:
        return self.windows is not None and any("vector" in list(getattr(i, "columns", []))
                                                for i in self.windows.list_indices())

    def search(self, vector: np.ndarray, k: int, where: Optional[str], columns: Sequence[str]) -> pa.Table:
        """The ``k`` rows of largest dot product with ``vector`` (a ``score`` column), among rows ``where``:
        through the IVF index when there is one (``ANN_NPROBES`` partitions, plus the rows it does not hold yet,
        searched exactly), else exactly. Read through Lance directly, with the process's shared cache, so the
        partitions a search loads stay in memory for the next requests, also after the index is re-opened."""
        nearest: Dict[str, Any] = {"column": "vector", "q": np.asarray(vector, np.float32), "k": int(k),
                                   "metric": "dot", "nprobes": ANN_NPROBES}
        if ANN_REFINE:
            nearest["refine_factor"] = ANN_REFINE
        t = self._dataset().to_table(columns=list(columns) + ["_distance"], nearest=nearest, filter=where or None,
                                     prefilter=bool(where))
        return t.append_column("score", pc.subtract(1.0, t["_distance"])).drop_columns(["_distance"])

    def _dataset(self) -> Any:
        """The windows table as a Lance dataset in the process's shared session."""
        ds = self._lance_table(WINDOWS)
        if ds is None:
            self._table()  # its typed error for an index whose first build stopped before any commit
            raise bad(INDEX_HALF_WRITTEN, f"{self.path}: the windows table cannot be read", path=str(self.path))
        return ds

    # -- writing (under ``writing()``) --------------------------------------------------------------
    def append(self, rows: pa.Table) -> None:
        """One atomic commit of window rows."""
        if rows.num_rows:
            self.windows.add(rows)
            self._lance = {}  # the next search reads the new version

    def forget_raster(self, path: str, keep_id: Optional[str] = None) -> None:
        """Remove a file's completion record and its window rows (all, or those of other versions than
        ``keep_id``): first the record, so that a kill in between leaves the file to be re-indexed."""
        self.rasters.delete(f"raster = {sql_str(path)}" + (f" AND raster_id != {sql_str(keep_id)}"
                                                           if keep_id else ""))
        self.windows.delete(f"raster = {sql_str(path)}" + (f" AND raster_id != {sql_str(keep_id)}"
                                                           if keep_id else ""))
        self._lance = {}

    def mark_complete(self, record: Dict[str, Any]) -> None:
        self.rasters.add(pa.Table.from_pylist([record], schema=RASTERS_SCHEMA))

    def unindexed_rows(self) -> int:
        """Rows the ANN index does not hold yet (searched exactly, beside the index); 0 without an index."""
        if not self.has_ann():
            return 0
        name = next(i.name for i in self.windows.list_indices() if "vector" in list(getattr(i, "columns", [])))
        return int(self.windows.index_stats(name).num_unindexed_rows)

    def finish(self) -> Dict[str, Any]:
        """After a build: compact the small commits, drop versions older than a few minutes (a reader opens
        the latest version again after any commit: ``is_current``), and build the ANN index on a large table,
        again once the rows it does not hold pass ``ANN_REBUILD_SHARE`` (those are searched exactly until then).

        Not ``optimize()``: on a table with an IVF index, its index step re-partitions the index into a
        handful of huge partitions (Lance 14: 387 -> 5 on 150,000 rows), so every search scans most rows
        (bench/RESULTS.md)."""
        import warnings
        n = self.row_count()
        info: Dict[str, Any] = {"rows": n, "ann": False}
        if n == 0:
            return info
        for table in (self.windows, self.rasters):
            table.compact_files()
            with warnings.catch_warnings():  # deprecated in favour of optimize(), which we must not call
                warnings.simplefilter("ignore")
                table.cleanup_old_versions(KEEP_VERSIONS)
        if n >= ANN_MIN_ROWS and (not self.has_ann() or self.unindexed_rows() > ANN_REBUILD_SHARE * n):
            create_ann(self.windows, n, self.manifest.dim)
        self._lance = {}
        info["ann"] = self.has_ann()
        info["unindexed"] = self.unindexed_rows()
        return info


def file_id(path: Path) -> Optional[tuple]:
    """(inode, mtime, size) of a file, None when missing: changes when the atomic writer replaces it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def lance_session() -> Any:
    """The one Lance session of this process: its index cache (``INDEX_CACHE_BYTES``) keeps the IVF partitions
    that searches loaded, across requests and across the re-opening of an index after a commit."""
    global _SESSION
    if _SESSION is None:
        import lance
        _SESSION = lance.Session(index_cache_size_bytes=INDEX_CACHE_BYTES)
    return _SESSION


_SESSION: Any = None


def create_ann(table: Any, rows: int, dim: int, kind: Optional[str] = None) -> None:
    """An IVF index over ``vector`` (dot product, ~sqrt(rows) partitions) of ``kind`` (``ANN_KIND``):
    ``IVF_FLAT`` keeps each partition's full vectors (exact scores; on the 2-core development machine a top-100
    over 1M rows through the store took ~11 ms at recall 0.997 against 19 ms for IVF-SQ with a refine, for a
    second copy of the vectors on disk), ``IVF_RQ`` RaBitQ codes of ``ANN_RQ_BITS`` bits, ``IVF_SQ`` 8-bit scalar
    quantisation, ``IVF_PQ`` 8-d sub-vectors of 8 bits. Searches probe
    ``ANN_NPROBES`` partitions; with ``ANN_REFINE`` set, a quantised kind re-ranks that many x k candidates
    exactly (bench/RESULTS.md)."""
    from lancedb.index import IvfFlat, IvfPq, IvfRq, IvfSq
    kind = kind or ANN_KIND
    partitions = max(16, int(round(math.sqrt(rows))))
    if kind == "IVF_RQ":
        config: Any = IvfRq(distance_type="dot", num_partitions=partitions, num_bits=ANN_RQ_BITS)
    elif kind == "IVF_PQ":
        sub_vectors = next(s for s in (dim // 8, dim // 4, dim // 2, dim, 1) if s >= 1 and dim % s == 0)
        config = IvfPq(distance_type="dot", num_partitions=partitions, num_sub_vectors=sub_vectors)
    elif kind == "IVF_SQ":
        config = IvfSq(distance_type="dot", num_partitions=partitions)
    elif kind == "IVF_FLAT":
        config = IvfFlat(distance_type="dot", num_partitions=partitions)
    else:
        raise ValueError(f"unknown ANN kind {kind!r}: IVF_FLAT, IVF_RQ, IVF_SQ or IVF_PQ")
    table.create_index("vector", config=config, replace=True)  # (with a config, the first argument is the column)
