"""Canvas capture: map extents to pixel arrays with their affine transform and CRS.

Two ways to get pixels:

* :func:`render_extent` draws layers (as styled) over an extent at a ground resolution, independent of
  the screen's DPI: the output size is ``extent / resolution`` pixels and the transform comes from the
  map settings actually used, so pixel ``(col, row)`` corner maps to ``x = c + a*col``, ``y = f + e*row``.
* :func:`read_bands` reads raw band values of a raster layer (uint8/uint16 kept, other types scaled to
  uint16 from their valid pixels), at the raster's own grid or a chosen resolution.

Every capture carries a valid-pixel mask (:mod:`masks`): where nothing was drawn (outside the rendered
rasters' footprint, their nodata, alpha 0), or the read bands' nodata / alpha; :meth:`Capture.restrict`
adds an area of interest.

Transforms are affines in rasterio order ``[a, b, c, d, e, f]`` (what the protocol sends).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from shared_protocol.nodata import valid_pixels

from .errors import PluginError
from .masks import alpha_bands, band_invalid, combine, footprints, image_alpha

Transform = Tuple[float, float, float, float, float, float]
DEFAULT_MAX_SIDE = 8192


@dataclass
class Capture:
    """Pixels (H x W x C, uint8 or uint16) with their georeferencing."""

    pixels: np.ndarray
    transform: Transform
    crs_wkt: str
    crs_authid: str = ""
    source: str = "render"
    notes: List[str] = field(default_factory=list)
    mask: Optional[np.ndarray] = None  # uint8 H x W, non-zero = valid; None = every pixel is valid

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def crs_param(self) -> str:
        """What the protocol's ``crs`` parameter gets: the authority id when there is one, else WKT."""
        return self.crs_authid or self.crs_wkt

    def pixel_to_map(self, col: float, row: float) -> Tuple[float, float]:
        return pixel_to_map(self.transform, col, row)

    def map_to_pixel(self, x: float, y: float) -> Tuple[float, float]:
        return map_to_pixel(self.transform, x, y)

    def box_to_map(self, x0: float, y0: float, x1: float, y1: float) -> List[Tuple[float, float]]:
        """The ring (5 points, closed) of the pixel box ``[x0, x1) x [y0, y1)`` in map coordinates."""
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        return [self.pixel_to_map(c, r) for c, r in corners]

    def extent(self) -> Tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the whole capture."""
        xs, ys = zip(*self.box_to_map(0, 0, self.width, self.height), strict=True)
        return min(xs), min(ys), max(xs), max(ys)

    def rgb(self) -> np.ndarray:
        """3-channel view (grey repeated, alpha dropped) for tools that need RGB."""
        px = self.pixels
        if px.shape[2] == 1:
            return np.repeat(px, 3, axis=2)
        return px[:, :, :3]

    def valid(self) -> np.ndarray:
        """The mask as booleans (all True without one)."""
        return np.ones((self.height, self.width), bool) if self.mask is None else self.mask.astype(bool)

    def restrict(self, aoi) -> "Capture":
        """Only the pixels inside the area of interest ``aoi`` (:class:`masks.AreaOfInterest`) stay valid."""
        if aoi is not None:
            self.mask = combine(self.mask, aoi.mask(self.transform, self.height, self.width, self.qgs_crs()))
        return self

    def qgs_crs(self):
        from qgis.core import QgsCoordinateReferenceSystem
        crs = QgsCoordinateReferenceSystem(self.crs_authid) if self.crs_authid else QgsCoordinateReferenceSystem()
        if not crs.isValid():
            crs = QgsCoordinateReferenceSystem.fromWkt(self.crs_wkt)
        return crs


def pixel_to_map(t: Sequence[float], col: float, row: float) -> Tuple[float, float]:
    a, b, c, d, e, f = t
    return a * col + b * row + c, d * col + e * row + f


def map_to_pixel(t: Sequence[float], x: float, y: float) -> Tuple[float, float]:
    a, b, c, d, e, f = t
    det = a * e - b * d
    if det == 0:
        raise PluginError("the capture's transform is not invertible")
    dx, dy = x - c, y - f
    return (e * dx - b * dy) / det, (-d * dx + a * dy) / det


def crs_strings(crs) -> Tuple[str, str]:
    """(authid, WKT) of a ``QgsCoordinateReferenceSystem``."""
    from qgis.core import QgsCoordinateReferenceSystem
    wkt = crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED) if hasattr(
        QgsCoordinateReferenceSystem, "WKT_PREFERRED") else crs.toWkt()
    authid = crs.authid() if crs.authid().upper().startswith("EPSG:") else ""
    return authid, wkt


def output_size(width_units: float, height_units: float, resolution: float,
                max_side: int = DEFAULT_MAX_SIDE) -> Tuple[int, int]:
    """Pixels needed to cover a ``width x height`` (map units) area at ``resolution`` units per pixel."""
    if not (resolution > 0 and math.isfinite(resolution)):
        raise PluginError(f"the ground resolution must be a positive number, got {resolution!r}")
    if not (width_units > 0 and height_units > 0):
        raise PluginError("the area to capture is empty")
    w, h = max(1, round(width_units / resolution)), max(1, round(height_units / resolution))
    if w > max_side or h > max_side:
        need = max(width_units, height_units) / max_side
        raise PluginError(f"capturing this area at {resolution:g} map units per pixel needs {w} x {h} pixels, "
                          f"more than {max_side} on a side; use a resolution of at least {need:.4g} or a smaller "
                          "area")
    return int(w), int(h)


def layer_extent_in(layer, crs, project=None):
    """A layer's extent in ``crs`` (a ``QgsRectangle``)."""
    from qgis.core import QgsCoordinateTransform, QgsProject
    if layer.crs() == crs:
        return layer.extent()
    xform = QgsCoordinateTransform(layer.crs(), crs, project or QgsProject.instance())
    return xform.transformBoundingBox(layer.extent())


