"""Georeferenced outputs: heatmaps as GeoTIFF bytes, thresholded regions as GeoJSON polygons."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from shapely.geometry import mapping, shape

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.crs import crs_form


def parse_crs(crs: Optional[str]) -> Optional[CRS]:
    """A CRS from an authority code, WKT or PROJJSON, each through its own parser: never
    ``from_user_input``/``from_string``, which hand PROJ strings (``+init=FILE``) and file names to PROJ."""
    if not crs:
        return None
    try:
        form, text = crs_form(crs)
        if form == "authority":
            authority, code = text.split(":", 1)
            return CRS.from_authority(authority.upper(), code)
        if form == "projjson":
            import pyproj
            return CRS.from_wkt(pyproj.CRS.from_json(text).to_wkt())
        return CRS.from_wkt(text)
    except Exception as exc:
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"cannot understand crs {crs[:80]!r}: {exc}",
                            {"param": "crs"}) from None


def to_affine(transform: Optional[Sequence[float]]) -> Affine:
    return Affine(*transform) if transform else Affine.identity()


def heatmap_geotiff(heatmap: np.ndarray, transform: Optional[Sequence[float]], crs: Optional[str]) -> bytes:
    """A single-band float32 GeoTIFF (deflate, tiled when large, nodata NaN) of ``heatmap`` in memory."""
    h, w = heatmap.shape
    profile: Dict[str, Any] = {
        "driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "float32", "nodata": float("nan"),
        "transform": to_affine(transform), "compress": "deflate", "predictor": 3,
    }
    if h >= 256 and w >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    parsed = parse_crs(crs)
    if parsed is not None:
        profile["crs"] = parsed
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(heatmap.astype(np.float32, copy=False), 1)
            dst.update_tags(1, DESCRIPTION="semantic localization heatmap (0-1)")
        return bytes(mem.read())


def heatmap_polygons(heatmap: np.ndarray, threshold: float, transform: Optional[Sequence[float]],
                     query: str, max_regions: int = 500) -> Dict[str, Any]:
    """Regions where ``heatmap >= threshold`` (never NaN pixels) as a GeoJSON FeatureCollection in the canvas CRS.

    Each feature carries the query, its mean and max score and its area (CRS units squared); the
    largest ``max_regions`` regions are kept.
    """
    mask = heatmap >= threshold
    if not mask.any():
        return {"type": "FeatureCollection", "features": []}
    from scipy import ndimage
    labels, count = ndimage.label(mask)
    index = np.arange(1, count + 1)
    means = ndimage.mean(heatmap, labels, index)
    maxes = ndimage.maximum(heatmap, labels, index)
    affine = to_affine(transform)
    polys: Dict[int, List[Any]] = {}
    for geom, value in shapes(labels.astype(np.int32), mask=mask, transform=affine, connectivity=4):
        polys.setdefault(int(value), []).append(shape(geom))
    features = []
    for lab, parts in polys.items():
        geom = parts[0] if len(parts) == 1 else _union(parts)
        features.append({
            "type": "Feature", "geometry": mapping(geom),
            "properties": {"query": query, "score_mean": float(means[lab - 1]), "score_max": float(maxes[lab - 1]),
                           "area": float(geom.area)},
        })
    features.sort(key=lambda f: -f["properties"]["area"])
    return {"type": "FeatureCollection", "features": features[:max_regions]}


def _union(parts: List[Any]) -> Any:
    from shapely.ops import unary_union
    return unary_union(parts)
