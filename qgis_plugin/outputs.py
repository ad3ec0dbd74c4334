"""Output files: a project-relative folder, unique names that never overwrite, atomic writes.

Nothing here creates map layers, so every function may run in a worker thread.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import PluginError

OUTPUT_SUBDIR = "mapquery_outputs"
_NAME_LOCK = threading.Lock()
_RESERVED: set = set()


def output_dir(configured: str = "", project_home: str = "") -> Path:
    """``configured`` (absolute, or relative to the project folder), else ``<project>/mapquery_outputs``,
    else ``~/mapquery_outputs`` for an unsaved project."""
    if configured:
        p = Path(os.path.expanduser(configured))
        if not p.is_absolute():
            p = Path(project_home or Path.home()) / p
    else:
        p = Path(project_home) / OUTPUT_SUBDIR if project_home else Path.home() / OUTPUT_SUBDIR
    p.mkdir(parents=True, exist_ok=True)
    return p


def slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return (s[:max_len].rstrip("_") or "query")


def unique_path(folder: Path, stem: str, suffix: str, taken: Iterable[str] = ()) -> Path:
    """A new file name ``<stem>_<timestamp>[_n]<suffix>`` that exists neither on disk, nor among ``taken``
    (the sources of the project's layers), nor among names handed out earlier in this session."""
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    taken_norm = {os.path.normcase(os.path.abspath(t.split("|")[0])) for t in taken}
    with _NAME_LOCK:
        for n in range(10000):
            name = f"{stem}_{stamp}" + (f"_{n}" if n else "") + suffix
            path = folder / name
            key = os.path.normcase(os.path.abspath(path))
            if not path.exists() and key not in taken_norm and key not in _RESERVED:
                _RESERVED.add(key)
                return path
    raise PluginError(f"cannot find a free file name for {stem} in {folder}")


def _temp_sibling(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=str(path.parent))
    os.close(fd)
    os.unlink(tmp)
    return Path(tmp)


def _remove_gpkg_temp(tmp: Path) -> None:
    """A temporary GeoPackage and its SQLite journal files, if a failed write left them."""
    for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
        if p.exists():
            p.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class GeotiffWriter:
    """A float32 GeoTIFF (deflate level 1: half the time of the default level, ~1 % larger) written a block at a
    time under a temp name and renamed into place by :meth:`commit` (complete or absent: :meth:`abort`, or
    leaving a ``with`` block by an exception, removes it); ``metadata`` becomes dataset metadata items
    ``MAPQUERY_<KEY>``."""

    def __init__(self, path: Path, width: int, height: int, count: int, transform: Sequence[float], crs_wkt: str,
                 descriptions: Sequence[str] = (), nodata: Optional[float] = None,
                 metadata: Optional[Dict[str, Any]] = None):
        from osgeo import gdal
        self.path, self.tmp, self.count = Path(path), _temp_sibling(Path(path)), count
        opts = ["COMPRESS=DEFLATE", "PREDICTOR=3", "ZLEVEL=1"]
        opts += ["TILED=YES"] if height >= 256 and width >= 256 else []
        self.ds = gdal.GetDriverByName("GTiff").Create(str(self.tmp), width, height, count, gdal.GDT_Float32,
                                                       options=opts)
        if self.ds is None:
            raise PluginError(f"GDAL cannot create {self.tmp}")
        try:
            a, b, c, d, e, f = transform
            self.ds.SetGeoTransform((c, a, b, f, d, e))
            if crs_wkt:
                self.ds.SetProjection(crs_wkt)
            if metadata:
                self.ds.SetMetadata({f"MAPQUERY_{k.upper()}": str(v) for k, v in metadata.items()})
            for i in range(count):
                band = self.ds.GetRasterBand(i + 1)
                if nodata is not None:
                    band.SetNoDataValue(nodata)
                if i < len(descriptions):
                    band.SetDescription(descriptions[i])
        except BaseException:
            self.abort()
            raise

    def write(self, row: int, bands: np.ndarray, col: int = 0) -> None:
        """The pixels from ``row``, ``col`` on of every band: a (B x) rows x columns array."""
        arr = np.asarray(bands, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr
        for i in range(self.count):
            self.ds.GetRasterBand(i + 1).WriteArray(arr[i], int(col), int(row))

    def commit(self) -> Path:
        self.ds.FlushCache()
        self.ds = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.ds = None
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self) -> "GeotiffWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.ds is not None or self.tmp.exists():
            self.abort()


def write_geotiff(path: Path, bands: np.ndarray, transform: Sequence[float], crs_wkt: str,
                  descriptions: Sequence[str] = (), nodata: Optional[float] = None,
                  metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write a (B x) H x W float32 array as a deflate-compressed GeoTIFF (temp name, then rename; see
    :class:`GeotiffWriter`)."""
    arr = np.asarray(bands, dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr
    count, h, w = arr.shape
    with GeotiffWriter(path, w, h, count, transform, crs_wkt, descriptions, nodata, metadata) as out:
        out.write(0, arr)
        return out.commit()


def write_polygons_gpkg(path: Path, layer_name: str, fields: Sequence[Tuple[str, str]],
                        rows: Sequence[Tuple[List[Tuple[float, float]], Dict[str, Any]]], crs) -> Path:
    """Write polygons (each a closed ring and its attributes) to a new GeoPackage (temp name, then rename).

    ``fields`` are (name, kind) with kind in int, double, string; ``crs`` a ``QgsCoordinateReferenceSystem``.
    """
    from qgis.core import (QgsCoordinateTransformContext, QgsFeature, QgsField, QgsFields, QgsGeometry,
                           QgsPointXY, QgsVectorFileWriter, QgsWkbTypes)
    from qgis.PyQt.QtCore import QVariant
    kinds = {"int": QVariant.Int, "double": QVariant.Double, "string": QVariant.String}
    qfields = QgsFields()
    for name, kind in fields:
        qfields.append(QgsField(name, kinds[kind]))
    tmp = _temp_sibling(path)
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    opts.layerName = layer_name
    opts.fileEncoding = "UTF-8"
    try:
        writer = QgsVectorFileWriter.create(str(tmp), qfields, QgsWkbTypes.Polygon, crs,
                                            QgsCoordinateTransformContext(), opts)
        if writer.hasError() != QgsVectorFileWriter.NoError:
            raise PluginError(f"cannot write {path.name}: {writer.errorMessage()}")
        for ring, attrs in rows:
            feat = QgsFeature(qfields)
            feat.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in ring]]))
            for name, _ in fields:
                feat[name] = attrs.get(name)
            writer.addFeature(feat)
        del writer  # closes the file
        os.replace(tmp, path)
    finally:
        _remove_gpkg_temp(tmp)
    return path


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[Dict[str, Any]]) -> Path:
    """Write ``rows`` (dicts) as a UTF-8 CSV with a header (temp name, then rename)."""
    import csv
    import io
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))


def write_mask_polygons_gpkg(path: Path, mask: np.ndarray, transform: Sequence[float], crs_wkt: str,
                             attrs: Dict[str, Any], layer_name: str = "regions") -> Path:
    """The connected regions of a boolean ``mask`` (on the grid of the affine ``transform``) as polygons in a new
    GeoPackage, each with ``attrs`` (strings or numbers) and its ``pixels`` count (temp name, then rename)."""
    from osgeo import gdal, ogr, osr
    h, w = mask.shape
    a, b, c, d, e, f = transform
    mem = gdal.GetDriverByName("MEM").Create("", w, h, 1, gdal.GDT_Byte)
    mem.SetGeoTransform((c, a, b, f, d, e))
    band = mem.GetRasterBand(1)
    band.WriteArray(mask.astype(np.uint8))
    srs = osr.SpatialReference()
    if crs_wkt:
        srs.ImportFromWkt(crs_wkt)
    tmp = _temp_sibling(path)
    try:
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(tmp))
        lyr = ds.CreateLayer(layer_name, srs if crs_wkt else None, ogr.wkbPolygon)
        lyr.CreateField(ogr.FieldDefn("pixels", ogr.OFTInteger))
        for name, value in attrs.items():
            lyr.CreateField(ogr.FieldDefn(name, ogr.OFTReal if isinstance(value, float) else ogr.OFTString))
        if gdal.Polygonize(band, band, lyr, 0) != 0:
            raise PluginError(f"GDAL could not polygonize {path.name}")
        px_area = abs(a * e - b * d)
        lyr.ResetReading()
        for feat in lyr:
            feat.SetField("pixels", int(round(feat.GetGeometryRef().GetArea() / px_area)))
            for name, value in attrs.items():
                feat.SetField(name, value)
            lyr.SetFeature(feat)
        ds = None
        os.replace(tmp, path)
    finally:
        _remove_gpkg_temp(tmp)
    return path
