"""Rasters for the index: checked on opening, read in block-aligned strips, cut into windows.

Any file GDAL opens (GeoTIFF, COG, VRT) in any CRS. Colour: the red, green and blue bands (by colour
interpretation, else the first three; one band is grey); alpha bands only mark validity. Values: 8-bit as
is; other integer and float types are scaled per raster with the 2nd-98th percentile of its valid pixels
(from a decimated read). Validity: ``files.raster_valid``, the protocol's rule (valid in every colour band's
nodata or internal mask, alpha > 0, finite). A rotated affine is fine: footprints are the windows' corners
through it.
"""
from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import numpy as np

from ..files import raster_valid
from ..tasks.windows import selo_windows
from .errors import RASTER_BANDS, RASTER_DTYPE, RASTER_NO_CRS, RASTER_UNREADABLE, bad
from .layout import WindowSettings

STATS_PIXELS = 1024  # the long side of the decimated read for percentiles and the nodata check
PERCENTILES = (2.0, 98.0)


@dataclass
class RasterInfo:
    """A checked raster and how it is read."""
    path: str
    bytes: int
    mtime_ns: int
    width: int
    height: int
    crs: str
    transform: List[float]
    bands: List[int]  # 1-based band indexes read as R, G, B (one: grey)
    dtype: str
    scale: Tuple[float, float]  # values mapped to 0 and 1
    block: Tuple[int, int]  # internal block (rows, cols)
    date: str
    valid_share: float  # from the decimated read
    hash: str = ""
    warnings: List[str] = field(default_factory=list)

    @property
    def raster_id(self) -> str:
        return self.hash[:32]

    def record(self, windows: int, skipped: int) -> Dict[str, Any]:
        """The row of the ``rasters`` table once every window is stored."""
        return {"raster": self.path, "raster_id": self.raster_id, "bytes": self.bytes, "mtime_ns": self.mtime_ns,
                "hash": self.hash, "crs": self.crs, "width": self.width, "height": self.height,
                "transform": json.dumps(self.transform), "bands": json.dumps(self.bands),
                "scale_lo": self.scale[0], "scale_hi": self.scale[1], "windows": windows, "skipped": skipped,
                "date": self.date, "indexed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def file_hash(path: str) -> str:
    """BLAKE3 of the file's bytes (multi-threaded, memory-mapped)."""
    import blake3
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if os.path.getsize(path):
        h.update_mmap(path)
    return h.hexdigest()


def _pick_bands(ds: Any, warnings: List[str]) -> List[int]:
    from rasterio.enums import ColorInterp
    interp = list(ds.colorinterp)
    data = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha]
    if not data:
        raise bad(RASTER_BANDS, f"{ds.name}: no data bands (only alpha)", path=ds.name)
    if len(data) == 1:
        warnings.append(f"{ds.name}: one band, indexed as grey")
        return data
    if len(data) == 2:
        warnings.append(f"{ds.name}: two data bands; band {data[0]} is indexed as grey")
        return data[:1]
    rgb = [interp.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue) if c in interp]
    bands = rgb if len(rgb) == 3 else data[:3]
    if len(data) > 3:
        warnings.append(f"{ds.name}: {len(data)} data bands; bands {bands} are indexed as RGB")
    return bands


