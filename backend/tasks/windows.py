"""Window geometry over a canvas: SeLo's multi-scale grids and plain classification grids.

Boxes are ``int64`` arrays of ``(x0, y0, x1, y1)`` pixel bounds, end exclusive.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np


def clamped_starts(dim: int, size: int, offset: int, stride: int) -> List[int]:
    """Starts ``offset, offset + stride, ...`` below ``dim``; a window past the edge moves to ``dim - size``."""
    size = min(size, dim)
    return sorted({min(start, dim - size) for start in range(offset, dim, stride)})


def selo_windows(height: int, width: int, size: int) -> np.ndarray:
    """SeLo windows of one size: two grids of stride ``size``, offsets 0 and ``size // 2`` (REFERENCE 5).

    A window larger than the canvas shrinks to the canvas along that axis.
    """
    sy, sx = min(size, height), min(size, width)
    boxes = set()
    for offset in (0, size // 2):
        for y in clamped_starts(height, size, offset, size):
            for x in clamped_starts(width, size, offset, size):
                boxes.add((x, y, x + sx, y + sy))
    return np.array(sorted(boxes, key=lambda b: (b[1], b[0])), dtype=np.int64).reshape(-1, 4)


def grid_cells(height: int, width: int, tile: int, stride: int) -> Tuple[np.ndarray, np.ndarray]:
    """A classification grid: the cells (clipped to the canvas) and the full-size windows that classify them.

    A cell at the right or bottom edge is smaller than ``tile``; its window is the ``tile``-sized window
    that ends at the canvas edge (so every window the model sees is full size).
    """
    cells, windows = [], []
    for y in range(0, height, stride):
        for x in range(0, width, stride):
            x1, y1 = min(x + tile, width), min(y + tile, height)
            cells.append((x, y, x1, y1))
            wx0, wy0 = max(0, min(x, width - tile)), max(0, min(y, height - tile))
            windows.append((wx0, wy0, min(wx0 + tile, width), min(wy0 + tile, height)))
    return np.array(cells, dtype=np.int64).reshape(-1, 4), np.array(windows, dtype=np.int64).reshape(-1, 4)


def cell_means(boxes: np.ndarray, scores: np.ndarray, height: int, width: int
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean score of the windows covering each pixel, for Q score columns, on the grid of window edges.

    Every pixel of a cell between consecutive edges (``ys`` x ``xs``, from 0 to the canvas size) is covered
    by the same windows, so the per-pixel mean is exact on the cells: (Q x Ny x Nx float32, ys, xs), by a
    2-D difference array, O(windows + cells). Cells no window covers are NaN.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(len(boxes), -1)
    xs = np.unique(np.concatenate([boxes[:, [0, 2]].ravel(), [0, width]]))
    ys = np.unique(np.concatenate([boxes[:, [1, 3]].ravel(), [0, height]]))
    cx0, cx1 = np.searchsorted(xs, boxes[:, 0]), np.searchsorted(xs, boxes[:, 2])
    cy0, cy1 = np.searchsorted(ys, boxes[:, 1]), np.searchsorted(ys, boxes[:, 3])
    q = scores.shape[1]
    diff = np.zeros((q + 1, len(ys), len(xs)))  # the last plane counts windows
    values = np.concatenate([scores.T, np.ones((1, len(boxes)))])
    for sign, yy, xx in ((1, cy0, cx0), (-1, cy1, cx0), (-1, cy0, cx1), (1, cy1, cx1)):
        np.add.at(diff, (slice(None), yy, xx), sign * values)
    sums = diff.cumsum(axis=1).cumsum(axis=2)[:, :-1, :-1]
    counts = sums[-1]
    means = np.divide(sums[:-1], counts, out=np.full_like(sums[:-1], np.nan), where=counts > 0).astype(np.float32)
    return means, ys, xs


def cell_index(edges: np.ndarray, size: int) -> np.ndarray:
    """For each pixel row (or column) 0 .. size - 1, the cell between ``edges`` it falls in."""
    return np.searchsorted(edges, np.arange(size), side="right") - 1


def cells_to_pixels(cells: np.ndarray, ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Q x Ny x Nx cell values -> Q x H x W pixels (C-contiguous: columns first, then whole rows)."""
    return np.take(np.take(cells, cell_index(xs, width), axis=2), cell_index(ys, height), axis=1)


def mean_over_windows(boxes: np.ndarray, scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """Each pixel = mean score of the windows covering it, for Q score columns -> Q x H x W float32 (NaN: none)."""
    return cells_to_pixels(*cell_means(boxes, scores, height, width), height, width)