def map_settings(layers: Sequence, extent, crs, resolution: float, *, background=(0, 0, 0, 0),
                 max_side: int = DEFAULT_MAX_SIDE):
    """``QgsMapSettings`` for rendering ``extent`` at ``resolution`` map units per pixel, 96 dpi, no rotation.

    The background is transparent, so that the rendered alpha tells where the layers drew something (the
    capture's mask); the pixels are the layers composited onto black.

    The extent is anchored at its top-left corner and grown to a whole number of pixels, so the map
    settings never have to stretch it (pixels stay square and exactly ``resolution`` wide).
    """
    from qgis.core import QgsMapSettings, QgsRectangle
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor, QImage

    w, h = output_size(extent.width(), extent.height(), resolution, max_side)
    x0, y1 = extent.xMinimum(), extent.yMaximum()
    ms = QgsMapSettings()
    ms.setLayers(list(layers))
    ms.setDestinationCrs(crs)
    ms.setOutputSize(QSize(w, h))
    ms.setOutputDpi(96.0)
    if hasattr(ms, "setDevicePixelRatio"):
        ms.setDevicePixelRatio(1.0)
    ms.setRotation(0.0)
    ms.setExtent(QgsRectangle(x0, y1 - h * resolution, x0 + w * resolution, y1))
    ms.setBackgroundColor(QColor(*background))
    ms.setOutputImageFormat(QImage.Format_ARGB32_Premultiplied)
    ms.setFlag(QgsMapSettings.Antialiasing, True)
    ms.setFlag(QgsMapSettings.DrawLabeling, False)
    return ms


def transform_of(ms) -> Transform:
    """The affine of a rendered image, from the map settings as used (visible extent, units per pixel)."""
    vis = ms.visibleExtent()
    size = ms.outputSize()
    a = vis.width() / size.width()
    e = vis.height() / size.height()
    return (a, 0.0, vis.xMinimum(), 0.0, -e, vis.yMaximum())