def open_raster(path: str, with_hash: bool = True) -> RasterInfo:
    """Check a raster and describe how to read it; a typed error says what is wrong with a bad one."""
    import rasterio
    from rasterio.errors import RasterioError
    path = str(Path(path).resolve())
    if not os.path.isfile(path):
        raise bad(RASTER_UNREADABLE, f"{path}: no such file", path=path)
    warnings: List[str] = []
    st = os.stat(path)
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise bad(RASTER_NO_CRS, f"{path} has no CRS: its windows cannot be placed on the map; assign one "
                          "(gdal_edit.py -a_srs EPSG:XXXX) and add it again", path=path)
            dtype = ds.dtypes[0]
            if np.dtype(dtype).kind not in "uif":
                raise bad(RASTER_DTYPE, f"{path}: {dtype} pixels cannot be indexed", path=path)
            bands = _pick_bands(ds, warnings)
            t = ds.transform
            if t.b or t.d:
                warnings.append(f"{path}: rotated or sheared affine; footprints follow it")
            f = max(1, -(-max(ds.width, ds.height) // STATS_PIXELS))
            shape = (max(1, ds.height // f), max(1, ds.width // f))
            sample = ds.read(bands, out_shape=(len(bands),) + shape)
            mask = raster_valid(ds, bands, sample, out_shape=shape)
            date = ds.tags().get("TIFFTAG_DATETIME") or ""
            info = RasterInfo(path=path, bytes=st.st_size, mtime_ns=st.st_mtime_ns, width=ds.width, height=ds.height,
                              crs=ds.crs.to_string(), transform=list(t)[:6], bands=bands, dtype=dtype,
                              scale=_scale(sample, mask, dtype), block=tuple(ds.block_shapes[0]),
                              date=_iso_date(date, st.st_mtime), valid_share=float(mask.mean()), warnings=warnings)
    except RasterioError as exc:
        raise bad(RASTER_UNREADABLE, f"{path}: not a readable raster ({exc})", path=path) from None
    if info.valid_share == 0:
        warnings.append(f"{path}: all pixels are nodata; no window will be indexed")
    if dtype != "uint8":
        warnings.append(f"{path}: {dtype} values scaled to 0-1 with {info.scale[0]:g}..{info.scale[1]:g} "
                        f"(the {PERCENTILES[0]:g}-{PERCENTILES[1]:g}% percentiles of its valid pixels)")
    if with_hash:
        info.hash = file_hash(path)
    return info


def _scale(sample: np.ndarray, mask: np.ndarray, dtype: str) -> Tuple[float, float]:
    if dtype == "uint8":
        return 0.0, 255.0
    values = sample[:, mask].astype(np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size:
        lo, hi = np.percentile(values, PERCENTILES)
        if hi > lo:
            return float(lo), float(hi)
    return (0.0, 65535.0) if dtype == "uint16" else (0.0, 1.0)


def _iso_date(tag: str, mtime: float) -> str:
    try:
        return dt.datetime.strptime(tag.strip(), "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return dt.datetime.fromtimestamp(mtime, dt.timezone.utc).isoformat(timespec="seconds")


def window_boxes(height: int, width: int, settings: WindowSettings) -> Tuple[np.ndarray, np.ndarray]:
    """All windows (x0, y0, x1, y1) of the index's grids and their nominal sizes, ordered by row then column."""
    boxes, sizes = [], []
    for s in sorted(settings.sizes):
        b = selo_windows(height, width, int(s))
        boxes.append(b)
        sizes.append(np.full(len(b), int(s), np.int64))
    boxes_all, sizes_all = np.concatenate(boxes), np.concatenate(sizes)
    order = np.lexsort((boxes_all[:, 0], sizes_all, boxes_all[:, 1]))
    return boxes_all[order], sizes_all[order]


def window_ids(raster_id: str, boxes: np.ndarray, sizes: np.ndarray) -> List[str]:
    return [f"{raster_id}:{s}:{b[0]}:{b[1]}" for b, s in zip(boxes.tolist(), sizes.tolist(), strict=True)]


def footprints(info: RasterInfo, boxes: np.ndarray) -> Dict[str, Any]:
    """Each window's footprint: bounds in the raster CRS, and its polygon (corners) in EPSG:4326."""
    import shapely
    from rasterio.transform import Affine
    from rasterio.warp import transform as warp
    a = Affine(*info.transform)
    n = len(boxes)
    cols = boxes[:, [0, 2, 2, 0]].astype(np.float64)  # corners: top-left, top-right, bottom-right, bottom-left
    rows = boxes[:, [1, 1, 3, 3]].astype(np.float64)
    xs = a.a * cols + a.b * rows + a.c
    ys = a.d * cols + a.e * rows + a.f
    lon, lat = warp(info.crs, "EPSG:4326", xs.ravel().tolist(), ys.ravel().tolist())
    lon, lat = np.asarray(lon).reshape(n, 4), np.asarray(lat).reshape(n, 4)
    ring = np.stack([lon, lat], axis=-1)
    polys = shapely.polygons(np.concatenate([ring, ring[:, :1]], axis=1))
    return {"minx": xs.min(1), "miny": ys.min(1), "maxx": xs.max(1), "maxy": ys.max(1),
            "lon_min": lon.min(1), "lat_min": lat.min(1), "lon_max": lon.max(1), "lat_max": lat.max(1),
            "geometry": shapely.to_wkb(polys).tolist(), "wkt": shapely.to_wkt(polys, rounding_precision=7).tolist()}


@dataclass
class WindowBatch:
    """Windows cut from one block-aligned strip: ``canvas`` (H x W x C) holds them all; ``boxes`` are in the
    canvas, ``index`` points into the raster's window list."""
    canvas: np.ndarray
    boxes: np.ndarray
    index: np.ndarray
    valid: np.ndarray


def read_windows(info: RasterInfo, boxes: np.ndarray, keep: Optional[Set[int]], batch: int, min_valid: float,
                 skipped: List[int]) -> Iterator[WindowBatch]:
    """The windows ``boxes`` (sorted by row, only those in ``keep`` when given) whose valid share is at least
    ``min_valid``, in batches of about ``batch``; the left-out (nodata) ones are appended to ``skipped``.

    Rows are read in strips aligned to the file's internal blocks and kept only while windows need them:
    memory is bounded by the raster's width times the largest window plus a block, not by its height.
    """
    import rasterio
    from rasterio.windows import Window
    float_input = info.dtype not in ("uint8", "uint16")
    bh = max(1, info.block[0])
    with rasterio.open(info.path) as ds:
        kind = info.dtype if info.dtype in ("uint8", "uint16") else "float32"  # the engine scales the rest
        buf = np.zeros((0, info.width, len(info.bands)), kind)
        mbuf = np.zeros((0, info.width), bool)
        top = 0  # raster row of buf[0]
        pending: List[int] = []

        def emit() -> Optional[WindowBatch]:
            idx = np.array(pending, np.int64)
            pending.clear()
            b = boxes[idx]
            y0, y1, x0, x1 = int(b[:, 1].min()), int(b[:, 3].max()), int(b[:, 0].min()), int(b[:, 2].max())
            m = mbuf[y0 - top:y1 - top, x0:x1]
            integral = np.pad(m.cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
            rel = b - np.array([x0, y0, x0, y0])
            inside = (integral[rel[:, 3], rel[:, 2]] - integral[rel[:, 1], rel[:, 2]]
                      - integral[rel[:, 3], rel[:, 0]] + integral[rel[:, 1], rel[:, 0]])
            valid = inside / ((rel[:, 2] - rel[:, 0]) * (rel[:, 3] - rel[:, 1]))
            ok = valid >= min_valid
            skipped.extend(idx[~ok].tolist())
            if not ok.any():
                return None
            canvas = np.ascontiguousarray(buf[y0 - top:y1 - top, x0:x1])
            return WindowBatch(canvas, rel[ok], idx[ok], valid[ok].astype(np.float32))

        order = [i for i in range(len(boxes)) if keep is None or i in keep]
        for pos, i in enumerate(order):
            y0, y1 = int(boxes[i, 1]), int(boxes[i, 3])
            need_top = min([int(boxes[j, 1]) for j in pending] + [y0])
            if need_top > top:  # rows no window needs any more
                drop = min(need_top, top + len(buf)) - top
                buf, mbuf, top = buf[drop:], mbuf[drop:], top + drop
            if len(buf) == 0:
                top = (y0 // bh) * bh
            end = top + len(buf)
            if y1 > end:  # read whole blocks down to the window's last row
                stop = min(info.height, -(-y1 // bh) * bh)
                w = Window(0, end, info.width, stop - end)
                data = ds.read(info.bands, window=w)
                m = raster_valid(ds, info.bands, data, window=w)
                if float_input:
                    data = np.nan_to_num(data.astype(np.float32, copy=False))
                buf = np.concatenate([buf, data.transpose(1, 2, 0)]) if len(buf) else \
                    np.ascontiguousarray(data.transpose(1, 2, 0))
                mbuf = np.concatenate([mbuf, m]) if len(mbuf) else m
            pending.append(i)
            last = pos == len(order) - 1
            if len(pending) >= batch or last or int(boxes[order[pos + 1], 1]) != y0 and len(pending) >= batch // 2:
                out = emit()
                if out is not None:
                    yield out
