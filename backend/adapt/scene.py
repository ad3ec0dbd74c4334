"""A labelled scene to adapt on (tests, benchmarks, demos): textured regions painted on a GeoTIFF, with
their polygons in a GeoPackage.

The raster is a grid of ``grid x grid`` cells in UTM 18N; each cell belongs to one of ``classes`` and is
painted with that class's texture: the luminance of a crop of a real raster (``textures``: files from
``../shared/data``; synthetic noise without them) tinted with the class's colour, plus a class-specific
stripe pattern. The outer ``border`` pixels are nodata (0), so chips at the edge test the valid-pixel masks.
Polygons are the cells inset by two pixels (they never touch), written in ``labels_crs`` (EPSG:4326 by
default, so the labels must be reprojected), with the class in the field ``landcover``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

CLASS_NAMES = ("forest", "water", "farmland", "bare soil", "urban", "wetland", "snow", "sand")
PALETTE = ((40, 110, 40), (30, 60, 150), (190, 170, 60), (150, 100, 70), (140, 140, 150), (60, 130, 120),
           (235, 235, 240), (220, 200, 150))
ORIGIN = (500000.0, 4200000.0)
CRS = "EPSG:32618"


@dataclass
class Scene:
    raster: Path
    labels: Path
    classes: List[str]
    cell_classes: np.ndarray  # grid x grid class indices
    pixel: float
    cell: int


def _texture(source: Optional[np.ndarray], shape, rng: np.random.Generator) -> np.ndarray:
    """A luminance texture in [0.6, 1.0] of ``shape`` (H, W): a random crop of ``source`` or noise."""
    h, w = shape
    if source is not None and source.shape[0] > h and source.shape[1] > w:
        for _ in range(50):
            y, x = rng.integers(0, source.shape[0] - h), rng.integers(0, source.shape[1] - w)
            crop = source[y:y + h, x:x + w].astype(np.float64)
            if (crop > 0).mean() > 0.95:  # skip the nodata collars
                lo, hi = np.percentile(crop, (2, 98))
                return 0.6 + 0.4 * np.clip((crop - lo) / max(hi - lo, 1), 0, 1)
    return 0.6 + 0.4 * rng.random((h, w))


def _read_luminance(path: Path) -> Optional[np.ndarray]:
    import rasterio
    try:
        with rasterio.open(path) as ds:
            data = ds.read(list(range(1, min(ds.count, 3) + 1))).astype(np.float64)
    except Exception:
        return None
    return data.mean(axis=0)


def make_scene(folder: Path, n_classes: int = 5, grid: int = 8, cell: int = 80, pixel: float = 10.0,
               border: int = 16, textures: Sequence[Path] = (), seed: int = 0, labels_crs: str = "EPSG:4326",
               labels_name: str = "labels.gpkg") -> Scene:
    """Write ``folder/scene.tif`` and ``folder/labels.gpkg``; every class gets at least ``grid*grid // n``
    cells (a balanced, shuffled assignment)."""
    import pyogrio
    import rasterio
    import shapely
    from pyproj import Transformer
    from rasterio.transform import from_origin
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = list(CLASS_NAMES[:n_classes])
    cells = np.resize(np.arange(n_classes), grid * grid)
    rng.shuffle(cells)
    cell_classes = cells.reshape(grid, grid)
    sources = [_read_luminance(Path(p)) for p in textures]
    size = grid * cell + 2 * border
    img = np.zeros((size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:cell, 0:cell]
    for r in range(grid):
        for c in range(grid):
            k = int(cell_classes[r, c])
            source = sources[k % len(sources)] if sources else None
            lum = _texture(source, (cell, cell), rng)
            period = 6 + 5 * k  # a stripe frequency and direction per class
            stripes = 0.85 + 0.15 * np.sin(2 * np.pi * ((xx if k % 2 else yy) + (k * yy if k % 3 else 0)) / period)
            rgb = np.array(PALETTE[k], np.float64)[None, None] * (lum * stripes)[:, :, None]
            y0, x0 = border + r * cell, border + c * cell
            img[y0:y0 + cell, x0:x0 + cell] = np.clip(rgb, 1, 255).astype(np.uint8)  # 0 is nodata
    transform = from_origin(ORIGIN[0], ORIGIN[1], pixel, pixel)
    raster = folder / "scene.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=CRS,
                       transform=transform, nodata=0) as ds:
        ds.write(img.transpose(2, 0, 1))
    polys, names = [], []
    inset = 2 * pixel
    for r in range(grid):
        for c in range(grid):
            x0 = ORIGIN[0] + (border + c * cell) * pixel
            y1 = ORIGIN[1] - (border + r * cell) * pixel
            polys.append(shapely.box(x0 + inset, y1 - cell * pixel + inset, x0 + cell * pixel - inset, y1 - inset))
            names.append(classes[int(cell_classes[r, c])])
    geoms = np.array(polys, dtype=object)
    if labels_crs != CRS:
        tr = Transformer.from_crs(CRS, labels_crs, always_xy=True)
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    labels = folder / labels_name
    pyogrio.raw.write(str(labels), shapely.to_wkb(geoms), [np.array(names, dtype=object)], ["landcover"],
                      geometry_type="Polygon", crs=labels_crs, driver="GPKG" if labels.suffix == ".gpkg" else None)
    return Scene(raster, labels, classes, cell_classes, pixel, cell)
