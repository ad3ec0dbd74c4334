"""Examples from the map: chips cut from a raster around labelled points and over labelled polygons.

The labels are any vector file OGR reads (GeoPackage, GeoJSON, Shapefile ...; read with pyogrio), in any CRS:
they are reprojected to the raster's (pyproj). Chips are ``chip_size`` pixels at a ground resolution of
``resolution`` raster-CRS units per chip pixel; over a polygon they tile it (squares at least half inside),
around a point they are centred on it. Only chips whose valid share (``files.raster_valid``, the
protocol's rule: valid in every band's nodata or internal mask, alpha > 0) reaches ``min_valid`` are kept.
Every chip remembers its example (the feature it comes
from): the validation split takes whole examples. Bad input raises :class:`ExampleError` with a message that
says what to fix; nothing is written here except by :func:`export_image_folder` (complete or absent).
"""
from __future__ import annotations

import json
import os
import shutil
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from shared_protocol.defaults import MIN_VALID_SHARE

from ..tasks.templates import normalize_classname
from .split import VAL_FRACTION, class_counts, split_by_group

DEFAULT_CHIP_SIZE = 224
MAX_CHIPS_PER_EXAMPLE = 32


class ExampleError(ValueError):
    """Labels or a raster that cannot give examples as asked (the message says what to fix)."""


@dataclass
class Labels:
    """Labelled features in the raster's CRS: shapely geometries, their class names and feature ids."""
    geometries: np.ndarray
    names: List[str]
    fids: List[int]
    crs: Optional[str]


@dataclass
class Examples:
    classes: List[str]
    chips: np.ndarray  # N x S x S x C, uint8 or uint16
    labels: np.ndarray  # N, int32 indices into classes
    groups: np.ndarray  # N, int32: the example (feature) of each chip, as its index in Labels
    held_out: np.ndarray  # N, bool
    fids: List[int]  # the feature id of each group
    value_range: Optional[List[float]] = None  # uint16 chips: the 2-98 % of their valid pixels
    warnings: List[str] = field(default_factory=list)
    provenance: Dict[str, Any] = field(default_factory=dict)

    def counts(self) -> Dict[str, Dict[str, int]]:
        return class_counts(self.labels, self.classes, self.held_out, self.groups)


# -- labels ------------------------------------------------------------------------------------------------
def read_labels(path: os.PathLike | str, class_field: str, layer: Optional[str] = None,
                labels_crs: Optional[str] = None) -> Tuple[Labels, List[str]]:
    """(labels in their own CRS, class names sorted): checked for an existing class field, features, class
    values (present, ASCII, distinct once normalised) and point or polygon geometries."""
    import pyogrio
    import shapely
    path = str(path)
    if not Path(path).exists():
        raise ExampleError(f"{path}: no such file")
    try:
        info = pyogrio.read_info(path, layer=layer)
    except Exception as exc:  # pyogrio's DataSourceError / DataLayerError and GDAL's messages
        raise ExampleError(f"{path}: not a vector layer OGR can read ({exc})") from None
    fields = [str(f) for f in info["fields"]]
    if class_field not in fields:
        raise ExampleError(f"{path}: no field {class_field!r}; its fields are {fields or 'none'}")
    if not info["features"]:
        raise ExampleError(f"{path}: the layer has no features: label some points or polygons first")
    meta, fids, wkb, data = pyogrio.raw.read(path, layer=layer, columns=[class_field], return_fids=True)
    geoms = shapely.from_wkb(wkb)
    values = data[0]
    names: List[str] = []
    for fid, value in zip(fids, values, strict=True):
        if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
            raise ExampleError(f"{path}: feature {fid} has no value in {class_field!r}: every feature needs a class")
        names.append(str(value).strip())
    bad = sorted({n for n in names if not n.isascii()})
    if bad:
        raise ExampleError(f"class names must be ASCII (the text model's vocabulary has no accents): {bad}; "
                           "rename them in the class field")
    seen: Dict[str, str] = {}
    for n in sorted(set(names)):
        key = normalize_classname(n)
        if key in seen:
            raise ExampleError(f"class names {seen[key]!r} and {n!r} are the same name to the model ({key!r}): "
                               "merge them in the class field")
        seen[key] = n
    empty = [int(f) for f, g in zip(fids, geoms, strict=True) if g is None or g.is_empty]
    if empty:
        raise ExampleError(f"{path}: features {empty[:10]} have no geometry")
    kinds = set(shapely.get_type_id(geoms).tolist())
    if kinds - {0, 3, 4, 6}:  # Point, Polygon, MultiPoint, MultiPolygon
        raise ExampleError(f"{path}: only points and polygons can be examples (the layer has "
                           f"{info.get('geometry_type')})")
    crs = labels_crs or meta.get("crs") or info.get("crs")
    return Labels(geoms, names, [int(f) for f in fids], crs), sorted(set(names))


