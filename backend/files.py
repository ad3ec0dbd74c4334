"""Reading images for the command line, and writing output files atomically."""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from shared_protocol.nodata import valid_pixels
from shared_protocol.ops import DEFAULT_MAX_CANVAS_PIXELS

PathLike = Union[str, os.PathLike]
GEOTIFF_SUFFIXES = (".tif", ".tiff")


@dataclass
class Image:
    path: str
    pixels: np.ndarray  # H x W x C, uint8 or uint16
    transform: Optional[List[float]] = None  # rasterio affine [a, b, c, d, e, f]
    crs: Optional[str] = None
    mask: Optional[np.ndarray] = None  # H x W uint8, 0 where invalid (nodata, alpha, internal mask); None: all valid

    def masks(self, name: str) -> dict:
        """The request keyword for this image's mask as the array ``name`` (``canvas``: H x W; ``tiles`` or
        ``images``, this image alone: 1 x H x W): ``{name + "_mask": mask}``, or {} when all is valid."""
        if self.mask is None:
            return {}
        return {f"{name}_mask": self.mask if name == "canvas" else self.mask[None]}


def read_image(path: PathLike) -> Image:
    """PNG/JPEG through Pillow, GeoTIFF (and anything GDAL reads) through rasterio, as H x W x C.

    A raster's affine (rotated ones too) and CRS are kept, so outputs land where the input is. Its first
    three bands (or its first, with fewer than three) are read, and its valid pixels (:func:`raster_valid`:
    valid in every band's nodata or internal mask, alpha > 0, finite) as the mask. Rasters
    that are neither 8- nor 16-bit are stretched min-max over their valid pixels to uint16. A PNG's alpha
    stays its 4th channel (which the backend reads as the mask).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
        from PIL import Image as PILImage
        try:
            with PILImage.open(path) as im:
                check_pixels(path, im.height, im.width, len(im.getbands()))  # from the header, before decoding
                im = im.convert("RGB") if im.mode not in ("L", "RGB", "RGBA", "I;16") else im
                arr = np.asarray(im)
        except PILImage.DecompressionBombError as exc:
            raise ValueError(f"{path}: refused, a decompression bomb ({exc})") from None
        except (PILImage.UnidentifiedImageError, SyntaxError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from None
        if arr.dtype not in (np.uint8, np.uint16):
            arr = arr.astype(np.uint16)
        return Image(str(path), arr if arr.ndim == 3 else arr[:, :, None])
    import rasterio
    try:
        with rasterio.open(path) as ds:
            bands = 3 if ds.count >= 3 else 1  # a 4th band (NIR, alpha ...) is never sent as a 4th channel,
            check_pixels(path, ds.height, ds.width, bands)  # which the server would read as alpha; an alpha band
            data = ds.read(list(range(1, bands + 1)))  # counts in the mask instead (raster_valid)
            valid = raster_valid(ds, range(1, bands + 1), data)
            transform = list(ds.transform)[:6]
            crs = ds.crs.to_string() if ds.crs else None
    except rasterio.errors.RasterioIOError as exc:
        raise ValueError(f"{path}: not a readable raster ({exc})") from None
    if data.dtype not in (np.uint8, np.uint16):
        values = data[:, valid]
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        data = np.where(valid, (np.clip(np.nan_to_num(data), lo, hi) - lo) / (hi - lo or 1.0) * 65535, 0)
        data = data.astype(np.uint16)
    mask = None if valid.all() else valid.astype(np.uint8)
    return Image(str(path), np.ascontiguousarray(data.transpose(1, 2, 0)), transform, crs, mask)


def raster_valid(ds, bands: Sequence[int], values: Optional[np.ndarray] = None, **window) -> np.ndarray:
    """H x W bool: the valid pixels of ``bands`` (1-based) of the rasterio dataset ``ds`` by the rule written in
    :mod:`shared_protocol.nodata` (as QGIS draws it): each band's own mask (``read_masks``: its nodata value, an
    internal or ``.msk`` mask), every alpha band's raw value > 0 (not through ``read_masks``: GDAL scales a 16-bit
    alpha to 8 bits, so a 0-255 alpha would read as transparent), and the bands' ``values`` (C x H x W, as read:
    NaN and infinities are invalid) when given. ``window``: rasterio's ``window``, ``out_shape`` (H, W) and
    ``boundless`` (outside the raster is invalid), for the masks and the alpha alike."""
    from rasterio.enums import ColorInterp, MaskFlags
    alpha = [i + 1 for i, c in enumerate(ds.colorinterp) if c == ColorInterp.alpha]
    masks = [ds.read_masks(b, **window) for b in bands
             if b not in alpha and not (alpha and MaskFlags.alpha in ds.mask_flag_enums[b - 1])]
    alphas = [ds.read(a, **window, **({"fill_value": 0} if window.get("boundless") else {})) for a in alpha]
    return valid_pixels(masks, values, alphas)


def square_tile(image: Image, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """``image`` as a ``size`` x ``size`` uint8 RGB tile (PIL bicubic; uint16 stretched over the 2nd-98th
    percentile of its valid pixels) and its mask (nearest; all valid without one), for rank requests,
    whose tiles must share a shape."""
    from PIL import Image as PILImage
    pixels = image.pixels
    valid = np.ones(pixels.shape[:2], bool) if image.mask is None else image.mask != 0
    if pixels.shape[2] == 4 and image.mask is None:  # a PNG's alpha
        valid = pixels[:, :, 3] != 0
    if pixels.dtype != np.uint8:
        sample = pixels[valid][:, :3]
        lo, hi = np.percentile(sample, (2, 98)) if sample.size else (0, 65535)
        pixels = (np.clip((pixels - lo) / max(hi - lo, 1), 0, 1) * 255).astype(np.uint8)
    rgb = pixels[:, :, :3] if pixels.shape[2] >= 3 else np.repeat(pixels[:, :, :1], 3, axis=2)
    tile = np.asarray(PILImage.fromarray(rgb).resize((size, size), PILImage.BICUBIC))
    mask = np.asarray(PILImage.fromarray(valid.astype(np.uint8) * 255).resize((size, size), PILImage.NEAREST))
    return tile, (mask != 0).astype(np.uint8)


def check_pixels(path: PathLike, height: int, width: int, bands: int,
                 max_pixels: int = DEFAULT_MAX_CANVAS_PIXELS) -> None:
    """Refuse an image whose header declares more pixels than any request may carry (a 135-byte TIFF can
    declare 40000 x 40000; a small PNG can inflate to gigabytes) before anything is decoded."""
    if height * width > max_pixels:
        raise ValueError(f"{path}: refused, it declares {width} x {height} pixels ({bands} band(s)), over the "
                         f"limit of {max_pixels} pixels: a damaged file or a decompression bomb; cut it into parts")


def refuse_special(path: Path) -> None:
    """An output path must be absent or a regular file: never a device (``/dev/null``), FIFO, socket, directory
    or symlink, which a rename would replace (as root: delete ``/dev/null``) or a write would follow."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{path} is a symbolic link: refusing to replace it; give the real path")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} exists and is not a regular file (a device, FIFO, socket or folder): "
                         "refusing to replace it")


def _create_sibling(path: Path) -> Tuple[int, Path]:
    """A new, hidden file beside ``path`` (O_EXCL), with the permissions ``open()`` would give it.

    Not ``tempfile.mkstemp``: its files are 0600, and renamed into place they would stay unreadable to
    the rest of the group and to other users where the umask allows more.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: written to a temporary sibling, synced, then renamed over
    ``path``, so that ``path`` is complete or absent (left as it was if the block raises). ``path`` must be
    absent or a regular file (:func:`refuse_special`): a ``ValueError`` otherwise, before anything is written."""
    path = Path(path)
    refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_sibling(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        refuse_special(path)  # again: it may have become one while the data was written
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_file`: the file is complete or absent."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)