def image_to_array(image) -> np.ndarray:
    """A ``QImage`` as an H x W x 3 uint8 RGB array (premultiplied alpha: composited onto black)."""
    from qgis.PyQt.QtGui import QImage
    img = image.convertToFormat(QImage.Format_RGB888)
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes() if hasattr(img, "sizeInBytes") else img.byteCount())
    rows = np.frombuffer(ptr, np.uint8).reshape(img.height(), img.bytesPerLine())
    return rows[:, :img.width() * 3].reshape(img.height(), img.width(), 3).copy()


def render(ms, source: str = "render") -> Capture:
    """Render map settings synchronously (fine in a worker thread or a script) into a :class:`Capture`."""
    from qgis.core import QgsMapRendererSequentialJob
    job = QgsMapRendererSequentialJob(ms)
    job.start()
    job.waitForFinished()
    errors = [f"{e.layerID}: {e.message}" for e in job.errors()]
    cap = capture_from_image(job.renderedImage(), ms, source)
    cap.notes.extend(errors)
    return cap


def capture_from_image(image, ms, source: str = "render") -> Capture:
    """The rendered image of ``ms`` as a capture; its mask: where the layers drew something, within their
    footprints (main thread, or a script)."""
    authid, wkt = crs_strings(ms.destinationCrs())
    cap = Capture(image_to_array(image), transform_of(ms), wkt, authid, source, mask=image_alpha(image))
    return cap.restrict(footprints(ms.layers()))


def render_extent(layers: Sequence, extent, crs, resolution: float, **kw) -> Capture:
    """Render ``layers`` over ``extent`` (in ``crs``) at ``resolution`` map units per pixel."""
    return render(map_settings(layers, extent, crs, resolution, **kw))


# -- raw bands -----------------------------------------------------------------------------------------
_QGIS_DTYPES = {"Byte": np.uint8, "UInt16": np.uint16, "Int16": np.int16, "UInt32": np.uint32,
                "Int32": np.int32, "Float32": np.float32, "Float64": np.float64}


def _dtype_of(block) -> np.dtype:
    from qgis.core import Qgis
    for name, dtype in _QGIS_DTYPES.items():
        if block.dataType() == getattr(Qgis, name, getattr(getattr(Qgis, "DataType", Qgis), name, None)):
            return np.dtype(dtype)
    raise PluginError(f"unsupported raster data type {block.dataType()}")


def block_to_array(block) -> np.ndarray:
    """A ``QgsRasterBlock`` as a 2-D numpy array (values as stored; see :func:`masks.band_invalid`)."""
    dtype = _dtype_of(block)
    return np.frombuffer(bytes(block.data()), dtype=dtype).reshape(block.height(), block.width()).copy()