def reproject(labels: Labels, raster_crs: Optional[str]) -> Labels:
    """The labels in the raster's CRS. A missing CRS on one side only, or coordinates that do not exist in
    the declared CRS (a wrong CRS), are errors."""
    import shapely
    if labels.crs is None and raster_crs is None:
        return labels
    if labels.crs is None:
        raise ExampleError("the labels have no CRS (no .prj?): pass --labels-crs (e.g. EPSG:4326) or assign one "
                           "in QGIS (Layer > Set CRS)")
    if raster_crs is None:
        raise ExampleError(f"the raster has no CRS while the labels are in {labels.crs}: georeference the "
                           "raster first")
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError
    try:
        src, dst = CRS.from_user_input(labels.crs), CRS.from_user_input(raster_crs)
    except CRSError as exc:
        raise ExampleError(f"CRS not understood: {exc}") from None
    if src == dst:
        return labels
    tr = Transformer.from_crs(src, dst, always_xy=True)

    def move(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1], errcheck=False)
        return np.column_stack([x, y])

    geoms = shapely.transform(labels.geometries, move)
    coords = shapely.get_coordinates(geoms)
    if not np.isfinite(coords).all():
        bad = [f for f, g in zip(labels.fids, geoms, strict=True) if not np.isfinite(shapely.get_coordinates(g)).all()]
        raise ExampleError(f"CRS mismatch: features {bad[:10]} cannot be placed in the raster's CRS ({dst.name}) "
                           f"from the labels' declared CRS ({src.name}); is the layer's CRS right?")
    return Labels(geoms, labels.names, labels.fids, raster_crs)


def raster_footprint(transform: Sequence[float], width: int, height: int):
    """The raster's extent as a polygon in its CRS (rotated affines too)."""
    import shapely
    a, b, c, d, e, f = transform[:6]
    corners = [(a * x + b * y + c, d * x + e * y + f) for x, y in ((0, 0), (width, 0), (width, height), (0, height))]
    return shapely.Polygon(corners)


def check_overlaps(labels: Labels) -> None:
    """Polygons (or points in polygons) of different classes that overlap cannot both be right."""
    import shapely
    tree = shapely.STRtree(labels.geometries)
    left, right = tree.query(labels.geometries, predicate="intersects")
    clashes = []
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i >= j or labels.names[i] == labels.names[j]:
            continue
        gi, gj = labels.geometries[i], labels.geometries[j]
        polygons = shapely.get_dimensions(gi) == 2 and shapely.get_dimensions(gj) == 2
        if polygons and shapely.intersection(gi, gj).area <= 1e-9 * min(gi.area, gj.area):
            continue  # shared edges only
        clashes.append((labels.fids[i], labels.names[i], labels.fids[j], labels.names[j]))
    if clashes:
        shown = "; ".join(f"{a} ({na}) and {b} ({nb})" for a, na, b, nb in clashes[:5])
        raise ExampleError(f"features of different classes overlap: {shown}{' ...' if len(clashes) > 5 else ''}; "
                           "fix the polygons so that every place has one class")


def keep_inside(labels: Labels, footprint, skip_outside: bool) -> Tuple[Labels, List[str]]:
    """Drop nothing, or (``skip_outside``) the features outside the raster; all outside is always an error."""
    import shapely
    inside = shapely.intersects(labels.geometries, footprint)
    if not inside.any():
        raise ExampleError("no labelled feature overlaps the raster: wrong raster, or a wrong CRS on the labels?")
    outside = [f for f, ok in zip(labels.fids, inside.tolist(), strict=True) if not ok]
    if outside and not skip_outside:
        raise ExampleError(f"{len(outside)} features lie outside the raster (ids {outside[:10]}): pass "
                           "--skip-outside to leave them out, or choose the raster they belong to")
    warnings = [f"{len(outside)} features outside the raster were left out: {outside[:10]}"] if outside else []
    idx = np.flatnonzero(inside)
    return Labels(labels.geometries[idx], [labels.names[i] for i in idx], [labels.fids[i] for i in idx],
                  labels.crs), warnings


