"""Classify: zero-shot labels on a grid of tiles -> polygons with the best label and its probability."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from shared_protocol.defaults import DEFAULT_TILE_SIZE, MIN_VALID_SHARE

from ..errors import PluginError
from ..outputs import unique_path, write_polygons_gpkg
from .base import (MIN_TILE, PROVENANCE_FIELDS, Common, Feedback, LayerSpec, Outcome, Row, Wire, provenance,
                   tile_batches, warnings_of, where_of)

TABLE_FIELDS = ("label", "tiles", "area_km2", "share")


def class_table(rows: Sequence[Row], crs: Any) -> List[Dict[str, Any]]:
    """Per class: tiles, their ellipsoidal area (km2, cells clipped to the capture) and share of the labelled
    area, most tiles first."""
    from qgis.core import QgsCoordinateTransformContext, QgsDistanceArea, QgsGeometry, QgsPointXY, QgsUnitTypes
    da = QgsDistanceArea()
    da.setSourceCrs(crs, QgsCoordinateTransformContext())
    da.setEllipsoid(crs.ellipsoidAcronym() or "EPSG:7030")
    per: Dict[str, List[float]] = {}
    for ring, attrs in rows:
        area = da.measureArea(QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in ring]]))
        km2 = da.convertAreaMeasurement(area, QgsUnitTypes.AreaSquareKilometers)
        entry = per.setdefault(attrs["label"], [0, 0.0])
        entry[0] += 1
        entry[1] += km2
    total = sum(a for _, a in per.values()) or 1.0
    return [{"label": k, "tiles": n, "area_km2": a, "share": a / total}
            for k, (n, a) in sorted(per.items(), key=lambda kv: (-kv[1][0], kv[0]))]


FIELDS = [("tile", "int"), ("label", "string"), ("score", "double"), ("top", "string"), *PROVENANCE_FIELDS]


@dataclass
class ClassifyParams:
    classes: Sequence[str]
    tile_px: int = DEFAULT_TILE_SIZE
    stride_px: Optional[int] = None
    top_k: int = 3
    templates: str = "georsclip"
    batch: int = 64
    min_valid: float = MIN_VALID_SHARE

    def __post_init__(self) -> None:
        self.classes = [c.strip() for c in self.classes if c.strip()]
        if not self.classes:
            raise PluginError("give at least one class name")
        if int(self.tile_px) < MIN_TILE:
            raise PluginError(f"tiles need at least {MIN_TILE} pixels, not {self.tile_px}")
        self.tile_px, self.top_k, self.batch = int(self.tile_px), int(self.top_k), max(1, int(self.batch))


@dataclass
class ClassifyResult:
    rows: List[Row] = field(default_factory=list)
    skipped: int = 0
    warnings: List[str] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)

    def counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for _, a in self.rows:
            counts[a["label"]] = counts.get(a["label"], 0) + 1
        return counts


class ClassifyProcessor:
    """Labels every tile of ``source`` with at least ``min_valid`` valid pixels; tiles below are skipped (the
    plugin does not send them, and a tile the backend reports ``skipped`` gets no feature either)."""

    def __init__(self, source: Any, params: ClassifyParams, common: Common):
        self.source, self.params, self.common = source, params, common
        self.title = f"classify ({len(params.classes)} classes, {params.tile_px} px tiles)"

    def compute(self, client: Any, fb: Feedback) -> ClassifyResult:
        p = self.params
        wire = Wire(client, fb, p.min_valid)
        out = ClassifyResult()
        value_range = self.source.value_range()
        for b in tile_batches(self.source, p.tile_px, p.stride_px, p.batch, p.min_valid, fb):
            out.skipped += b.skipped
            if not b.numbers:
                fb.progress(0.95 * b.progress[1])
                continue
            fb.check()
            reply = wire.request("classify", {"classes": list(p.classes), "top_k": min(p.top_k, len(p.classes)),
                                              "templates": p.templates, "value_range": value_range,
                                              "adapter": self.common.adapter},
                                 {"tiles": b.tiles}, {"tiles": b.masks}, (0.95 * b.progress[0], 0.95 * b.progress[1]))
            out.result = reply.result
            for tile in reply.result["tiles"]:
                i = int(tile["index"])
                if tile.get("skipped") or not tile.get("top"):
                    out.skipped += 1
                    continue
                top = tile["top"]
                attrs = {"tile": b.numbers[i], "label": top[0]["label"], "score": float(top[0]["score"]),
                         "top": "; ".join(f"{t['label']} {t['score']:.3f}" for t in top)}
                out.rows.append((b.capture.box_to_map(*[int(v) for v in b.cells[i]]), attrs))
        out.warnings = wire.warnings + warnings_of(out.result)
        tiling = f"{p.tile_px} px tiles" + (f", stride {p.stride_px} px" if p.stride_px else "")
        out.provenance = provenance(self.source, self.common, out.result, "classes: " + ", ".join(p.classes), tiling)
        for _, attrs in out.rows:
            attrs.update(out.provenance)
        return out

    def run(self, client: Any, fb: Feedback) -> Outcome:
        res = self.compute(client, fb)
        fb.check()
        path = unique_path(Path(self.common.out_dir), "classify", ".gpkg", self.common.taken)
        write_polygons_gpkg(path, "classification", FIELDS, res.rows, self.source.crs())
        fb.progress(1.0, "done")
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(res.counts().items(), key=lambda kv: -kv[1]))
        skipped = f" ({res.skipped} skipped: too few valid pixels)" if res.skipped else ""
        spec = LayerSpec("classification", str(path), "classification", list(self.params.classes), res.provenance)
        return Outcome(self.title, [spec],
                       [a for _, a in res.rows], f"{len(res.rows)} tiles{skipped}; {summary}", res.warnings,
                       res.result, where_of(self.source), class_table(res.rows, self.source.crs()))
