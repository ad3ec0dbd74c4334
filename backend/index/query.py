"""Searching an index: a query vector from texts, image chips and example polygons; top-k rows; score surfaces.

The query vector is the normalised mean of the positives (each text, each chip, and the mean of the
windows under the example polygons), minus the normalised mean of the negatives when there are any, then
normalised again ("more like these, not like those"). A window's score is its cosine with the query.
Example polygons use the windows they overlap, each weighted by the share of the window the polygon covers.
Nothing here reads pixels: searches and score surfaces come from the stored embeddings alone (a chip's
pixels are the query's own).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from shared_protocol import ErrorCode

from ..engine import Engine
from ..models.preprocess import value_scale
from .errors import EXAMPLES_OUTSIDE, NO_QUERY, bad, index_error
from .layout import IndexStore, sql_str

RESULT_COLUMNS = ["hit"]  # what a search reads of each hit: one column (see layout.windows_schema)
SURFACE_MAX_SIZE = 4096  # the long side of a score surface, in pixels (coarser than the raster beyond it)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


@dataclass
class Query:
    """What a search asks: positives and negatives of each kind (geometries as GeoJSON in ``crs``)."""
    texts: Sequence[str] = ()
    chips: Sequence[np.ndarray] = ()  # H x W x C images
    examples: Sequence[Dict[str, Any]] = ()
    negatives: Sequence[Dict[str, Any]] = ()
    negative_texts: Sequence[str] = ()
    crs: str = "EPSG:4326"

    def empty(self) -> bool:
        return not (self.texts or len(self.chips) or self.examples)


@dataclass
class QueryVector:
    vector: np.ndarray
    example_ids: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    parts: Dict[str, int] = field(default_factory=dict)


def geometries(obj: Dict[str, Any]) -> List[Dict[str, Any]]:
    """GeoJSON geometries of a geometry, Feature, FeatureCollection or GeometryCollection."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "FeatureCollection":
        return [g for f in obj.get("features", []) for g in geometries(f)]
    if kind == "Feature":
        return geometries(obj["geometry"]) if obj.get("geometry") else []
    if kind == "GeometryCollection":
        return [g for x in obj.get("geometries", []) for g in geometries(x)]
    if kind in ("Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString"):
        return [obj]
    raise bad("bad_geometry", f"not a GeoJSON geometry, Feature or FeatureCollection: type {kind!r}")


def example_windows(store: IndexStore, geoms: Sequence[Dict[str, Any]], crs: str
                    ) -> Tuple[np.ndarray, List[str], int]:
    """The windows the polygons overlap: (weighted mean embedding or empty, their ids, polygons outside).

    Each window's weight is the share of its area the polygons cover (points and lines: 1 for the windows
    that hold them), computed in each raster's own CRS.
    """
    import shapely
    from rasterio.transform import Affine
    from rasterio.warp import transform_geom
    shapes4326 = [shapely.geometry.shape(transform_geom(crs, "EPSG:4326", g)) for g in geoms]
    total = np.zeros(store.manifest.dim)
    weight_sum = 0.0
    ids: List[str] = []
    hit = [False] * len(geoms)
    for raster in store.raster_rows():
        a = Affine(*json.loads(raster["transform"]))
        for gi, (g, g4326) in enumerate(zip(geoms, shapes4326, strict=True)):
            x0, y0, x1, y1 = g4326.bounds
            where = (f"raster_id = {sql_str(raster['raster_id'])} AND lon_max >= {x0!r} AND lon_min <= {x1!r} AND "
                     f"lat_max >= {y0!r} AND lat_min <= {y1!r}")
            rows = store.scan(where, ["id", "col", "row", "width", "height", "vector"])
            if not rows.num_rows:
                continue
            local = shapely.geometry.shape(transform_geom(crs, raster["crs"], g))
            c0 = rows["col"].to_numpy().astype(np.float64)
            r0 = rows["row"].to_numpy().astype(np.float64)
            c1, r1 = c0 + rows["width"].to_numpy(), r0 + rows["height"].to_numpy()
            cols, rws = np.stack([c0, c1, c1, c0, c0], 1), np.stack([r0, r0, r1, r1, r0], 1)
            ring = np.stack([a.a * cols + a.b * rws + a.c, a.d * cols + a.e * rws + a.f], -1)
            wins = shapely.polygons(ring)
            if local.area > 0:
                w = shapely.area(shapely.intersection(wins, local)) / shapely.area(wins)
            else:
                w = shapely.intersects(wins, local).astype(np.float64)
            use = w > 0
            if not use.any():
                continue
            hit[gi] = True
            vec = np.stack(rows["vector"].to_numpy(zero_copy_only=False))[use]
            total += (w[use, None] * vec).sum(0)
            weight_sum += float(w[use].sum())
            ids += [rows["id"][int(i)].as_py() for i in np.flatnonzero(use)]
    mean = total / weight_sum if weight_sum > 0 else np.zeros(0)
    return mean, ids, hit.count(False)


