"""Where a tool's pixels come from: one capture (the dock) or a whole raster read block by block (Processing).

Both give :class:`Block` s (a :class:`capture.Capture` with its valid-pixel mask, and the part of it that the
block owns) and one ``value_range`` for the whole source, so that the tools in :mod:`tools` run the same code
for the dock and for the Processing algorithms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple

from .capture import Capture, RasterSource, crs_strings, read_bands
from .errors import PluginError
from .masks import AreaOfInterest, valid_range

PREVIEW_SIDE = 1024


@dataclass
class Block:
    """A capture and ``inner`` = (row0, row1, col0, col1), the pixels of it that this block owns, which start at
    ``origin`` = (row, col) of the whole source's grid."""

    index: int
    count: int
    capture: Capture
    inner: Tuple[int, int, int, int]
    origin: Tuple[int, int] = (0, 0)


class CaptureSource:
    """One capture (map view, layer extent or raw bands) as a single block."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self.name = capture.source
        self.height, self.width = capture.height, capture.width
        self.transform, self.crs_wkt = capture.transform, capture.crs_wkt

    def crs(self):
        return self.capture.qgs_crs()

    def blocks(self, block_px: Optional[int] = None) -> Iterator[Block]:
        cap = self.capture
        yield Block(0, 1, cap, (0, cap.height, 0, cap.width))

    def read(self, row0: int, row1: int, col0: int, col1: int) -> Capture:
        """Rows ``row0`` .. ``row1`` and columns ``col0`` .. ``col1`` of the capture (itself when that is all)."""
        cap = self.capture
        if (row0, row1, col0, col1) == (0, cap.height, 0, cap.width):
            return cap
        a, b, c, d, e, f = cap.transform
        return replace(cap, pixels=cap.pixels[row0:row1, col0:col1],
                       transform=(a, b, c + a * col0 + b * row0, d, e, f + d * col0 + e * row0),
                       mask=None if cap.mask is None else cap.mask[row0:row1, col0:col1])

    def value_range(self) -> Optional[List[float]]:
        return valid_range(self.capture.pixels, self.capture.mask)


class RasterBlocks:
    """A whole raster layer's raw bands, at its own grid or ``resolution``, read in blocks; nodata, alpha and the
    optional area of interest make each block's mask."""

    def __init__(self, layer, bands: Optional[Sequence[int]] = None, resolution: Optional[float] = None,
                 aoi: Optional[AreaOfInterest] = None):
        self.src = layer if isinstance(layer, RasterSource) else RasterSource.of(layer)
        self.bands, self.resolution, self.aoi = (list(bands) if bands else None), resolution or None, aoi
        self.name = self.src.name
        full = self.src.extent
        if self.resolution:
            self.xres = self.yres = float(self.resolution)
            self.width = max(1, round(full.width() / self.xres))
            self.height = max(1, round(full.height() / self.yres))
        else:
            self.width, self.height = self.src.width, self.src.height
            self.xres, self.yres = full.width() / self.width, full.height() / self.height
        self.transform = (self.xres, 0.0, full.xMinimum(), 0.0, -self.yres, full.yMaximum())
        self.crs_wkt = crs_strings(self.src.crs)[1]

    def crs(self):
        return self.src.crs

    def _read(self, extent, resolution: Optional[float]) -> Capture:
        cap = read_bands(self.src, self.bands, extent, resolution)
        return cap.restrict(self.aoi)

    def blocks(self, block_px: int) -> Iterator[Block]:
        """Blocks of at most ``block_px`` pixels covering the whole raster, without overlap."""
        rows, cols = math.ceil(self.height / block_px), math.ceil(self.width / block_px)
        for i in range(rows):
            for j in range(cols):
                c0, r0 = j * block_px, i * block_px
                c1, r1 = min(self.width, c0 + block_px), min(self.height, r0 + block_px)
                yield Block(i * cols + j, rows * cols, self.read(r0, r1, c0, c1), (0, r1 - r0, 0, c1 - c0), (r0, c0))

    def read(self, row0: int, row1: int, col0: int, col1: int) -> Capture:
        """Rows ``row0`` .. ``row1`` and columns ``col0`` .. ``col1`` of the raster's grid (its mask: nodata, alpha,
        the area of interest)."""
        from qgis.core import QgsRectangle
        full = self.src.extent
        ext = QgsRectangle(full.xMinimum() + col0 * self.xres, full.yMaximum() - row1 * self.yres,
                           full.xMinimum() + col1 * self.xres, full.yMaximum() - row0 * self.yres)
        cap = self._read(ext, self.resolution)
        if (cap.height, cap.width) != (row1 - row0, col1 - col0):
            raise PluginError(f"read {cap.width} x {cap.height} pixels of the raster where {col1 - col0} x "
                              f"{row1 - row0} were asked for")
        return cap

    def value_range(self) -> Optional[List[float]]:
        """One 2nd-98th percentile range of the valid pixels of the whole raster (read at most 1024 px on a side),
        so that every block and batch is scaled alike."""
        side = max(self.src.width, self.src.height)
        full = self.src.extent
        res = max(full.width(), full.height()) / min(side, PREVIEW_SIDE) if side > PREVIEW_SIDE else None
        preview = self._read(None, res)
        return valid_range(preview.pixels, preview.mask)
