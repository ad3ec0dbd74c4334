"""Which pixels of a multi-band raster read are valid: the rule the plugin and the backend both apply.

A pixel is valid iff every band read is valid in its own band mask (that band's nodata value, an internal or
``.msk`` mask; for float bands NaN and infinities are invalid too) and every alpha band is > 0 (its raw value: a
16-bit alpha of 0-255 is read as it is stored). This is how QGIS draws a raster: a pixel that is nodata in any
band is transparent. GDAL's dataset mask (rasterio's ``dataset_mask``) is not this rule: there a pixel is invalid
only when every band is nodata (on the rasterio sample ``RGB.byte.tif`` 710 pixels differ).

The plugin reads each band's mask from the QGIS provider (its nodata and the user's nodata ranges; QGIS shows a
GDAL per-dataset mask as an alpha band), the backend from rasterio's ``read_masks`` per band; both combine them
here. numpy only, for QGIS's numpy 1.24 and the backend's numpy 2.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def valid_pixels(band_valid: Sequence[Optional[np.ndarray]], values: Optional[Sequence[np.ndarray]] = None,
                 alpha: Sequence[np.ndarray] = ()) -> np.ndarray:
    """H x W bool: valid where every band's own mask is non-zero, no float value in ``values`` is NaN or
    infinite, and every ``alpha`` band is > 0.

    ``band_valid``: one H x W array per band read (non-zero: valid in that band's mask; ``None``: valid
    everywhere); ``values``: those bands' H x W values (optional); ``alpha``: the alpha bands' raw H x W
    values. At least one array must be given (it sets the shape); all must have the same shape.
    """
    values = [] if values is None else list(values)
    arrays = [np.asarray(a) for a in list(band_valid) + values + list(alpha) if a is not None]
    if not arrays:
        raise ValueError("valid_pixels needs at least one band mask, band or alpha band")
    shape = arrays[0].shape
    bad = [a.shape for a in arrays if a.shape != shape]
    if len(shape) != 2 or bad:
        raise ValueError(f"valid_pixels takes H x W arrays of one shape, got {shape} and {bad}")
    valid = np.ones(shape, bool)
    for m in band_valid:
        if m is not None:
            valid &= np.asarray(m) != 0
    for v in values:
        v = np.asarray(v)
        if v.dtype.kind in "fc":
            valid &= np.isfinite(v)
    for a in alpha:
        valid &= np.asarray(a) > 0
    return valid
