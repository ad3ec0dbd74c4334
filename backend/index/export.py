"""GeoParquet export of an index's windows (geometry as WKB in EPSG:4326 / OGC:CRS84 longitude-latitude, with
the ``geo`` metadata of GeoParquet 1.1), and reading example polygons from GeoPackage, GeoJSON, Shapefile ..."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

from ..files import atomic_file
from .errors import bad
from .layout import IndexStore

GEOPARQUET_VERSION = "1.1.0"


def export_geoparquet(store: IndexStore, out: os.PathLike, embeddings: bool = False) -> Dict[str, Any]:
    """Write every window row (its embedding too with ``embeddings``) to ``out``: complete or absent."""
    import pyarrow.parquet as pq
    columns = [f.name for f in store.windows.schema if embeddings or f.name != "vector"]
    table = store.scan(None, columns)
    bbox = [min(table["lon_min"].to_pylist(), default=0.0), min(table["lat_min"].to_pylist(), default=0.0),
            max(table["lon_max"].to_pylist(), default=0.0), max(table["lat_max"].to_pylist(), default=0.0)]
    geo = {"version": GEOPARQUET_VERSION, "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "bbox": bbox}}}
    meta = dict(table.schema.metadata or {})
    meta[b"geo"] = json.dumps(geo).encode()
    meta[b"mapquery_index"] = json.dumps(store.manifest.to_dict()).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_file(out) as f:
        pq.write_table(table, f, compression="zstd")
    return {"out": str(out), "rows": table.num_rows, "columns": columns}


def read_features(path: os.PathLike, layer: Any = None) -> Tuple[Dict[str, Any], str]:
    """A vector file's geometries as a GeoJSON FeatureCollection, and its CRS (pyogrio; reprojection is the
    search's)."""
    import pyogrio.raw
    import shapely
    if not os.path.isfile(path):
        raise bad("examples_unreadable", f"{path}: no such file", path=str(path))
    try:
        meta, _, wkb, _ = pyogrio.raw.read(str(path), layer=layer, read_geometry=True)[:4]
    except Exception as exc:
        raise bad("examples_unreadable", f"{path}: cannot read features ({exc})", path=str(path)) from None
    if wkb is None or not len(wkb):
        raise bad("examples_unreadable", f"{path} holds no features", path=str(path))
    crs = meta.get("crs")
    if not crs:
        raise bad("examples_unreadable", f"{path} has no CRS", path=str(path))
    geoms = [shapely.from_wkb(g) for g in wkb if g is not None]
    features = [{"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(g)} for g in geoms]
    return {"type": "FeatureCollection", "features": features}, crs


def write_hits_gpkg(rows: list, out: os.PathLike) -> None:
    """Ranked search hits as a GeoPackage of EPSG:4326 footprints (rank, score, raster, window, size, date)."""
    import numpy as np
    import pyogrio.raw
    import shapely
    geoms = np.array([shapely.to_wkb(shapely.from_wkt(r["footprint"]["wkt"])) for r in rows], dtype=object)
    fields = {"rank": np.arange(1, len(rows) + 1, dtype=np.int32),
              "score": np.array([r["score"] for r in rows], np.float64),
              "raster": np.array([r["raster"] for r in rows], dtype=object),
              "window": np.array([json.dumps(r["window"]) for r in rows], dtype=object),
              "size": np.array([r["size"] for r in rows], np.int32),
              "date": np.array([r["date"] for r in rows], dtype=object)}
    tmp = f"{out}.part.gpkg"
    pyogrio.raw.write(tmp, geoms, list(fields.values()), list(fields), driver="GPKG", geometry_type="Polygon",
                      crs="EPSG:4326", layer="hits")
    os.replace(tmp, out)
