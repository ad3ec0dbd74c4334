"""Localize: semantic localization (SeLo) heatmaps of text queries -> float32 GeoTIFFs, NaN = no data.

The fast mode (the default) makes the backend's fast-mode map of the whole source as one canvas, block by
block (:mod:`localize_scene`): each of the source's SeLo windows is encoded once, in the block that holds its
top-left corner, and the map is made from their scores by the backend's own code (``shared_protocol.selo``)
and written a block at a time, so memory follows the block size, not the source. Pixels invalid in
the mask (nodata, transparent, outside the footprint or the area of interest) and pixels no kept window
covers are NaN; the min-max normalisation uses the valid pixels only.

``selo_mode="reference"`` runs the original SeLo pipeline (the backend's reference mode) on the whole source
as one canvas: one min-max over the image, as the original, so no blocks; the original has no notion of
nodata, so it scores every pixel and the invalid ones are blanked (NaN) afterwards, with a warning.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from shared_protocol.defaults import DEFAULT_SMOOTH, DEFAULT_WINDOW_SIZES, MIN_VALID_SHARE
from shared_protocol.ops import SELO_MODES

from ..errors import PluginError
from ..outputs import GeotiffWriter, slug, unique_path, write_mask_polygons_gpkg
from .base import Common, Feedback, LayerSpec, Outcome, Wire, provenance, warnings_of, where_of
from .localize_scene import SceneMap, localize_scene

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
    block_px: int = DEFAULT_BLOCK  # pixels per request on a side (at least the largest window)
    min_valid: float = MIN_VALID_SHARE
    selo_mode: str = "fast"  # "reference": the original pipeline, the whole source as one canvas

    def __post_init__(self) -> None:
        self.queries = [q.strip() for q in self.queries if q.strip()]
        if not self.queries:
            raise PluginError("type a query to localize")
        if int(self.block_px) < 1:
            raise PluginError(f"the block size must be a positive number of pixels, not {self.block_px}")
        if self.selo_mode not in SELO_MODES:
            raise PluginError(f"selo_mode must be one of {', '.join(SELO_MODES)}, not {self.selo_mode!r}")


@dataclass
class LocalizeResult:
    """The maps, made a block at a time (:meth:`blocks`), and what to say about them."""

    height: int
    width: int
    transform: Sequence[float]
    crs_wkt: str
    stats: List[Dict[str, Any]] = field(default_factory=list)
    windows: int = 0
    warnings: List[str] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=dict)
    provenance: List[Dict[str, Any]] = field(default_factory=list)  # one per query
    scene: Optional[SceneMap] = None  # the fast mode's maps
    heatmaps: Optional[np.ndarray] = None  # reference mode: Q x H x W float32, 0-1, NaN = no data
    total_windows: int = 0  # the source's SeLo windows (fast mode)
    sent_windows: int = 0  # sent to the backend, each once (fast mode)

    def blocks(self) -> Iterator[Tuple[int, int, np.ndarray]]:
        """(first row, first column, Q x rows x columns float32) covering the map."""
        if self.scene is not None:
            yield from self.scene.blocks()
        else:
            yield 0, 0, self.heatmaps

    def write(self, paths: Sequence[Optional[Path]], fb: Optional[Feedback] = None) -> None:
        """Query ``q``'s map to ``paths[q]`` (None: not written), each a GeoTIFF written block by block, complete
        or absent."""
        with ExitStack() as stack:
            outs = {q: stack.enter_context(GeotiffWriter(path, self.width, self.height, 1, self.transform, self.crs_wkt,
                                                       [f"heatmap: {self.provenance[q]['query']}"], NODATA,
                                                       self.provenance[q]))
                    for q, path in enumerate(paths) if path is not None}
            for row0, col0, maps in self.blocks():
                if fb is not None:
                    fb.check()
                    fb.progress(0.9 + 0.1 * row0 / self.height, "writing the heatmaps")
                for q, out in outs.items():
                    out.write(row0, maps[q], col0)
            for out in outs.values():
                out.commit()


class LocalizeProcessor:
    def __init__(self, source: Any, params: LocalizeParams, common: Common):
        self.source, self.params, self.common = source, params, common
        h, w = source.height, source.width  # the source is one canvas, whatever the blocks
        self.window_sizes = list(params.window_sizes) if params.window_sizes else auto_window_sizes(h, w)
        self.smooth = auto_smooth(h, w) if params.smooth is None else int(params.smooth)
        self.title = "localize: " + "; ".join(params.queries)
        largest = max(min(int(s), max(h, w)) for s in self.window_sizes)
        self.block_px = max(int(params.block_px), largest)
        self.notes = [] if self.block_px == params.block_px else [
            f"blocks of {params.block_px} px are smaller than the largest window ({largest} px): blocks of "
            f"{self.block_px} px were used"]

    def compute(self, client: Any, fb: Feedback) -> LocalizeResult:
        if self.params.selo_mode == "reference":
            return self._compute_reference(client, fb)
        p, src = self.params, self.source
        wire = Wire(client, fb, p.min_valid)
        request = {"value_range": src.value_range(), "adapter": self.common.adapter}
        scene = localize_scene(src, p.queries, self.window_sizes, self.smooth, self.block_px, wire, fb, request)
        tiling = f"SeLo windows {', '.join(map(str, self.window_sizes))} px, median {self.smooth} px"
        if src.height > self.block_px or src.width > self.block_px:
            tiling += f", blocks of {self.block_px} px"
        prov = [provenance(src, self.common, scene.result, q, tiling) for q in p.queries]
        return LocalizeResult(src.height, src.width, src.transform, src.crs_wkt, scene.stats, scene.windows,
                              self.notes + wire.warnings + warnings_of(scene.result), scene.result, prov,
                              scene=scene.maps, total_windows=scene.total, sent_windows=scene.sent)

    def _compute_reference(self, client: Any, fb: Feedback) -> LocalizeResult:
        """The backend's reference mode on the whole source: the 8-bit map / 255 as it comes, invalid pixels
        blanked afterwards (the original pipeline scores them)."""
        p, src = self.params, self.source
        cap = src.read(0, src.height, 0, src.width)
        params = {"queries": list(p.queries), "window_sizes": self.window_sizes, "smooth": self.smooth,
                  "selo_mode": "reference", "value_range": src.value_range(), "adapter": self.common.adapter}
        reply = Wire(client, fb, p.min_valid).localize(cap.pixels, None, params, (0.0, 0.9))
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
        return LocalizeResult(src.height, src.width, src.transform, src.crs_wkt, stats,
                              int(reply.result.get("windows", 0) or 0), warnings, reply.result, prov, heatmaps=heat)

    def run(self, client: Any, fb: Feedback) -> Outcome:
        res = self.compute(client, fb)
        paths = [unique_path(Path(self.common.out_dir), f"heatmap_{slug(query)}", ".tif", self.common.taken)
                 for query in self.params.queries]
        res.write(paths, fb)
        specs = [LayerSpec("heatmap", str(path), f"heatmap: {query}", provenance=res.provenance[q])
                 for q, (query, path) in enumerate(zip(self.params.queries, paths, strict=True))]
        fb.progress(1.0, "done")
        valid = res.stats[0]["valid_share"] if res.stats else 1.0
        return Outcome(self.title, specs, res.stats,
                       f"{len(specs)} heatmap(s) of {res.width} x {res.height} px from {res.windows or '?'} windows"
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
