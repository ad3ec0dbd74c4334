"""Adapt: chips cut in QGIS from a raster around labelled points and over labelled polygons -> the backend's
``train`` op -> a new adapter, and the report (held-out accuracy, zero-shot vs adapted, per class, confusion).

The labelled features are taken on the main thread (:func:`examples_of_layer`: reprojected to the raster's CRS);
the chips are read in the worker (:meth:`AdaptProcessor.cut`) from the raster's raw bands with their valid-pixel
mask (nodata, alpha, footprint): a chip below ``min_valid`` valid pixels is left out and invalid pixels read 0.
Every chip carries its feature (``groups``) so that the backend holds out whole polygons, never single chips.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from shared_protocol.defaults import ADAPT_TEMPLATES, MIN_VALID_SHARE
from shared_protocol.ops import ADAPT_METHODS, INSTANT_METHODS

from ..capture import RasterSource, read_bands
from ..errors import PluginError
from ..masks import valid_range
from .base import Common, Feedback, Outcome

DEFAULT_CHIP_SIZE = 224
MAX_CHIPS_PER_EXAMPLE = 32
MAX_GRID_CELLS = 20000  # squares tried over one polygon


@dataclass
class Example:
    """One labelled feature in the raster's CRS: a ``QgsGeometry`` (points or polygons), its class and id."""

    geometry: Any
    name: str
    fid: int


@dataclass
class AdaptParams:
    class_field: str
    method: str = "instant-cache"
    name: str = ""
    resolution: Optional[float] = None  # raster CRS units per chip pixel (None: the raster's own)
    chip_size: int = DEFAULT_CHIP_SIZE
    epochs: Optional[int] = None
    max_per_example: int = MAX_CHIPS_PER_EXAMPLE
    min_valid: float = MIN_VALID_SHARE
    seed: int = 0
    overwrite: bool = False
    skip_outside: bool = False
    templates: str = ADAPT_TEMPLATES
    bands: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        from shared_protocol.ops import TRAIN
        if self.method not in ADAPT_METHODS:
            raise PluginError(f"unknown method {self.method!r}; choose one of {', '.join(ADAPT_METHODS)}")
        self.name = self.name.strip()
        problem = next(p for p in TRAIN.params if p.name == "name").check(self.name) if self.name else "is empty"
        if problem:
            raise PluginError(f"adapter name {self.name!r}: {problem}")
        if not 8 <= int(self.chip_size) <= 4096:
            raise PluginError(f"the chip size must be 8 to 4096 pixels, not {self.chip_size}")
        if self.resolution is not None and not (self.resolution > 0 and math.isfinite(self.resolution)):
            raise PluginError(f"the resolution must be a positive number, not {self.resolution!r}")
        self.chip_size, self.max_per_example = int(self.chip_size), max(1, int(self.max_per_example))


def examples_of_layer(layer: Any, class_field: str, raster_crs: Any, selected_only: bool = False,
                      project: Any = None) -> Tuple[List[Example], List[str]]:
    """The labelled features of a vector layer in ``raster_crs`` (main thread); features with an empty class
    are left out (a warning says how many)."""
    from qgis.core import QgsWkbTypes
    if layer is None or not layer.isValid():
        raise PluginError("choose a labelled vector layer (points or polygons)")
    if layer.geometryType() not in (QgsWkbTypes.PointGeometry, QgsWkbTypes.PolygonGeometry):
        raise PluginError(f"{layer.name()}: the labels must be points or polygons, not lines or a table")
    feats = layer.getSelectedFeatures() if selected_only else layer.getFeatures()
    what = "selected features" if selected_only else "features"
    return examples_of(feats, layer.fields(), layer.crs(), class_field, raster_crs, layer.name(), what, project)