# -- chips ---------------------------------------------------------------------------------------------------
def chip_centres(geom, side: float, max_chips: int, rng: np.random.Generator) -> List[Tuple[float, float]]:
    """Centres of the chips of one example: the point itself, or squares of ``side`` tiling a polygon (kept
    when at least half inside; the polygon's representative point when none is), at most ``max_chips``."""
    import shapely
    if shapely.get_dimensions(geom) == 0:
        pts = shapely.get_coordinates(geom)
        centres = [(float(x), float(y)) for x, y in pts]
    else:
        x0, y0, x1, y1 = geom.bounds
        nx, ny = max(1, int(np.ceil((x1 - x0) / side))), max(1, int(np.ceil((y1 - y0) / side)))
        ox, oy = x0 + ((x1 - x0) - nx * side) / 2, y0 + ((y1 - y0) - ny * side) / 2  # centred grid
        boxes = [shapely.box(ox + i * side, oy + j * side, ox + (i + 1) * side, oy + (j + 1) * side)
                 for j in range(ny) for i in range(nx)]
        shares = shapely.area(shapely.intersection(np.array(boxes), geom)) / (side * side)
        centres = [((b.bounds[0] + b.bounds[2]) / 2, (b.bounds[1] + b.bounds[3]) / 2)
                   for b, s in zip(boxes, shares, strict=True) if s >= 0.5]
        if not centres:
            p = geom.representative_point()
            centres = [(p.x, p.y)]
    if len(centres) > max_chips:
        centres = [centres[i] for i in sorted(rng.choice(len(centres), max_chips, replace=False))]
    return centres


def _bands(count: int) -> List[int]:
    return [1, 2, 3] if count >= 3 else [1]


def read_chip(ds, centre: Tuple[float, float], side_px: float, chip_size: int) -> Tuple[np.ndarray, float]:
    """(chip S x S x C as stored, valid share) of a square of ``side_px`` raster pixels centred on ``centre``."""
    from rasterio.enums import Resampling
    from rasterio.windows import Window
    inv = ~ds.transform
    col = inv.a * centre[0] + inv.b * centre[1] + inv.c
    row = inv.d * centre[0] + inv.e * centre[1] + inv.f
    window = Window(col - side_px / 2, row - side_px / 2, side_px, side_px)
    bands = _bands(ds.count)
    inside = window.col_off >= 0 and window.row_off >= 0 and col + side_px / 2 <= ds.width and \
        row + side_px / 2 <= ds.height  # boundless reads go through a VRT: much slower
    data = ds.read(bands, window=window, out_shape=(len(bands), chip_size, chip_size), boundless=not inside,
                   fill_value=0, resampling=Resampling.bilinear)
    from ..files import raster_valid
    mask = raster_valid(ds, bands, data, window=window, out_shape=(chip_size, chip_size), boundless=not inside)
    return np.ascontiguousarray(data.transpose(1, 2, 0)), float(mask.mean())


