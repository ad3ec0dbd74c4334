"""Valid pixels of a request's images (``NAME_mask``, else a 4-channel image's alpha) and valid shares of boxes.

``None`` stands for "every pixel is valid": images without a mask or alpha cost no per-pixel work, and a mask
that marks every pixel valid is the same as no mask. Shares of windows over a canvas are counted on the grid
of the windows' edges (two ``reduceat`` passes over the mask, then a summed-area table of the cells), so a
window costs O(1) whatever its size.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from shared_protocol import ErrorCode, ProtocolError


def valid_pixels(arrays: Dict[str, np.ndarray], name: str) -> Optional[np.ndarray]:
    """Bool validity of ``arrays[name]`` (its shape without channels), or None when every pixel is valid."""
    image, mask = arrays.get(name), arrays.get(f"{name}_mask")
    if mask is not None:
        valid = mask != 0
    elif image is not None and image.shape[-1] == 4:
        valid = image[..., 3] != 0
    else:
        return None
    return None if valid.all() else valid


def image_shares(valid: Optional[np.ndarray], n: int) -> np.ndarray:
    """The valid share of each of ``n`` images (``valid``: N x H x W or None)."""
    if valid is None:
        return np.ones(n)
    return valid.reshape(n, -1).mean(axis=1)


def skipped(shares: np.ndarray, min_valid: float) -> List[int]:
    """Indices whose valid share is below ``min_valid`` (sorted)."""
    return [int(i) for i in np.flatnonzero(np.asarray(shares) < min_valid)]


def interval_counts(valid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Valid pixels in each cell of the grid whose edges are ``ys`` x ``xs`` (strictly increasing, from 0 to
    the mask's height / width): an (len(ys) - 1) x (len(xs) - 1) int64 array."""
    cols = np.add.reduceat(valid.view(np.uint8), np.asarray(xs[:-1], dtype=np.intp), axis=1, dtype=np.int32)
    return np.add.reduceat(cols, np.asarray(ys[:-1], dtype=np.intp), axis=0, dtype=np.int64)


def box_counts(valid: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Valid pixels in each ``(x0, y0, x1, y1)`` box (end exclusive) of an H x W mask."""
    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    h, w = valid.shape
    xs = np.unique(np.concatenate([boxes[:, [0, 2]].ravel(), [0, w]]))
    ys = np.unique(np.concatenate([boxes[:, [1, 3]].ravel(), [0, h]]))
    table = np.zeros((len(ys), len(xs)), dtype=np.int64)  # summed-area table of the cells
    table[1:, 1:] = interval_counts(valid, ys, xs).cumsum(axis=0).cumsum(axis=1)
    x0, x1 = np.searchsorted(xs, boxes[:, 0]), np.searchsorted(xs, boxes[:, 2])
    y0, y1 = np.searchsorted(ys, boxes[:, 1]), np.searchsorted(ys, boxes[:, 3])
    return table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]


def box_shares(valid: Optional[np.ndarray], boxes: np.ndarray) -> np.ndarray:
    """The valid share of each box over a canvas (all 1 when ``valid`` is None)."""
    if valid is None:
        return np.ones(len(boxes))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return box_counts(valid, boxes) / np.maximum(area, 1)


def no_valid_pixels(what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PARAMS, f"{what}: no window has enough valid pixels (see min_valid); nothing "
                         "to answer from", {"reason": "no_valid_pixels", "param": "min_valid"})