def text_vectors(engine: Engine, texts: Sequence[str], adapter: Optional[str]) -> np.ndarray:
    return engine.encode_texts(list(texts), adapter).float().cpu().numpy()


def chip_vectors(engine: Engine, chips: Sequence[np.ndarray], crop_size: int, adapter: Optional[str]) -> np.ndarray:
    """Each chip encoded as one window over itself, exactly as the index's windows are."""
    out = []
    for chip in chips:
        box = np.array([[0, 0, chip.shape[1], chip.shape[0]]], np.int64)
        out.append(engine.encode_windows(chip, box, crop_size, adapter, value_scale(chip[None])).float().cpu()
                   .numpy()[0])
    return np.stack(out) if out else np.zeros((0, engine.loaded.embed_dim), np.float32)


def query_vector(engine: Optional[Engine], store: IndexStore, query: Query) -> QueryVector:
    """The unit query vector (see the module's docstring); typed errors for an empty query or examples that
    miss every indexed window."""
    if query.empty():
        raise bad(NO_QUERY, "a search needs a text, an image chip or example polygons (negatives alone are "
                  "not a query)")
    adapter = store.manifest.model.get("adapter")
    crop = store.manifest.windows.crop_size
    out = QueryVector(np.zeros(0))

    def side(texts: Sequence[str], chips: Sequence[np.ndarray], examples: Sequence[Dict[str, Any]], name: str
             ) -> Optional[np.ndarray]:
        vecs: List[np.ndarray] = []
        if texts:
            vecs += list(text_vectors(engine, texts, adapter))
        if len(chips):
            vecs += list(chip_vectors(engine, chips, crop, adapter))
        if examples:
            geoms = [g for e in examples for g in geometries(e)]
            mean, ids, outside = example_windows(store, geoms, query.crs)
            if not ids:
                raise index_error(ErrorCode.NOT_FOUND, EXAMPLES_OUTSIDE, f"none of the {len(geoms)} {name} "
                                  "polygon(s) overlaps an indexed window (outside every footprint, or only over "
                                  "nodata)", count=len(geoms))
            if outside:
                out.warnings.append(f"{outside} of {len(geoms)} {name} polygon(s) overlap no indexed window and "
                                    "were left out")
            if name == "example":
                out.example_ids = ids
            out.parts[f"{name}_windows"] = len(ids)
            vecs.append(_unit(mean))
        if not vecs:
            return None
        return _unit(np.mean([_unit(np.asarray(v, np.float64)) for v in vecs], axis=0))

    pos = side(query.texts, query.chips, query.examples, "example")
    neg = side(query.negative_texts, (), query.negatives, "negative")
    vec = pos if neg is None else _unit(pos - neg)
    out.vector = vec.astype(np.float32)
    return out


def extent_where(extent: Optional[Sequence[float]], crs: Optional[str]) -> Optional[str]:
    """A filter on the windows whose EPSG:4326 bounds meet ``extent`` (xmin, ymin, xmax, ymax in ``crs``)."""
    if not extent:
        return None
    from rasterio.warp import transform_bounds
    x0, y0, x1, y1 = transform_bounds(crs or "EPSG:4326", "EPSG:4326", *extent, densify_pts=21)
    return f"lon_max >= {x0!r} AND lon_min <= {x1!r} AND lat_max >= {y0!r} AND lat_min <= {y1!r}"


