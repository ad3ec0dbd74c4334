"""The index (issue 14): build one from raster files, search it by text and/or example features.

The backend keeps the index (``index_build``, ``index_search``, ``index_info``); nothing here reads pixels.
A build sends raster *files* (a WMS, XYZ or memory layer cannot be indexed: refused here, before any request);
a search sends texts and example features as GeoJSON in their layer's CRS and turns the reply's ranked rows
into a GeoPackage of footprints and its score surfaces into GeoTIFFs (NaN where nothing was indexed).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.ops import INDEX_BUILD, INDEX_SEARCH

from ..errors import PluginError
from ..outputs import atomic_write_bytes, slug, unique_path, write_polygons_gpkg
from .base import PROVENANCE_FIELDS, Common, Feedback, LayerSpec, Outcome, Row

FIELDS = [("rank", "int"), ("score", "double"), ("raster", "string"), ("window", "string"), ("col", "int"),
          ("row", "int"), ("width", "int"), ("height", "int"), ("size", "int"), ("raster_date", "string"),
          ("index_name", "string"), *PROVENANCE_FIELDS]
WGS84 = "EPSG:4326"
BUILD_TIMEOUT_S = 7 * 24 * 3600.0  # a build is one long request: its liveness is the heartbeat, not a deadline


# -- inputs from QGIS layers --------------------------------------------------------------------------
def raster_file(layer: Any) -> str:
    """The file behind a raster layer (GeoTIFF, COG, VRT ...); a layer that is not a local file is refused."""
    name = layer.name() if hasattr(layer, "name") else str(layer)
    provider = layer.providerType() if hasattr(layer, "providerType") else "gdal"
    path = layer.source().split("|")[0] if hasattr(layer, "source") else str(layer)
    if provider != "gdal" or not os.path.isfile(path):
        raise PluginError(f"'{name}' is not a raster file ({provider} layer): the index reads raster files "
                          "(GeoTIFF, COG, VRT); save a web or memory layer to a GeoTIFF first")
    return os.path.abspath(path)


def features_geojson(layer: Any, selected_only: bool = True) -> Tuple[Dict[str, Any], str]:
    """The (selected) features of a vector layer as a GeoJSON FeatureCollection in the layer's CRS, and that CRS
    (authid, else WKT) for ``examples_crs``."""
    feats = layer.getSelectedFeatures() if selected_only else layer.getFeatures()
    return geojson_of(feats, layer.crs(), layer.name(), "selected features" if selected_only else "features")


def geojson_of(features: Any, crs: Any, name: str, what: str = "features") -> Tuple[Dict[str, Any], str]:
    """Features (a layer's, a Processing source's) as a GeoJSON FeatureCollection, and their CRS's name."""
    geoms = [json.loads(f.geometry().asJson()) for f in features if f.hasGeometry() and not f.geometry().isEmpty()]
    if not geoms:
        raise PluginError(f"'{name}' has no {what} with a geometry to use as examples")
    if not crs.isValid():
        raise PluginError(f"'{name}' has no CRS: the examples cannot be placed on the rasters")
    return ({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": g, "properties": {}}
                                                       for g in geoms]}, crs.authid() or crs.toWkt())


def _request(client: Any, op: str, params: Dict[str, Any], fb: Feedback, **kw: Any) -> Any:
    fb.check()
    return client.request(op, params, {}, on_progress=fb.scaled(0.0, 0.95), cancel=fb.cancel, **kw)


# -- build --------------------------------------------------------------------------------------------
@dataclass
class IndexBuildParams:
    index: str  # the index folder (created when missing)
    rasters: Sequence[str]  # raster files (see raster_file)
    window_sizes: Optional[Sequence[int]] = None  # None: the index's (a new one: 256, 512, 768)
    min_valid: Optional[float] = None
    create: bool = True

    def __post_init__(self) -> None:
        self.index = str(self.index or "").strip()
        if not self.index:
            raise PluginError("choose a folder for the index")
        self.rasters = [str(r) for r in self.rasters]
        if not self.rasters:
            raise PluginError("choose at least one raster layer to index")
        for r in self.rasters:
            if not os.path.isfile(r):
                raise PluginError(f"{r} is not a raster file: the index reads raster files (GeoTIFF, COG, VRT)")
        self.window_sizes = [int(s) for s in self.window_sizes] if self.window_sizes else None


class IndexBuildProcessor:
    """Adds rasters to an index folder with progress; a cancelled build keeps what was committed, and building
    again resumes it (the backend skips complete rasters)."""

    def __init__(self, params: IndexBuildParams, common: Common):
        self.params, self.common = params, common
        self.title = f"index build: {Path(params.index).name or params.index}"

    def request_params(self) -> Dict[str, Any]:
        p = self.params
        params = {"index": p.index, "rasters": list(p.rasters), "window_sizes": p.window_sizes,
                  "min_valid": p.min_valid, "create": p.create, "adapter": self.common.adapter}
        return {k: v for k, v in params.items() if k in {q.name for q in INDEX_BUILD.params}}

    def run(self, client: Any, fb: Feedback) -> Outcome:
        reply = _request(client, "index_build", self.request_params(), fb, timeout=BUILD_TIMEOUT_S, retries=0)
        fb.progress(1.0, "done")
        r = reply.result
        return Outcome(self.title, [], [], build_summary(r), [str(w) for w in r.get("warnings") or ()], r)


