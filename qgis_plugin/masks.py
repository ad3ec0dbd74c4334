"""Valid-pixel masks: ``uint8`` H x W arrays, non-zero = valid (the protocol's ``NAME_mask`` arrays).

A pixel is invalid when it is a raster's nodata in any band read (each band's own mask: the provider's nodata
and user nodata values; NaN), transparent in an alpha band (QGIS exposes a GDAL mask band as one): the rule of
``shared_protocol.nodata``, which the backend's raster readers apply too; outside the raster's footprint
in a rendered capture (nothing drawn there), or outside an area of interest. Nothing here touches widgets or
layers, so every function may run in a worker thread; :meth:`AreaOfInterest.of_layer` is called on the main
thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .errors import PluginError


def valid_share(mask: Optional[np.ndarray]) -> float:
    """Share of valid pixels (1.0 without a mask)."""
    if mask is None or mask.size == 0:
        return 1.0
    return float(np.count_nonzero(mask)) / mask.size


def all_valid(mask: Optional[np.ndarray]) -> bool:
    return mask is None or bool(np.all(mask))


def combine(*masks: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The pixels valid in every mask (``None`` entries are all valid; ``None`` when all are)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = np.ones(present[0].shape, bool)
    for m in present:
        out &= m.astype(bool)
    return out.astype(np.uint8)


def valid_range(pixels: np.ndarray, mask: Optional[np.ndarray], channels: int = 3) -> Optional[List[float]]:
    """The 2nd-98th percentiles of the valid pixels of a uint16 image (its first ``channels`` bands), the
    ``value_range`` a request sends so that nodata never stretches the image; ``None`` for uint8 or no pixels."""
    if pixels.dtype != np.uint16:
        return None
    px = pixels[..., :channels]
    values = px[mask.astype(bool)] if mask is not None else px.reshape(-1, px.shape[-1])
    if values.size == 0:
        return None
    lo, hi = np.percentile(values.astype(np.float64), (2, 98))
    return [float(lo), float(hi) if hi > lo else float(lo) + 1.0]


def band_invalid(provider, band: int, values: np.ndarray) -> np.ndarray:
    """Where ``values`` (a block of ``band`` read from ``provider``) are nodata in that band's own mask: the source
    nodata value (when used) and the user's nodata ranges. ``shared_protocol.nodata.valid_pixels`` combines the
    bands' masks (NaN / infinities and alpha bands included) into the valid pixels."""
    invalid = np.zeros(values.shape, bool)
    if provider.sourceHasNoDataValue(band) and provider.useSourceNoDataValue(band):
        nodata = float(provider.sourceNoDataValue(band))
        if not math.isnan(nodata):
            invalid |= values.astype(np.float64) == nodata
    for r in provider.userNoDataValues(band):
        v = values.astype(np.float64)
        invalid |= (v >= r.min()) & (v <= r.max())
    return invalid


def alpha_bands(provider) -> List[int]:
    """The provider's alpha bands (1-based); QGIS shows a GDAL mask band as an alpha band after the data bands."""
    from qgis.core import QgsRaster
    alpha = getattr(QgsRaster, "AlphaBand", 6)
    return [b for b in range(1, provider.bandCount() + 1) if provider.colorInterpretation(b) == alpha]


def image_alpha(image) -> np.ndarray:
    """A ``QImage``'s alpha channel as a mask: 1 where something was drawn, 0 where it stayed transparent."""
    from qgis.PyQt.QtGui import QImage
    img = image.convertToFormat(QImage.Format_Alpha8)
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes() if hasattr(img, "sizeInBytes") else img.byteCount())
    rows = np.frombuffer(ptr, np.uint8).reshape(img.height(), img.bytesPerLine())
    return (rows[:, :img.width()] > 0).astype(np.uint8)


def rotated_footprint(layer) -> Optional[bytes]:
    """The polygon (WKB, layer CRS) a GDAL raster with a rotated geotransform covers; ``None`` for north-up ones
    (their footprint is their extent). QGIS draws a rotated raster through a warped VRT whose corners outside the
    footprint hold 0 and are not nodata, so captures cut them off with this polygon."""
    from qgis.core import QgsProviderRegistry
    if layer.providerType() != "gdal":
        return None
    from osgeo import gdal, ogr
    path = QgsProviderRegistry.instance().decodeUri("gdal", layer.source()).get("path") or layer.source()
    ds = gdal.Open(path)
    if ds is None:
        return None
    c, a, b, f, d, e = ds.GetGeoTransform()
    if b == 0 and d == 0:
        return None
    w, h = ds.RasterXSize, ds.RasterYSize
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for col, row in ((0, 0), (w, 0), (w, h), (0, h), (0, 0)):
        ring.AddPoint_2D(c + a * col + b * row, f + d * col + e * row)
    poly = ogr.Geometry(ogr.wkbPolygon)
    poly.AddGeometry(ring)
    return bytes(poly.ExportToWkb())