def hit_fields(r: Dict[str, Any]) -> Dict[str, Any]:
    """A window's row (its columns by name) as a search hit gives it, less the score: stored once per row in
    the ``hit`` column at build time."""
    return {"id": r["id"], "raster": r["raster"], "window": [r["col"], r["row"], r["width"], r["height"]],
            "size": r["size"], "date": r["date"], "valid": round(float(r["valid"]), 4),
            "footprint": {"crs": r["crs"], "bounds": [r["minx"], r["miny"], r["maxx"], r["maxy"]],
                          "bounds_4326": [r["lon_min"], r["lat_min"], r["lon_max"], r["lat_max"]], "wkt": r["wkt"]}}


def result_row(r: Dict[str, Any]) -> Dict[str, Any]:
    """A search hit as the protocol and the CLI give it: the stored ``hit`` and the score."""
    return {**json.loads(r["hit"]), "score": float(r["score"])}


def search(store: IndexStore, vector: np.ndarray, top_k: int, where: Optional[str] = None,
           exclude: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """The ``top_k`` best windows (among ``where``, without the ids in ``exclude``), best first."""
    drop = set(exclude)
    table = store.search(vector, top_k + len(drop), where, RESULT_COLUMNS)
    rows = [r for r in map(result_row, table.to_pylist()) if r["id"] not in drop]
    rows.sort(key=lambda r: -r["score"])
    return rows[:top_k]


@dataclass
class Surface:
    """A score surface over one raster: ``scores`` (H x W float32, NaN where no window was indexed)."""
    raster: str
    scores: np.ndarray
    transform: List[float]
    crs: str
    step: int  # raster pixels per surface pixel


def score_surface(store: IndexStore, vector: np.ndarray, raster: Dict[str, Any],
                  max_size: int = SURFACE_MAX_SIZE) -> Surface:
    """Every window's score, as localize's per-pixel mean of the windows covering each pixel (before its
    normalisation and smoothing), over one raster of the index; coarser than the raster beyond ``max_size``."""
    from rasterio.transform import Affine
    from ..tasks.windows import cell_means
    h, w = int(raster["height"]), int(raster["width"])
    t = store.scan(f"raster_id = {sql_str(raster['raster_id'])}", ["col", "row", "width", "height", "vector"])
    c0, r0 = t["col"].to_numpy().astype(np.int64), t["row"].to_numpy().astype(np.int64)
    boxes = np.stack([c0, r0, c0 + t["width"].to_numpy(), r0 + t["height"].to_numpy()], 1)
    vecs = np.stack(t["vector"].to_numpy(zero_copy_only=False)) if t.num_rows else np.zeros((0, len(vector)))
    scores = vecs.astype(np.float64) @ vector.astype(np.float64)
    step = max(1, math.ceil(max(h, w) / max_size))
    oh, ow = math.ceil(h / step), math.ceil(w / step)
    if not len(boxes):
        return Surface(raster["raster"], np.full((oh, ow), np.nan, np.float32),
                       list(Affine(*json.loads(raster["transform"])) * Affine.scale(step))[:6], raster["crs"], step)
    cells, ys, xs = cell_means(boxes, np.stack([scores, np.ones_like(scores)], 1), h, w)
    py = np.minimum(h - 1, (np.arange(oh) * step + step // 2))
    px = np.minimum(w - 1, (np.arange(ow) * step + step // 2))
    iy, ix = np.searchsorted(ys, py, side="right") - 1, np.searchsorted(xs, px, side="right") - 1
    values, covered = cells[0][np.ix_(iy, ix)], cells[1][np.ix_(iy, ix)]
    values = np.where(covered > 0, values, np.nan).astype(np.float32)
    transform = Affine(*json.loads(raster["transform"])) * Affine.scale(step)
    return Surface(raster["raster"], values, list(transform)[:6], raster["crs"], step)


def surface_geotiff(surface: Surface) -> bytes:
    """A float32 GeoTIFF of a score surface (NaN nodata, deflate, tiled when large), in memory."""
    from rasterio.io import MemoryFile
    from rasterio.transform import Affine
    h, w = surface.scores.shape
    profile: Dict[str, Any] = {"driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "float32",
                               "transform": Affine(*surface.transform), "crs": surface.crs, "nodata": float("nan"),
                               "compress": "deflate", "predictor": 3}
    if h >= 256 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(surface.scores, 1)
            dst.update_tags(1, DESCRIPTION="index score: mean cosine of the windows covering each pixel",
                            SOURCE=surface.raster)
        return bytes(mem.read())