def examples_of(features: Any, fields: Any, crs: Any, class_field: str, raster_crs: Any, name: str,
                what: str = "features", project: Any = None) -> Tuple[List[Example], List[str]]:
    """Labelled features (any iterable of ``QgsFeature`` with ``fields`` in ``crs``: a layer's or a Processing
    source's) reprojected to ``raster_crs``."""
    from qgis.core import QgsCoordinateTransform, QgsProject
    names = [f.name() for f in fields]
    if class_field not in names:
        raise PluginError(f"{name} has no field {class_field!r}; its fields: {', '.join(names) or 'none'}")
    if not crs.isValid():
        raise PluginError(f"{name} has no CRS: set it (Layer Properties > Source) before adapting")
    xform = QgsCoordinateTransform(crs, raster_crs, project or QgsProject.instance())
    out: List[Example] = []
    blank = 0
    for f in features:
        value = f[class_field]
        geom = f.geometry()
        if geom is None or geom.isEmpty():
            continue
        label = "" if value is None or str(value) == "NULL" else str(value).strip()
        if not label:
            blank += 1
            continue
        g = type(geom)(geom)
        if crs != raster_crs:
            g.transform(xform)
        out.append(Example(g, label, int(f.id())))
    if not out:
        raise PluginError(f"{name} has no {what} with a class in {class_field!r}: draw or pick some first")
    warnings = [f"{blank} features without a class in {class_field!r} left out"] if blank else []
    return out, warnings


def example_counts(examples: Sequence[Example]) -> Dict[str, int]:
    """Features per class (shown before training)."""
    counts: Dict[str, int] = {}
    for e in examples:
        counts[e.name] = counts.get(e.name, 0) + 1
    return dict(sorted(counts.items()))


def chip_centres(geom: Any, side: float, max_chips: int, rng: np.random.Generator) -> List[Tuple[float, float]]:
    """Centres of an example's chips: each point, or squares of ``side`` tiling a polygon (a centred grid, a square
    kept when at least half of it is inside; the polygon's point on surface when none is), at most ``max_chips``."""
    from qgis.core import QgsGeometry, QgsRectangle, QgsWkbTypes
    if geom.type() == QgsWkbTypes.PointGeometry:
        centres = [(float(v.x()), float(v.y())) for v in geom.vertices()]
    else:
        box = geom.boundingBox()
        nx = max(1, int(math.ceil(box.width() / side)))
        ny = max(1, int(math.ceil(box.height() / side)))
        if nx * ny > MAX_GRID_CELLS:
            raise PluginError(f"a polygon spans {nx} x {ny} chips; choose a coarser resolution or a larger chip size")
        ox = box.xMinimum() + (box.width() - nx * side) / 2
        oy = box.yMinimum() + (box.height() - ny * side) / 2
        engine = QgsGeometry.createGeometryEngine(geom.constGet())
        engine.prepareGeometry()
        centres = []
        for j in range(ny):
            for i in range(nx):
                sq = QgsGeometry.fromRect(QgsRectangle(ox + i * side, oy + j * side, ox + (i + 1) * side,
                                                       oy + (j + 1) * side))
                if not engine.intersects(sq.constGet()):
                    continue
                if geom.intersection(sq).area() >= 0.5 * side * side:
                    centres.append((ox + (i + 0.5) * side, oy + (j + 0.5) * side))
        if not centres:
            p = geom.pointOnSurface().asPoint()
            centres = [(p.x(), p.y())]
    if len(centres) > max_chips:
        centres = [centres[i] for i in sorted(rng.choice(len(centres), max_chips, replace=False))]
    return centres


