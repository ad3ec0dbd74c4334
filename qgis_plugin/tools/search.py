"""Search: rank the tiles of a source against a text query -> the best tiles with rank and score."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from shared_protocol.defaults import DEFAULT_TILE_SIZE, MIN_VALID_SHARE

from ..errors import PluginError
from ..masks import valid_share
from ..outputs import slug, unique_path, write_polygons_gpkg
from .base import (MIN_TILE, PROVENANCE_FIELDS, Common, Feedback, LayerSpec, Outcome, Row, Wire, provenance,
                   tile_batches, warnings_of, where_of)

FIELDS = [("rank", "int"), ("score", "double"), ("tile", "int"), *PROVENANCE_FIELDS]


@dataclass
class SearchParams:
    query: str  # a text query, or the name of the example below
    tile_px: int = DEFAULT_TILE_SIZE
    top_k: int = 10
    batch: int = 64
    min_valid: float = MIN_VALID_SHARE
    example: Optional[np.ndarray] = None  # search by example: an image (H x W x C) sent as the query image
    example_mask: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.query = self.query.strip()
        if not self.query:
            raise PluginError("type a query to search for")
        if self.example is not None and valid_share(self.example_mask) < self.min_valid:
            raise PluginError("the example tile has too few valid pixels: click inside the imagery")
        if int(self.tile_px) < MIN_TILE:
            raise PluginError(f"tiles need at least {MIN_TILE} pixels, not {self.tile_px}")
        self.tile_px, self.top_k, self.batch = int(self.tile_px), max(1, int(self.top_k)), max(1, int(self.batch))


@dataclass
class SearchResult:
    rows: List[Row] = field(default_factory=list)  # best first
    ranked: int = 0
    skipped: int = 0
    warnings: List[str] = field(default_factory=list)
    result: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)


class SearchProcessor:
    """Ranks every tile with at least ``min_valid`` valid pixels (the others are never sent, and a tile the
    backend reports skipped is never ranked) and keeps the ``top_k`` best."""

    def __init__(self, source: Any, params: SearchParams, common: Common):
        self.source, self.params, self.common = source, params, common
        self.title = f"search: {params.query}"

    def compute(self, client: Any, fb: Feedback) -> SearchResult:
        p = self.params
        wire = Wire(client, fb, p.min_valid)
        out = SearchResult()
        value_range = self.source.value_range()
        hits: List[Tuple[float, int, Row]] = []
        for b in tile_batches(self.source, p.tile_px, None, p.batch, p.min_valid, fb):
            out.skipped += b.skipped
            if not b.numbers:
                fb.progress(0.95 * b.progress[1])
                continue
            fb.check()
            arrays, masks = {"images": b.tiles}, {"images": b.masks}
            if p.example is not None:
                arrays["query_images"], masks["query_images"] = p.example[None], (
                    None if p.example_mask is None else p.example_mask[None])
            reply = wire.request("rank", {"texts": None if p.example is not None else [p.query],
                                          "top_k": min(p.top_k, len(b.numbers)), "value_range": value_range,
                                          "adapter": self.common.adapter},
                                 arrays, masks, (0.95 * b.progress[0], 0.95 * b.progress[1]))
            out.result = reply.result
            skipped = set(int(i) for i in reply.result.get("skipped") or ())
            out.skipped += len(skipped)
            out.ranked += len(b.numbers) - len(skipped)
            for m in reply.result["by_query"][0]:
                i = int(m["index"])
                if i in skipped:
                    continue
                ring = b.capture.box_to_map(*[int(v) for v in b.windows[i]])
                hits.append((float(m["score"]), b.numbers[i], (ring, {"tile": b.numbers[i]})))
            hits = sorted(hits, key=lambda h: (-h[0], h[1]))[:p.top_k]
        out.provenance = provenance(self.source, self.common, out.result, p.query, f"{p.tile_px} px tiles")
        for rank, (score, _, (ring, attrs)) in enumerate(hits, start=1):
            xs, ys = zip(*ring, strict=True)
            attrs.update({"rank": rank, "score": score, "xmin": min(xs), "ymin": min(ys), "xmax": max(xs),
                          "ymax": max(ys), **out.provenance})
            out.rows.append((ring, attrs))
        out.warnings = wire.warnings + warnings_of(out.result)
        return out

    def run(self, client: Any, fb: Feedback) -> Outcome:
        res = self.compute(client, fb)
        fb.check()
        path = unique_path(Path(self.common.out_dir), f"search_{slug(self.params.query)}", ".gpkg", self.common.taken)
        write_polygons_gpkg(path, "search", FIELDS, res.rows, self.source.crs())
        fb.progress(1.0, "done")
        best = f"best score {res.rows[0][1]['score']:.3f}" if res.rows else "no tiles"
        skipped = f", {res.skipped} skipped (too few valid pixels)" if res.skipped else ""
        return Outcome(self.title, [LayerSpec("ranking", str(path), f"top {len(res.rows)}: {self.params.query}",
                                                  provenance=res.provenance)],
                       [a for _, a in res.rows], f"{res.ranked} tiles ranked{skipped}; {best}", res.warnings,
                       res.result, where_of(self.source))


def example_tile(capture: Any, x: float, y: float, tile_px: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The ``tile_px`` square of a capture centred on map point (x, y) (moved inside the capture), and its mask:
    the query image of a search by example."""
    col, row = capture.map_to_pixel(x, y)
    if not (0 <= col < capture.width and 0 <= row < capture.height):
        raise PluginError("the clicked point is outside the captured area")
    th, tw = min(tile_px, capture.height), min(tile_px, capture.width)
    x0 = int(min(max(round(col - tw / 2), 0), capture.width - tw))
    y0 = int(min(max(round(row - th / 2), 0), capture.height - th))
    mask = None if capture.mask is None else capture.mask[y0:y0 + th, x0:x0 + tw].copy()
    return capture.pixels[y0:y0 + th, x0:x0 + tw].copy(), mask