def to_wire(bands: np.ndarray, notes: List[str], valid: Optional[np.ndarray] = None) -> np.ndarray:
    """H x W x C of any numeric type -> uint8/uint16 (other types scaled by the 2nd-98th percentile of the valid
    pixels; invalid ones become 0)."""
    if bands.dtype in (np.uint8, np.uint16):
        return np.ascontiguousarray(bands)
    ok = np.isfinite(bands) & (True if valid is None else valid.astype(bool)[..., None])
    finite = bands[ok]
    lo, hi = (np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1.0
    notes.append(f"{bands.dtype} bands scaled to uint16 from [{lo:.6g}, {hi:.6g}]")
    scaled = np.clip((np.where(ok, bands.astype(np.float64), lo) - lo) / (hi - lo), 0, 1) * 65535
    return scaled.round().astype(np.uint16)


@dataclass
class RasterSource:
    """What :func:`read_bands` needs of a raster layer, taken on the main thread. The provider is a clone,
    so that the (possibly long) read can run in a worker thread without touching the layer."""

    provider: Any
    extent: Any  # QgsRectangle, in the layer's CRS
    width: int
    height: int
    crs: Any
    name: str
    footprint: Any = None  # masks.AreaOfInterest of a rotated raster's footprint (None: its extent)

    @classmethod
    def of(cls, layer) -> "RasterSource":
        from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle
        return cls(layer.dataProvider().clone(), QgsRectangle(layer.extent()), int(layer.width()),
                   int(layer.height()), QgsCoordinateReferenceSystem(layer.crs()), layer.name(), footprints([layer]))


def read_bands(layer, bands: Optional[Sequence[int]] = None, extent=None, resolution: Optional[float] = None,
               max_side: int = DEFAULT_MAX_SIDE) -> Capture:
    """Raw values of ``bands`` (1-based; default the first three, or one) of a raster layer.

    ``layer`` is a raster layer or a :class:`RasterSource` (for reads in a worker thread). ``extent`` is in
    the layer's CRS (default: the whole layer). Without ``resolution`` the layer's own pixel grid is used
    (the extent snapped outwards to it, the transform exactly the layer's); with it the provider resamples
    (nearest) to square pixels of that size.
    """
    from qgis.core import QgsRectangle
    src = layer if isinstance(layer, RasterSource) else RasterSource.of(layer)
    provider = src.provider
    count = provider.bandCount()
    bands = list(bands or (range(1, 4) if count >= 3 else [1]))
    if any(b < 1 or b > count for b in bands):
        raise PluginError(f"the layer has {count} band(s); cannot read band(s) {bands}")
    full = src.extent
    ext = full if extent is None else extent.intersect(full)
    if ext.isEmpty():
        raise PluginError("the requested area does not overlap the raster")
    if resolution is None:
        xres = full.width() / src.width
        yres = full.height() / src.height
        c0 = max(0, math.floor((ext.xMinimum() - full.xMinimum()) / xres + 1e-9))
        c1 = min(src.width, math.ceil((ext.xMaximum() - full.xMinimum()) / xres - 1e-9))
        r0 = max(0, math.floor((full.yMaximum() - ext.yMaximum()) / yres + 1e-9))
        r1 = min(src.height, math.ceil((full.yMaximum() - ext.yMinimum()) / yres - 1e-9))
        w, h = c1 - c0, r1 - r0
        if w > max_side or h > max_side:
            raise PluginError(f"{w} x {h} pixels is more than {max_side} on a side; choose a coarser resolution "
                              "or a smaller area")
        x0, y1 = full.xMinimum() + c0 * xres, full.yMaximum() - r0 * yres
        ext = QgsRectangle(x0, y1 - h * yres, x0 + w * xres, y1)
        transform = (xres, 0.0, x0, 0.0, -yres, y1)
    else:
        w, h = output_size(ext.width(), ext.height(), resolution, max_side)
        x0, y1 = ext.xMinimum(), ext.yMaximum()
        ext = QgsRectangle(x0, y1 - h * resolution, x0 + w * resolution, y1)
        transform = (resolution, 0.0, x0, 0.0, -resolution, y1)
    arrays = [block_to_array(provider.block(b, ext, w, h)) for b in bands]
    alpha = [block_to_array(provider.block(b, ext, w, h)) for b in alpha_bands(provider)]
    nodata = [band_invalid(provider, b, arr) for b, arr in zip(bands, arrays, strict=True)]
    mask = valid_pixels([~n for n in nodata], arrays, alpha).astype(np.uint8)  # the protocol's rule
    for arr, n in zip(arrays, nodata, strict=True):
        arr[n] = 0  # a band's nodata cells read as 0 (the mask says the pixel is invalid)
    if src.footprint is not None:
        mask = combine(mask, src.footprint.mask(transform, h, w, src.crs))
    notes: List[str] = []
    pixels = to_wire(np.stack(arrays, axis=2), notes, mask)
    authid, wkt = crs_strings(src.crs)
    return Capture(pixels, transform, wkt, authid, f"bands {bands} of {src.name}", notes, mask)
