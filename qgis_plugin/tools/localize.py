"""Localize: semantic localization (SeLo) heatmaps of text queries -> float32 GeoTIFFs, NaN = no data.

The backend returns raw scores (``normalize=false``) per block; blocks are read with a margin of the largest
window plus the median kernel, from an origin on the common grid of the window strides and smoothing blocks,
so the stitched map equals one whole-source request without seams. Pixels invalid in the mask (nodata,
transparent, outside the footprint or the area of interest) and pixels no kept window covered are NaN; the
maps are then min-max normalised to 0-1 over the valid pixels only.

``selo_mode="reference"`` runs the original SeLo pipeline (the backend's reference mode) on the whole source
as one canvas: one min-max over the image, as the original, so no blocks; the original has no notion of
nodata, so it scores every pixel and the invalid ones are blanked (NaN) afterwards, with a warning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.defaults import DEFAULT_SMOOTH, DEFAULT_WINDOW_SIZES, MIN_VALID_SHARE
from shared_protocol.ops import SELO_MODES, SMOOTH_WORK_KERNEL

from ..errors import PluginError
from ..masks import valid_share
from ..outputs import slug, unique_path, write_geotiff, write_mask_polygons_gpkg
from .base import Common, Feedback, LayerSpec, Outcome, Wire, provenance, warnings_of, where_of

NODATA = float("nan")
DEFAULT_BLOCK = 2048


def auto_window_sizes(height: int, width: int) -> List[int]:
    """SeLo's 256/512/768 px windows, scaled down for canvases smaller than 1024 px."""
    side = min(height, width)
    if side >= 4 * DEFAULT_WINDOW_SIZES[0]:
        return list(DEFAULT_WINDOW_SIZES)
    return sorted({max(16, int(side * f)) for f in (0.25, 0.5, 0.75)})


