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
from shared_protocol.selo import box_counts, box_shares, interval_counts

__all__ = ["box_counts", "box_shares", "image_shares", "interval_counts", "no_valid_pixels", "skipped",
           "valid_pixels"]


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


def no_valid_pixels(what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PARAMS, f"{what}: no window has enough valid pixels (see min_valid); nothing "
                         "to answer from", {"reason": "no_valid_pixels", "param": "min_valid"})
