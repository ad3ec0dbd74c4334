"""Reading images for the command line, and writing output files atomically."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]
GEOTIFF_SUFFIXES = (".tif", ".tiff")


@dataclass
class Image:
    path: str
    pixels: np.ndarray  # H x W x C, uint8 or uint16
    transform: Optional[List[float]] = None  # rasterio affine [a, b, c, d, e, f]
    crs: Optional[str] = None


def read_image(path: PathLike) -> Image:
    """PNG/JPEG through Pillow, GeoTIFF (and anything GDAL reads) through rasterio, as H x W x C.

    A raster's affine (rotated ones too) and CRS are kept, so outputs land where the input is. Rasters
    that are neither 8- nor 16-bit are stretched min-max to uint16.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
        from PIL import Image as PILImage
        with PILImage.open(path) as im:
            im = im.convert("RGB") if im.mode not in ("L", "RGB", "RGBA", "I;16") else im
            arr = np.asarray(im)
        if arr.dtype not in (np.uint8, np.uint16):
            arr = arr.astype(np.uint16)
        return Image(str(path), arr if arr.ndim == 3 else arr[:, :, None])
    import rasterio
    try:
        with rasterio.open(path) as ds:
            bands = min(ds.count, 4) if ds.count != 2 else 1
            data = ds.read(list(range(1, bands + 1)))
            transform = list(ds.transform)[:6]
            crs = ds.crs.to_string() if ds.crs else None
    except rasterio.errors.RasterioIOError as exc:
        raise ValueError(f"{path}: not a readable raster ({exc})") from None
    if data.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(data.dtype, np.floating):
            data = np.nan_to_num(data)
        lo, hi = float(data.min()), float(data.max())
        data = ((data - lo) / (hi - lo or 1.0) * 65535).astype(np.uint16)
    return Image(str(path), np.ascontiguousarray(data.transpose(1, 2, 0)), transform, crs)


def atomic_write(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` then rename it: the file is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