def auto_smooth(height: int, width: int) -> int:
    """SeLo's 251 px median for large canvases; about 1/8 of the short side (odd) for small ones."""
    k = min(DEFAULT_SMOOTH, max(0, min(height, width) // 8))
    return k | 1 if k > 1 else 0


@dataclass
class LocalizeParams:
    queries: Sequence[str]
    window_sizes: Optional[Sequence[int]] = None  # None: SeLo's, scaled to the block
    smooth: Optional[int] = None  # None: SeLo's, scaled to the block
    block_px: int = DEFAULT_BLOCK  # whole-raster sources: pixels per request on a side
    min_valid: float = MIN_VALID_SHARE
    selo_mode: str = "fast"  # "reference": the original pipeline, the whole source as one canvas

    def __post_init__(self) -> None:
        self.queries = [q.strip() for q in self.queries if q.strip()]
        if not self.queries:
            raise PluginError("type a query to localize")
        if self.selo_mode not in SELO_MODES:
            raise PluginError(f"selo_mode must be one of {', '.join(SELO_MODES)}, not {self.selo_mode!r}")


@dataclass
class LocalizeResult:
    heatmaps: np.ndarray  # Q x H x W float32, 0-1, NaN = no data
    transform: Sequence[float]
    crs_wkt: str
    stats: List[Dict[str, Any]] = field(default_factory=list)
    windows: int = 0
    warnings: List[str] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=dict)
    provenance: List[Dict[str, Any]] = field(default_factory=list)  # one per query


class LocalizeProcessor:
    def __init__(self, source: Any, params: LocalizeParams, common: Common):
        self.source, self.params, self.common = source, params, common
        if params.selo_mode == "reference":  # one canvas: the original normalises over the whole image
            params.block_px = max(source.height, source.width)
        h, w = min(params.block_px, source.height), min(params.block_px, source.width)
        self.window_sizes = list(params.window_sizes) if params.window_sizes else auto_window_sizes(h, w)
        self.smooth = auto_smooth(h, w) if params.smooth is None else int(params.smooth)
        self.title = "localize: " + "; ".join(params.queries)

    def compute(self, client: Any, fb: Feedback) -> LocalizeResult:
        if self.params.selo_mode == "reference":
            return self._compute_reference(client, fb)
        p, src = self.params, self.source
        wire = Wire(client, fb, p.min_valid)
        align = math.lcm(*[max(1, s // 2) for s in self.window_sizes], *self.window_sizes,
                         max(1, self.smooth // SMOOTH_WORK_KERNEL))
        margin = max(self.window_sizes) + self.smooth
        heat = np.full((len(p.queries), src.height, src.width), np.nan, np.float32)
        value_range = src.value_range()
        result: Dict[str, Any] = {}
        windows = 0
        for blk in src.blocks(p.block_px, margin, align):
            fb.check()
            cap, (r0, r1, c0, c1), (gr, gc) = blk.capture, blk.inner, blk.origin
            span = (0.95 * blk.index / blk.count, 0.95 * (blk.index + 1) / blk.count)
            if valid_share(cap.mask) == 0.0:
                fb.progress(span[1])
                continue
            params = {"queries": list(p.queries), "window_sizes": self.window_sizes, "smooth": self.smooth,
                      "normalize": False, "value_range": value_range, "adapter": self.common.adapter}
            try:
                reply = wire.localize(cap.pixels, cap.mask, params, span)
            except ProtocolError as exc:
                if exc.code == ErrorCode.BAD_PARAMS and (exc.details or {}).get("reason") == "no_valid_pixels":
                    continue  # nothing in this block has enough valid pixels for a window
                raise
            maps = np.array(reply.arrays["heatmaps"], dtype=np.float32)
            if maps.shape[1:] != (cap.height, cap.width):
                raise PluginError(f"the backend sent heatmaps of {maps.shape[2]} x {maps.shape[1]} for a "
                                  f"{cap.width} x {cap.height} canvas")
            maps[:, ~cap.valid()] = np.nan  # a backend without masks scores nodata too
            heat[:, gr:gr + r1 - r0, gc:gc + c1 - c0] = maps[:, r0:r1, c0:c1]
            result = reply.result
            windows += int(reply.result.get("windows", 0) or 0)
        stats = []
        for q, query in enumerate(p.queries):
            h = heat[q]
            ok = np.isfinite(h)
            if not ok.any():
                raise PluginError("no valid pixels to localize in: the area is nodata, transparent or outside the "
                                  "raster or the area of interest")
            lo, hi = float(h[ok].min()), float(h[ok].max())
            stats.append({"query": query, "min": lo, "max": hi, "mean": float(h[ok].mean()),
                          "valid_share": float(ok.mean())})
            h[ok] = (h[ok] - lo) / (hi - lo) if hi > lo else 0.0
        tiling = f"SeLo windows {', '.join(map(str, self.window_sizes))} px, median {self.smooth} px"
        if src.height > p.block_px or src.width > p.block_px:
            tiling += f", blocks of {p.block_px} px"
        prov = [provenance(src, self.common, result, q, tiling) for q in p.queries]
        return LocalizeResult(heat, src.transform, src.crs_wkt, stats, windows, wire.warnings + warnings_of(result),
                              result, prov)

    def _compute_reference(self, client: Any, fb: Feedback) -> LocalizeResult:
        """The backend's reference mode on the whole source: the 8-bit map / 255 as it comes, invalid pixels
        blanked afterwards (the original pipeline scores them)."""
        p, src = self.params, self.source
        cap = next(iter(src.blocks(p.block_px, 0, 1))).capture
        params = {"queries": list(p.queries), "window_sizes": self.window_sizes, "smooth": self.smooth,
                  "selo_mode": "reference", "value_range": src.value_range(), "adapter": self.common.adapter}
        reply = Wire(client, fb, p.min_valid).localize(cap.pixels, None, params, (0.0, 0.95))
        heat = np.array(reply.arrays["heatmaps"], dtype=np.float32)
        valid = cap.valid()
        warnings = warnings_of(reply.result)
        if not valid.all():
            heat[:, ~valid] = np.nan
            warnings.append(f"reference mode scores every pixel, as the original pipeline: {100 * (~valid).mean():.0f}"
                            " % of the pixels are nodata, transparent or outside the area of interest and were "
                            "blanked afterwards (the fast mode leaves them out of the windows)")
        stats = [{"query": q, "min": float(np.nanmin(heat[i])), "max": float(np.nanmax(heat[i])),
                  "mean": float(np.nanmean(heat[i])), "valid_share": float(valid.mean())}
                 for i, q in enumerate(p.queries)]
        tiling = (f"SeLo reference mode, windows {', '.join(map(str, self.window_sizes))} px, "
                  f"median {self.smooth} px")
        prov = [provenance(src, self.common, reply.result, q, tiling) for q in p.queries]
        return LocalizeResult(heat, src.transform, src.crs_wkt, stats, int(reply.result.get("windows", 0) or 0),
                              warnings, reply.result, prov)

    def run(self, client: Any, fb: Feedback) -> Outcome:
        res = self.compute(client, fb)
        specs = []
        for q, query in enumerate(self.params.queries):
            fb.check()
            path = unique_path(Path(self.common.out_dir), f"heatmap_{slug(query)}", ".tif", self.common.taken)
            write_geotiff(path, res.heatmaps[q], res.transform, res.crs_wkt, [f"heatmap: {query}"], NODATA,
                          res.provenance[q])
            specs.append(LayerSpec("heatmap", str(path), f"heatmap: {query}", provenance=res.provenance[q]))
        fb.progress(1.0, "done")
        h, w = res.heatmaps.shape[1:]
        valid = res.stats[0]["valid_share"] if res.stats else 1.0
        return Outcome(self.title, specs, res.stats,
                       f"{len(specs)} heatmap(s) of {w} x {h} px from {res.windows or '?'} windows"
                       + (f"; {100 * valid:.0f} % of the pixels valid" if valid < 1 else ""), res.warnings,
                       res.result, where_of(self.source))


def heatmap_regions(heatmap_path: str, threshold: float, common: Common) -> LayerSpec:
    """The regions of a heatmap GeoTIFF at or above ``threshold`` (NaN = nodata never counts) as polygons in a
    new GeoPackage of the output folder."""
    from osgeo import gdal
    if not 0.0 <= threshold <= 1.0:
        raise PluginError(f"the threshold must be between 0 and 1, not {threshold:g}")
    ds = gdal.Open(str(heatmap_path))
    if ds is None:
        raise PluginError(f"cannot open the heatmap {heatmap_path}")
    band = ds.GetRasterBand(1)
    heat = band.ReadAsArray().astype(np.float32)
    c, a, b, f, d, e = ds.GetGeoTransform()
    name = band.GetDescription() or Path(heatmap_path).stem
    query = name.split(": ", 1)[-1]
    mask = np.isfinite(heat) & (heat >= threshold)
    path = unique_path(Path(common.out_dir), f"regions_{slug(query)}", ".gpkg", common.taken)
    write_mask_polygons_gpkg(path, mask, (a, b, c, d, e, f), ds.GetProjection(),
                             {"query": query, "threshold": float(threshold), **{
                                 k[len("MAPQUERY_"):].lower(): v for k, v in (ds.GetMetadata() or {}).items()
                                 if k.startswith("MAPQUERY_") and k != "MAPQUERY_QUERY"}})
    return LayerSpec("regions", str(path), f"regions >= {threshold:g}: {query}")
