"""Rasters, checkpoints and an independent computation of an index's windows for the index tests."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import rasterio
import torch
from rasterio.transform import Affine, from_origin

from backend.engine import Engine, EngineConfig
from backend.models import load_model
from backend.tasks.windows import selo_windows

SIZES = (32, 64)
CROP = 32


def write_raster(path: Path, height: int = 150, width: int = 190, count: int = 3, dtype: str = "uint8",
                 crs: Optional[str] = "EPSG:32618", nodata: Optional[float] = 0, seed: int = 0,
                 transform: Optional[Affine] = None, blank_rows: int = 40, tiled: bool = True,
                 colorinterp=None) -> Path:
    """A textured raster with a nodata band of ``blank_rows`` rows at the top (value 0)."""
    rng = np.random.default_rng(seed)
    hi = 255 if dtype == "uint8" else 4000
    yy, xx = np.mgrid[0:height, 0:width]
    data = np.stack([((np.sin(xx / (7 + 3 * b)) + np.cos(yy / (5 + b))) * hi / 4 + hi / 2 + rng.normal(0, hi / 20,
                     (height, width))) for b in range(count)]).clip(1, hi).astype(dtype)
    data[:, :blank_rows] = 0
    profile = {"driver": "GTiff", "height": height, "width": width, "count": count, "dtype": dtype,
               "transform": transform or from_origin(500000, 4200000, 30, 30)}
    if crs:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled:
        profile.update(tiled=True, blockxsize=32, blockysize=32)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if colorinterp:
            dst.colorinterp = colorinterp
    return path


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(load_model("tiny", random_weights=True, device="cpu").model.state_dict(), path)
    return path


def engine_from(checkpoint: Path) -> Engine:
    loaded = load_model("tiny", checkpoint=str(checkpoint), device="cpu")
    return Engine(loaded, EngineConfig(batch_size=8, cache_bytes=0, precision="fp32"))


def expected_windows(engine: Engine, path: Path, sizes=SIZES, crop: int = CROP, min_valid: float = 0.5
                     ) -> Dict[tuple, np.ndarray]:
    """{(size, col, row, width, height): embedding} computed without the index: the whole raster read at once,
    SeLo windows of each size, valid share from the dataset mask, each kept window encoded on the full canvas."""
    with rasterio.open(path) as ds:
        pixels = ds.read([1, 2, 3] if ds.count >= 3 else [1]).transpose(1, 2, 0)
        mask = ds.dataset_mask() > 0
        scale = (0.0, 255.0)
        if ds.dtypes[0] != "uint8":
            values = pixels[mask].astype(np.float64).ravel()
            scale = tuple(np.percentile(values, (2, 98)))
    out = {}
    for s in sizes:
        boxes = selo_windows(pixels.shape[0], pixels.shape[1], s)
        keep = np.array([mask[y0:y1, x0:x1].mean() >= min_valid for x0, y0, x1, y1 in boxes])
        if not keep.any():
            continue
        feats = engine.encode_windows(pixels, boxes[keep], crop, None, scale).numpy()
        for (x0, y0, x1, y1), f in zip(boxes[keep].tolist(), feats, strict=True):
            out[(s, x0, y0, x1 - x0, y1 - y0)] = f
    return out