def build_summary(result: Dict[str, Any]) -> str:
    """One line about a build reply: windows added per raster status, the index's name and size."""
    reports = result.get("rasters") or []
    added = sum(int(r.get("added") or 0) for r in reports)
    nodata = sum(int(r.get("skipped_nodata") or 0) for r in reports)
    statuses = ", ".join(f"{Path(str(r.get('raster'))).name} {r.get('status')}" for r in reports)
    return (f"index '{result.get('name', '?')}': {added} windows added ({statuses})"
            + (f", {nodata} nodata windows left out" if nodata else "") + f"; {result.get('rows', '?')} in all")


# -- search -------------------------------------------------------------------------------------------
@dataclass
class IndexSearchParams:
    index: str  # the server's name for the index (index_info) or its folder
    texts: Sequence[str] = ()
    negative_texts: Sequence[str] = ()
    examples: Optional[Dict[str, Any]] = None  # GeoJSON of positives (features_geojson)
    negatives: Optional[Dict[str, Any]] = None
    examples_crs: str = WGS84
    top_k: int = 20
    extent: Optional[Sequence[float]] = None  # [xmin, ymin, xmax, ymax] in extent_crs: only windows meeting it
    extent_crs: str = WGS84
    surface: bool = True
    exclude_examples: bool = True

    def __post_init__(self) -> None:
        self.index = str(self.index or "").strip()
        if not self.index:
            raise PluginError("choose an index to search (its name or folder)")
        self.texts = [t.strip() for t in self.texts if t.strip()]
        self.negative_texts = [t.strip() for t in self.negative_texts if t.strip()]
        if not self.texts and not self.examples:
            raise PluginError("type a text or select example features to search the index for")
        self.top_k = max(1, int(self.top_k))
        if self.extent is not None:
            self.extent = [float(v) for v in self.extent]
            if len(self.extent) != 4 or self.extent[0] > self.extent[2] or self.extent[1] > self.extent[3]:
                raise PluginError("the extent must be xmin, ymin, xmax, ymax")

    def label(self) -> str:
        """The query in words (layer names, provenance)."""
        parts = list(self.texts) + (["examples"] if self.examples else [])
        neg = list(self.negative_texts) + (["negative examples"] if self.negatives else [])
        return " + ".join(parts) + (" - " + " - ".join(neg) if neg else "")


@dataclass
class IndexSearchResult:
    rows: List[Row] = field(default_factory=list)  # best first
    crs: str = WGS84  # the footprints' CRS: the rasters' when they share one, else EPSG:4326
    surfaces: List[Tuple[str, bytes]] = field(default_factory=list)  # (raster, GeoTIFF bytes)
    provenance: Dict[str, Any] = field(default_factory=dict)
    result: Dict[str, Any] = field(default_factory=dict)


def footprint_rows(hits: Sequence[Dict[str, Any]], prov: Dict[str, Any]) -> Tuple[List[Row], str]:
    """Rings and attributes of ranked hits: in the rasters' CRS when they all share one (the windows' bounds; a
    rotated raster's footprint polygons), else the EPSG:4326 footprint polygons."""
    crss = {h["footprint"]["crs"] for h in hits}
    common = crss.pop() if len(crss) == 1 else None
    rows: List[Row] = []
    for rank, h in enumerate(hits, start=1):
        fp = h["footprint"]
        ring = _wkt_ring(fp["wkt"], common) if common is None or _rotated(fp, common) else _box(fp["bounds"])
        col, row, w, ht = (int(v) for v in h["window"])
        res = (fp["bounds"][2] - fp["bounds"][0]) / w if w else None
        rows.append((ring, {**prov, "rank": rank, "score": float(h["score"]), "raster": h["raster"],
                            "window": f"{col},{row},{w},{ht}", "col": col, "row": row, "width": w, "height": ht,
                            "size": int(h.get("size") or w), "raster_date": str(h.get("date") or ""),
                            "resolution": res if common is not None else None,
                            "xmin": min(x for x, _ in ring), "ymin": min(y for _, y in ring),
                            "xmax": max(x for x, _ in ring), "ymax": max(y for _, y in ring)}))
    return rows, common or WGS84


def _box(bounds: Sequence[float]) -> List[Tuple[float, float]]:
    x0, y0, x1, y1 = bounds
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