def read_chip(src: RasterSource, centre: Tuple[float, float], side: float, size: int,
              bands: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(chip ``size x size x C``, its valid mask) of the square of ``side`` map units centred on ``centre``, from
    the raster's raw bands (nearest); pixels outside the raster or invalid (nodata, alpha) are 0 and masked."""
    from qgis.core import QgsRectangle
    cx, cy = centre
    res = side / size
    box = QgsRectangle(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    inter = box.intersect(src.extent)
    nb = len(bands) if bands else (3 if src.provider.bandCount() >= 3 else 1)
    chip = np.zeros((size, size, nb), np.uint16)
    mask = np.zeros((size, size), np.uint8)
    if inter.isEmpty() or inter.width() < res / 2 or inter.height() < res / 2:
        return chip.astype(np.uint8), mask
    col0 = int(round((inter.xMinimum() - box.xMinimum()) / res))
    row0 = int(round((box.yMaximum() - inter.yMaximum()) / res))
    cap = read_bands(src, bands, inter, res)
    h, w = min(cap.height, size - row0), min(cap.width, size - col0)
    chip = chip.astype(cap.pixels.dtype)
    chip[row0:row0 + h, col0:col0 + w] = cap.pixels[:h, :w]
    mask[row0:row0 + h, col0:col0 + w] = cap.valid()[:h, :w]
    chip[mask == 0] = 0
    return chip, mask


@dataclass
class ChipSet:
    """What the ``train`` request sends (chips, labels, groups) with the classes and per-class counts."""

    classes: List[str]
    chips: np.ndarray
    labels: np.ndarray
    groups: np.ndarray  # the example (index into ``fids``) of each chip
    fids: List[int]
    value_range: Optional[List[float]] = None
    warnings: List[str] = field(default_factory=list)

    def counts(self) -> Dict[str, Dict[str, int]]:
        """Per class: examples (features) that gave chips, and chips."""
        out = {}
        for k, c in enumerate(self.classes):
            sel = self.labels == k
            out[c] = {"examples": int(len(np.unique(self.groups[sel]))), "chips": int(sel.sum())}
        return out


def counts_text(counts: Dict[str, Dict[str, int]]) -> str:
    return ", ".join(f"{c}: {v['examples']} examples / {v['chips']} chips" for c, v in counts.items())


def report_rows(classes: Sequence[str], metrics: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The report's table: per class (and 'all') the held-out accuracy (%) zero-shot and adapted, and the adapted
    confusion row (counts of each predicted class; rows: truth)."""
    zero, adapted = metrics.get("zero_shot") or {}, metrics.get("adapted") or {}
    confusion = adapted.get("confusion") or [[0] * len(classes) for _ in classes]
    rows = [{"class": c, "zero_shot": (zero.get("per_class") or {}).get(c),
             "adapted": (adapted.get("per_class") or {}).get(c), "confusion": list(confusion[k])}
            for k, c in enumerate(classes)]
    rows.append({"class": "all", "zero_shot": zero.get("top1"), "adapted": adapted.get("top1"), "confusion": []})
    return rows


class AdaptProcessor:
    """Cuts the chips of ``examples`` from ``raster`` and adapts the served model to them (``train``)."""

    def __init__(self, raster: RasterSource, examples: Sequence[Example], params: AdaptParams, common: Common,
                 labels_name: str = ""):
        self.raster, self.examples, self.params, self.common = raster, list(examples), params, common
        self.labels_name = labels_name
        self.title = f"adapt '{params.name}' ({params.method})"
        self.chipset: Optional[ChipSet] = None

    def pixel_size(self) -> float:
        return float(math.sqrt(abs(self.raster.extent.width() / self.raster.width *
                                   self.raster.extent.height() / self.raster.height)))

    def cut(self, fb: Optional[Feedback] = None) -> ChipSet:
        """The chips (valid pixels only), their labels and examples; clear errors for what cannot train."""
        from qgis.core import QgsGeometry
        fb = fb or Feedback()
        p = self.params
        res = float(p.resolution or self.pixel_size())
        side = p.chip_size * res
        extent = QgsGeometry.fromRect(self.raster.extent)
        warnings: List[str] = []
        inside, outside = [], []
        for e in self.examples:
            (inside if e.geometry.intersects(extent) else outside).append(e)
        if outside:
            ids = [e.fid for e in outside][:10]
            if not p.skip_outside:
                raise PluginError(f"{len(outside)} labelled features lie outside the raster {self.raster.name} "
                                  f"(feature ids {ids}); move them, choose another raster, or skip them")
            warnings.append(f"{len(outside)} features outside the raster left out: {ids}")
        classes = sorted({e.name for e in inside})
        if len(classes) < 2:
            raise PluginError(f"only {len(classes)} class ({', '.join(classes) or 'none'}) on the raster: adapting "
                              "needs two or more")
        rng = np.random.default_rng(p.seed)
        chips, masks, labels, groups, fids, low = [], [], [], [], [], []
        for n, e in enumerate(inside):
            fb.check()
            fb.progress(0.2 * n / len(inside), f"cutting chips: feature {n + 1} of {len(inside)}")
            kept = 0
            for centre in chip_centres(e.geometry, side, p.max_per_example, rng):
                chip, mask = read_chip(self.raster, centre, side, p.chip_size, p.bands)
                if mask.mean() < p.min_valid:
                    continue
                chips.append(chip)
                masks.append(mask)
                labels.append(classes.index(e.name))
                groups.append(len(fids))
                kept += 1
            if kept:
                fids.append(e.fid)
            else:
                low.append(e.fid)
        if low:
            warnings.append(f"{len(low)} features gave no chip with at least {p.min_valid:.0%} valid pixels: "
                            f"{low[:10]}")
        if not chips:
            raise PluginError("no chip has enough valid pixels: the labels lie on nodata, or the valid share asked "
                              "is too high")
        labels_arr = np.array(labels, np.int32)
        groups_arr = np.array(groups, np.int32)
        chip_counts = np.bincount(labels_arr, minlength=len(classes))
        few = {c: int(n) for c, n in zip(classes, chip_counts, strict=True) if n < 2}
        if few:
            raise PluginError(f"every class needs at least 2 chips; too few: {few}. Label more places of these "
                              "classes, or choose a finer resolution (more chips per polygon)")
        single = [c for k, c in enumerate(classes) if len(np.unique(groups_arr[labels_arr == k])) < 2]
        if single:
            warnings.append(f"classes {single} have one labelled feature only: none of it is held out, so their "
                            "held-out accuracy is not measured; label a second place of each")
        dtype = np.uint16 if any(c.dtype == np.uint16 for c in chips) else np.uint8
        stacked = np.stack([c.astype(dtype) for c in chips])
        mstack = np.stack(masks)
        vr = valid_range(stacked.reshape(-1, p.chip_size, stacked.shape[-1]), mstack.reshape(-1, p.chip_size))
        self.chipset = ChipSet(classes, stacked, labels_arr, groups_arr, fids, vr, warnings)
        return self.chipset

    def request(self, chipset: ChipSet) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        p = self.params
        params = {"name": p.name, "method": p.method, "classes": chipset.classes, "overwrite": p.overwrite,
                  "epochs": None if p.method in INSTANT_METHODS else p.epochs, "seed": p.seed,
                  "templates": p.templates, "value_range": chipset.value_range,
                  "provenance": {"raster": self.raster.name, "labels": self.labels_name,
                                 "class_field": p.class_field, "resolution": float(p.resolution or self.pixel_size()),
                                 "chip_size": p.chip_size, "min_valid": p.min_valid, "client": "qgis"}}
        return params, {"chips": chipset.chips, "labels": chipset.labels, "groups": chipset.groups}

    def run(self, client: Any, fb: Feedback) -> Outcome:
        chipset = self.chipset or self.cut(fb)
        fb.check()
        fb.progress(0.2, f"{len(chipset.chips)} chips: {counts_text(chipset.counts())}")
        params, arrays = self.request(chipset)
        reply = client.request("train", params, arrays, on_progress=fb.scaled(0.2, 1.0), cancel=fb.cancel)
        result = reply.result
        fb.progress(1.0, "done")
        metrics = result.get("metrics") or {}
        zero, adapted = (metrics.get(k, {}).get("top1") for k in ("zero_shot", "adapted"))

        def pct(v):
            return "-" if v is None else f"{v:.1f}%"
        summary = (f"adapter '{result.get('name', self.params.name)}' registered; held-out accuracy "
                   f"{pct(adapted)} (zero-shot {pct(zero)}) on {(metrics.get('adapted') or {}).get('n', 0)} chips; "
                   f"sent {len(chipset.chips)} chips ({counts_text(chipset.counts())})")
        return Outcome(self.title, [], [], summary, chipset.warnings + [str(w) for w in result.get("warnings", [])],
                       result, self.raster.name, report_rows(result.get("classes") or chipset.classes, metrics))