def footprints(layers: Sequence) -> Optional["AreaOfInterest"]:
    """The area the raster ``layers`` cover (their extents, rotated footprints where they have one), or ``None``
    when none is rotated (then the rendered alpha alone tells where they drew)."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsProject
    shapes = [(lyr, rotated_footprint(lyr)) for lyr in layers]
    if not any(fp for _, fp in shapes):
        return None
    crs = QgsCoordinateReferenceSystem(layers[0].crs())
    ctx = QgsProject.instance().transformContext()
    wkbs = []
    for lyr, fp in shapes:
        one = AreaOfInterest([fp or bytes(QgsGeometry.fromRect(lyr.extent()).asWkb())], lyr.crs(), ctx)
        wkbs += one.wkbs_in(crs)
    return AreaOfInterest(wkbs, crs, ctx, "footprint")


def rasterize(wkbs: Sequence[bytes], transform: Sequence[float], height: int, width: int) -> np.ndarray:
    """A mask of the pixels whose centre lies inside any of the polygons (WKB, in the grid's CRS) on the grid of
    the affine ``transform`` (rasterio order; rotated affines work too)."""
    from osgeo import gdal, ogr
    a, b, c, d, e, f = transform
    ds = gdal.GetDriverByName("MEM").Create("", int(width), int(height), 1, gdal.GDT_Byte)
    ds.SetGeoTransform((c, a, b, f, d, e))
    vec = ogr.GetDriverByName("Memory").CreateDataSource("aoi")
    lyr = vec.CreateLayer("aoi", geom_type=ogr.wkbUnknown)
    for wkb in wkbs:
        feat = ogr.Feature(lyr.GetLayerDefn())
        feat.SetGeometry(ogr.CreateGeometryFromWkb(bytes(wkb)))
        lyr.CreateFeature(feat)
    if gdal.RasterizeLayer(ds, [1], lyr, burn_values=[1]) != 0:
        raise PluginError("GDAL could not rasterize the area of interest")
    return (ds.GetRasterBand(1).ReadAsArray() > 0).astype(np.uint8)


@dataclass
class AreaOfInterest:
    """Polygons (WKB) in ``crs`` that limit where answers come from; ``transform_context`` is the project's."""

    wkbs: List[bytes]
    crs: object  # QgsCoordinateReferenceSystem
    transform_context: object = None
    name: str = ""

    @classmethod
    def of_features(cls, features, crs, transform_context=None, name: str = "") -> "AreaOfInterest":
        wkbs = [bytes(f.geometry().asWkb()) for f in features if f.hasGeometry() and not f.geometry().isEmpty()]
        if not wkbs:
            raise PluginError(f"the area of interest{' ' + name if name else ''} has no polygon")
        return cls(wkbs, crs, transform_context, name)

    @classmethod
    def of_layer(cls, layer, selected_only: bool = False, transform_context=None) -> "AreaOfInterest":
        """The polygons of a vector layer, or only its selected features (main thread)."""
        from qgis.core import QgsProject
        if selected_only and layer.selectedFeatureCount() == 0:
            raise PluginError(f"no feature of {layer.name()} is selected")
        feats = layer.getSelectedFeatures() if selected_only else layer.getFeatures()
        ctx = transform_context or QgsProject.instance().transformContext()
        name = layer.name() + (" (selection)" if selected_only else "")
        return cls.of_features(feats, layer.crs(), ctx, name)

    def wkbs_in(self, crs) -> List[bytes]:
        """The polygons reprojected to ``crs``."""
        from qgis.core import QgsCoordinateTransform, QgsCoordinateTransformContext, QgsGeometry
        if crs == self.crs:
            return list(self.wkbs)
        xform = QgsCoordinateTransform(self.crs, crs, self.transform_context or QgsCoordinateTransformContext())
        out = []
        for wkb in self.wkbs:
            g = QgsGeometry()
            g.fromWkb(wkb)
            g = g.densifyByCount(16) if g.type() == 2 else g  # edges stay curved after reprojection
            g.transform(xform)
            out.append(bytes(g.asWkb()))
        return out

    def mask(self, transform: Sequence[float], height: int, width: int, crs) -> np.ndarray:
        """The AOI on a capture's grid (``crs`` a ``QgsCoordinateReferenceSystem``)."""
        return rasterize(self.wkbs_in(crs), transform, height, width)
