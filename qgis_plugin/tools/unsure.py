"""Where is it unsure? Classify a source with an adapter and keep the tiles with the least margin between the two
best classes, as polygons to label next (the class field left empty): the active-learning step of Adapt."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from shared_protocol.defaults import DEFAULT_TILE_SIZE, MIN_VALID_SHARE

from ..errors import PluginError
from ..outputs import unique_path, write_polygons_gpkg
from .base import Common, Feedback, LayerSpec, Outcome, Row, Wire, tile_batches, warnings_of, where_of


@dataclass
class UnsureParams:
    adapter: str
    classes: Sequence[str]
    class_field: str = "class"
    count: int = 20
    tile_px: int = DEFAULT_TILE_SIZE
    batch: int = 64
    min_valid: float = MIN_VALID_SHARE

    def __post_init__(self) -> None:
        self.classes = [c for c in self.classes if c.strip()]
        if not self.adapter:
            raise PluginError("choose an adapter: 'Where is it unsure?' asks an adapted model")
        if len(self.classes) < 2:
            raise PluginError("the adapter's classes are unknown (refresh the backend's info) or fewer than two")
        if not self.class_field or self.class_field in ("predicted", "margin", "tile"):
            raise PluginError(f"the class field may not be named {self.class_field!r}")
        self.count, self.tile_px = max(1, int(self.count)), int(self.tile_px)


def fields_of(class_field: str):
    return [(class_field, "string"), ("predicted", "string"), ("margin", "double"), ("tile", "int")]


class UnsureProcessor:
    """The ``count`` tiles of ``source`` with the smallest top-2 margin under ``params.adapter``."""

    def __init__(self, source: Any, params: UnsureParams, common: Common):
        self.source, self.params, self.common = source, params, common
        self.title = f"where is '{params.adapter}' unsure? ({params.count} tiles)"

    def compute(self, client: Any, fb: Feedback) -> tuple:
        p = self.params
        wire = Wire(client, fb, p.min_valid)
        rows: List[Row] = []
        result: dict = {}
        value_range = self.source.value_range()
        for b in tile_batches(self.source, p.tile_px, None, p.batch, p.min_valid, fb):
            if not b.numbers:
                continue
            fb.check()
            reply = wire.request("classify", {"classes": list(p.classes), "top_k": 2, "value_range": value_range,
                                              "adapter": p.adapter},
                                 {"tiles": b.tiles}, {"tiles": b.masks}, (0.95 * b.progress[0], 0.95 * b.progress[1]))
            result = reply.result
            for tile in result["tiles"]:
                if tile.get("skipped") or tile.get("margin") is None:
                    continue
                i = int(tile["index"])
                rows.append((b.capture.box_to_map(*[int(v) for v in b.cells[i]]),
                             {p.class_field: None, "predicted": tile["label"], "margin": float(tile["margin"]),
                              "tile": b.numbers[i]}))
        rows.sort(key=lambda r: r[1]["margin"])
        return rows[:p.count], wire.warnings + warnings_of(result), result

    def run(self, client: Any, fb: Feedback, path: Optional[Path] = None) -> Outcome:
        rows, warnings, result = self.compute(client, fb)
        if not rows:
            raise PluginError("no tile with enough valid pixels to classify in this area")
        fb.check()
        path = path or unique_path(Path(self.common.out_dir), "label_next", ".gpkg", self.common.taken)
        write_polygons_gpkg(path, "label_next", fields_of(self.params.class_field), rows, self.source.crs())
        fb.progress(1.0, "done")
        spec = LayerSpec("label_next", str(path), f"label next ({self.params.adapter})", list(self.params.classes))
        margins = [a["margin"] for _, a in rows]
        return Outcome(self.title, [spec], [a for _, a in rows],
                       f"{len(rows)} tiles to label next (margins {min(margins):.3f} to {max(margins):.3f})",
                       warnings, result, where_of(self.source))