def to_uint(chips: np.ndarray) -> Tuple[np.ndarray, Optional[List[float]]]:
    """uint8 chips as they are; uint16 ones with the 2-98 % of their pixels as value range; anything else
    stretched to uint8 on those percentiles."""
    if chips.dtype == np.uint8:
        return chips, None
    lo, hi = (np.percentile(chips, (2, 98)) if chips.size else (0.0, 1.0))
    if chips.dtype == np.uint16:
        return chips, ([float(lo), float(hi)] if hi > lo else None)
    scaled = np.clip((chips.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    return scaled.astype(np.uint8), None


def build_examples(raster: os.PathLike | str, labels_path: os.PathLike | str, class_field: str, *,
                   layer: Optional[str] = None, labels_crs: Optional[str] = None,
                   resolution: Optional[float] = None, chip_size: int = DEFAULT_CHIP_SIZE,
                   min_valid: float = MIN_VALID_SHARE, max_per_example: int = MAX_CHIPS_PER_EXAMPLE,
                   val_fraction: float = VAL_FRACTION, seed: int = 0, skip_outside: bool = False) -> Examples:
    """Chips, labels, examples and the validation split (by example) from a raster and a labelled layer."""
    import rasterio
    labels, classes = read_labels(labels_path, class_field, layer, labels_crs)
    try:
        ds = rasterio.open(raster)
    except Exception as exc:
        raise ExampleError(f"{raster}: not a raster GDAL can read ({exc})") from None
    warnings: List[str] = []
    with ds:
        crs = ds.crs.to_string() if ds.crs else None
        labels = reproject(labels, crs)
        labels, dropped = keep_inside(labels, raster_footprint(list(ds.transform)[:6], ds.width, ds.height),
                                      skip_outside)
        warnings += dropped
        check_overlaps(labels)
        classes = sorted(set(labels.names))
        if len(classes) < 2:
            raise ExampleError(f"only one class ({classes}) in the labels: adapting needs two or more")
        t = ds.transform
        pixel = float(np.sqrt(abs(t.a * t.e - t.b * t.d)))
        res = float(resolution) if resolution else pixel
        if res <= 0:
            raise ExampleError("--resolution must be positive")
        side_px = chip_size * res / pixel
        rng = np.random.default_rng(seed)
        chips, chip_labels, groups, low = [], [], [], []
        for g, (geom, name, fid) in enumerate(zip(labels.geometries, labels.names, labels.fids, strict=True)):
            kept = 0
            for centre in chip_centres(geom, chip_size * res, max_per_example, rng):
                chip, valid = read_chip(ds, centre, side_px, chip_size)
                if valid < min_valid:
                    continue
                chips.append(chip)
                chip_labels.append(classes.index(name))
                groups.append(g)
                kept += 1
            if not kept:
                low.append(fid)
    if low:
        warnings.append(f"{len(low)} features gave no chip with at least {min_valid:.0%} valid pixels: {low[:10]}")
    if not chips:
        raise ExampleError("no chip has enough valid pixels: the labels lie on nodata, or --min-valid is too high")
    labels_arr = np.array(chip_labels, np.int32)
    counts = np.bincount(labels_arr, minlength=len(classes))
    few = {c: int(n) for c, n in zip(classes, counts, strict=True) if n < 2}
    if few:
        raise ExampleError(f"every class needs at least 2 chips; too few: {few}. Label more places of these classes "
                           "or use a finer --resolution (more chips per polygon)")
    stacked, value_range = to_uint(np.stack(chips))
    groups_arr = np.array(groups, np.int32)
    held = split_by_group(labels_arr, groups_arr, val_fraction, seed)
    single = [c for k, c in enumerate(classes) if len(np.unique(groups_arr[labels_arr == k])) < 2]
    if single:
        warnings.append(f"classes {single} have one example (polygon or point) only: none of it is held out, so "
                        "their held-out accuracy is not measured")
    prov = {"raster": os.path.basename(str(raster)), "labels": os.path.basename(str(labels_path)),
            "class_field": class_field, "layer": layer, "resolution": res, "chip_size": chip_size,
            "min_valid": min_valid, "crs": crs, "val_fraction": val_fraction, "seed": seed}
    return Examples(classes, stacked, labels_arr, groups_arr, held, labels.fids, value_range, warnings, prov)


# -- ImageFolder export ---------------------------------------------------------------------------------------
def _folder_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in " -_." else "_" for ch in name).strip() or "class"


def export_image_folder(examples: Examples, root: os.PathLike | str) -> Path:
    """``root/train/CLASS/*.png`` and ``root/val/CLASS/*.png`` (the held-out examples) plus
    ``root/examples.json``, for ``python -m backend train --data root/train --val-data root/val --shots 0``.
    Written in a temporary sibling folder renamed into place: complete or absent; an existing non-empty
    ``root`` is refused."""
    from PIL import Image
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ExampleError(f"{root} exists and is not an empty folder: choose a new one")
    tmp = root.with_name(f".{root.name}.{secrets.token_hex(4)}.part")
    chips = examples.chips
    if chips.dtype != np.uint8:  # PNG has no 16-bit RGB in Pillow: stretch on the value range
        lo, hi = examples.value_range or (0.0, 65535.0)
        chips = (np.clip((chips.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
    try:
        per_group: Dict[int, int] = {}
        for i, chip in enumerate(chips):
            g = int(examples.groups[i])
            k = per_group[g] = per_group.get(g, -1) + 1
            side = "val" if examples.held_out[i] else "train"
            folder = tmp / side / _folder_name(examples.classes[int(examples.labels[i])])
            folder.mkdir(parents=True, exist_ok=True)
            img = chip[:, :, 0] if chip.shape[2] == 1 else chip[:, :, :3]
            Image.fromarray(img).save(folder / f"f{examples.fids[g]}_{k:03d}.png")
        (tmp / "examples.json").write_text(json.dumps({"classes": examples.classes, "counts": examples.counts(),
                                                       "provenance": examples.provenance}, indent=1))
        if root.exists():
            root.rmdir()
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
