"""A whole source's SeLo map (the backend's fast mode over the source as one canvas), block by block.

The source's SeLo windows (every size on its two grids, clamped at the source's edges) are cut once; each
window belongs to the block that holds its top-left corner. A block's pixels are read once, reaching as far
right and down as its windows do (at most the largest window), and the backend encodes exactly that block's
windows (``ops.WINDOWS_ARRAY``) and returns their raw scores: every window is encoded once. The per-pixel mean,
the min-max over valid pixels and the median smoothing then run on the cells of the window edges
(``shared_protocol.selo``, the backend's own code), and the map is made a block at a time: what is held is the
cells, the blocks' masks as bits (none for a block without invalid pixels) and one block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.ops import (SCORES_ARRAY, SMOOTH_WORK_KERNEL, WINDOWS_ARRAY, window_boxes_problem,
                                 window_scores_problem)
from shared_protocol.selo import (MapRenderer, SubcellGrid, add_region_counts, box_shares, cell_means,
                                  normalize_minmax, score_stats, selo_windows, smooth_block, window_edges)

from ..errors import PluginError
from .base import Feedback, Wire


@dataclass
class SceneMap:
    """The smoothed map of a ``height`` x ``width`` source, made a block at a time (:meth:`blocks`)."""

    renderer: MapRenderer
    height: int
    width: int
    masks: Dict[Tuple[int, int], Tuple[Tuple[int, int], Optional[np.ndarray]]] = field(default_factory=dict)

    def valid(self, row0: int, col0: int) -> Optional[np.ndarray]:
        """The mask of the block at ``row0``, ``col0`` (None: all valid), from its bits."""
        (h, w), bits = self.masks[(row0, col0)]
        return None if bits is None else np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)

    def whole_mask(self) -> Optional[np.ndarray]:
        if all(bits is None for _, bits in self.masks.values()):
            return None
        out = np.ones((self.height, self.width), bool)
        for (row0, col0), ((h, w), bits) in self.masks.items():
            if bits is not None:
                out[row0:row0 + h, col0:col0 + w] = self.valid(row0, col0)
        return out

    def blocks(self) -> Iterator[Tuple[int, int, np.ndarray]]:
        """(first row, first column, Q x rows x columns float32: 0-1, NaN where invalid or no window covers) for
        each block, row by row of blocks."""
        for row0, col0 in sorted(self.masks):
            (h, w), _ = self.masks[(row0, col0)]
            yield row0, col0, self.renderer.rows(row0, row0 + h, self.valid(row0, col0), col0, col0 + w)


@dataclass
class SceneScores:
    maps: SceneMap
    stats: List[Dict[str, Any]]
    windows: int  # encoded by the backend (the replies' counts)
    sent: int  # sent to the backend
    total: int  # the source's SeLo windows
    result: Dict[str, Any]


def _bits(valid: np.ndarray) -> Optional[np.ndarray]:
    return None if valid.all() else np.packbits(valid)


def localize_scene(source: Any, queries: Sequence[str], sizes: Sequence[int], kernel: int, block: int,
                   wire: Wire, fb: Feedback, request: Dict[str, Any], span: Tuple[float, float] = (0.0, 0.9)
                   ) -> SceneScores:
    """Score every SeLo window of ``source`` once, block by block (``block`` px, at least the largest window),
    and make the map's renderer. ``request``: the localize parameters the blocks share (value_range, adapter)."""
    h, w = source.height, source.width
    boxes = np.concatenate([selo_windows(h, w, int(s)) for s in sorted(set(sizes))])
    ys, xs = window_edges(boxes, h, w)
    rows, cols = -(-h // block), -(-w // block)
    owner = (boxes[:, 1] // block) * cols + boxes[:, 0] // block
    q = len(queries)
    scores = np.full((q, len(boxes)), np.nan, np.float32)
    counts = np.zeros((len(ys) - 1, len(xs) - 1), np.int64)
    sub = SubcellGrid.of(ys, xs, h, w, smooth_block(kernel)) if kernel >= SMOOTH_WORK_KERNEL else None
    sub_counts = None if sub is None else np.zeros((len(sub.ys) - 1, len(sub.xs) - 1), np.int64)
    maps = SceneMap(None, h, w)  # type: ignore[arg-type]  # the renderer comes last
    encoded = sent = 0
    result: Dict[str, Any] = {}
    for k in range(rows * cols):
        fb.check()
        r0, c0 = (k // cols) * block, (k % cols) * block
        r1, c1 = min(h, r0 + block), min(w, c0 + block)
        mine = np.flatnonzero(owner == k)
        reach = boxes[mine, 2:].max(axis=0) if len(mine) else (c1, r1)  # as far as the block's windows reach
        cap = source.read(r0, max(r1, int(reach[1])), c0, max(c1, int(reach[0])))
        valid = cap.valid()
        inner = valid[:r1 - r0, :c1 - c0]
        maps.masks[(r0, c0)] = ((r1 - r0, c1 - c0), _bits(inner))
        add_region_counts(counts, ys, xs, inner, r0, c0)
        if sub is not None:  # the smoothing's blocks pad the source by repeating its last row and column
            pad = ((0, int(sub.ys[-1]) - h if r1 == h else 0), (0, int(sub.xs[-1]) - w if c1 == w else 0))
            add_region_counts(sub_counts, sub.ys, sub.xs, np.pad(inner, pad, mode="edge"), r0, c0)
        local = boxes[mine] - np.array([c0, r0, c0, r0])
        keep = box_shares(None if cap.mask is None else valid, local) >= wire.min_valid
        part = tuple(span[0] + (span[1] - span[0]) * i / (rows * cols) for i in (k, k + 1))
        if not keep.any():
            fb.progress(part[1], f"block {k + 1} of {rows * cols}: no window with enough valid pixels")
            continue
        windows = local[keep].astype(np.int32)
        problem = window_boxes_problem(windows, cap.height, cap.width)
        if problem:  # never: the windows were cut inside the block's read
            raise PluginError(f"block {k + 1}: windows {problem}")
        try:
            reply = wire.localize(cap.pixels, cap.mask, {"queries": list(queries), **request, WINDOWS_ARRAY: windows},
                                  part)
        except ProtocolError as exc:
            if exc.code == ErrorCode.BAD_ARRAY and WINDOWS_ARRAY in ((exc.details or {}).get("unknown") or ()):
                raise PluginError("the backend predates whole-scene localize (no 'windows'): update it") from None
            raise
        got = reply.arrays.get(SCORES_ARRAY)
        problem = window_scores_problem(got, q, len(windows))
        if problem:
            raise PluginError(f"the backend's '{SCORES_ARRAY}' for block {k + 1} {problem}")
        scores[:, mine[keep]] = got
        sent += len(windows)
        encoded += int(reply.result.get("windows", 0) or 0)
        result = reply.result
    scored = np.flatnonzero(np.isfinite(scores).all(axis=0))
    if not len(scored):
        raise PluginError("no valid pixels to localize in: the area is nodata, transparent or outside the raster or "
                          "the area of interest")
    cells, _, _ = cell_means(boxes[scored], scores[:, scored].T, h, w, (ys, xs))
    counts[np.isnan(cells[0])] = 0
    if not counts.any():
        raise PluginError("no valid pixels to localize in: the windows with enough valid pixels cover none")
    cells[:, counts == 0] = np.nan  # cells without a valid pixel say nothing
    share = float(counts.sum()) / (h * w)
    stats = [{"query": qq, "min": s["score_min"], "max": s["score_max"], "mean": s["score_mean"],
              "valid_share": share} for qq, s in zip(queries, score_stats(cells, counts), strict=True)]
    cells = np.stack([normalize_minmax(c) for c in cells])
    needs_mask = kernel > 1 and smooth_block(kernel) == 1  # a median over pixels: the whole mask (small sources)
    maps.renderer = MapRenderer(cells, ys, xs, h, w, kernel, maps.whole_mask() if needs_mask else None, sub_counts)
    return SceneScores(maps, stats, encoded, sent, len(boxes), result)