def _geometry(wkt: str, crs: Optional[str]) -> Any:
    """The EPSG:4326 footprint polygon, in ``crs`` when given."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry, QgsProject
    geom = QgsGeometry.fromWkt(wkt)
    if crs:
        geom.transform(QgsCoordinateTransform(QgsCoordinateReferenceSystem(WGS84), QgsCoordinateReferenceSystem(crs),
                                              QgsProject.instance()))
    return geom


def _rotated(footprint: Dict[str, Any], crs: str) -> bool:
    """Whether a window's footprint is not its bounding box (a rotated raster): then the polygon is used."""
    geom = _geometry(footprint["wkt"], crs)
    x0, y0, x1, y1 = footprint["bounds"]
    box = (x1 - x0) * (y1 - y0)
    return box > 0 and geom.area() < 0.99 * box


def _wkt_ring(wkt: str, crs: Optional[str] = None) -> List[Tuple[float, float]]:
    geom = _geometry(wkt, crs)
    poly = geom.asPolygon() or (geom.asMultiPolygon() or [[[]]])[0]
    return [(p.x(), p.y()) for p in poly[0]]


class IndexSearchProcessor:
    """One ``index_search``: ranked footprints (a GeoPackage) and, with ``surface``, one score surface GeoTIFF per
    raster with windows in the extent. The pixels are never read again."""

    def __init__(self, params: IndexSearchParams, common: Common):
        self.params, self.common = params, common
        self.title = f"index search: {params.label()}"

    def request_params(self) -> Dict[str, Any]:
        p = self.params
        params = {"index": p.index, "texts": p.texts or None, "negative_texts": p.negative_texts or None,
                  "examples": p.examples, "negatives": p.negatives, "examples_crs": p.examples_crs,
                  "exclude_examples": p.exclude_examples, "top_k": p.top_k, "extent": p.extent,
                  "extent_crs": p.extent_crs, "surface": p.surface}
        return {k: v for k, v in params.items() if k in {q.name for q in INDEX_SEARCH.params}}

    def compute(self, client: Any, fb: Feedback) -> IndexSearchResult:
        params = self.request_params()
        warnings: List[str] = []
        try:
            reply = _request(client, "index_search", params, fb)
        except ProtocolError as exc:
            if exc.code != ErrorCode.TOO_LARGE or not params.get("surface"):
                raise
            warnings.append(f"no score surfaces: {exc.message}")  # too many rasters in one reply: rows only
            reply = _request(client, "index_search", {**params, "surface": False}, fb)
        r = dict(reply.result)
        r["warnings"] = [str(w) for w in r.get("warnings") or ()] + warnings
        prov = {"query": self.params.label(), "model": str(r.get("model") or "?"),
                "adapter": str(r.get("adapter") or self.common.adapter or "(base model)"),
                "tiling": f"index {r.get('index', self.params.index)} ({r.get('path', '')})",
                "index_name": str(r.get("index") or ""),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        rows, crs = footprint_rows(r.get("rows") or [], prov)
        surfaces = [(s["raster"], bytes(reply.arrays[s["array"]].tobytes())) for s in r.get("surfaces") or ()]
        return IndexSearchResult(rows, crs, surfaces, prov, r)

    def run(self, client: Any, fb: Feedback) -> Outcome:
        from qgis.core import QgsCoordinateReferenceSystem
        res = self.compute(client, fb)
        fb.check()
        label = self.params.label()
        out = Path(self.common.out_dir)
        path = unique_path(out, f"index_search_{slug(label)}", ".gpkg", self.common.taken)
        write_polygons_gpkg(path, "index_search", FIELDS, res.rows, QgsCoordinateReferenceSystem(res.crs))
        specs = [LayerSpec("ranking", str(path), f"top {len(res.rows)}: {label}", provenance=res.provenance)]
        for raster, data in res.surfaces:
            stem = f"index_surface_{slug(label, 24)}_{slug(Path(raster).stem, 24)}"
            tif = atomic_write_bytes(unique_path(out, stem, ".tif", self.common.taken), data)
            specs.append(LayerSpec("surface", str(tif), f"score: {label} ({Path(raster).name})",
                                   provenance={**res.provenance, "raster": raster}))
        fb.progress(1.0, "done")
        best = f"best score {res.rows[0][1]['score']:.3f}" if res.rows else "no windows found"
        summary = (f"{len(res.rows)} of {res.result.get('total_rows', '?')} windows; {best}"
                   + (f"; {len(res.surfaces)} score surface(s)" if res.surfaces else ""))
        return Outcome(self.title, specs, [a for _, a in res.rows], summary,
                       [str(w) for w in res.result.get("warnings") or ()], {**res.result, "footprint_crs": res.crs},
                       f"index {res.result.get('index', self.params.index)}")


def index_list(client: Any) -> List[Dict[str, Any]]:
    """The indexes open on the backend (name, path, rows)."""
    return list(client.request("index_info", {"index": None}).result.get("indexes") or [])
