"""Window geometry over a canvas: plain classification grids, and SeLo's grids and cells (written once in
``shared_protocol.selo``, which the plugin imports too).

Boxes are ``int64`` arrays of ``(x0, y0, x1, y1)`` pixel bounds, end exclusive.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from shared_protocol.selo import cell_index, cell_means, cells_to_pixels, clamped_starts, selo_windows

__all__ = ["cell_index", "cell_means", "cells_to_pixels", "clamped_starts", "grid_cells", "mean_over_windows",
           "selo_windows"]


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


def mean_over_windows(boxes: np.ndarray, scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """Each pixel = mean score of the windows covering it, for Q score columns -> Q x H x W float32 (NaN: none)."""
    return cells_to_pixels(*cell_means(boxes, scores, height, width), height, width)
