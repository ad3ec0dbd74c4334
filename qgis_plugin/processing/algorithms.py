"""Classify / localize / rank over a whole raster layer: read in blocks, tiles sent in batches.

The raster's raw bands are read block by block at its own grid (or a chosen resolution); each block is a
:class:`capture.Capture`, so the georeferencing is the one tested for the dock's captures.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from qgis.core import (QgsFeature, QgsFeatureSink, QgsField, QgsFields, QgsGeometry, QgsPointXY,
                       QgsProcessing, QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingParameterBand,
                       QgsProcessingParameterDefinition, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterDestination,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString, QgsRectangle, QgsWkbTypes)
from qgis.PyQt.QtCore import QCoreApplication, QVariant

from shared_protocol import ProtocolError
from shared_protocol.ops import SMOOTH_WORK_KERNEL

from ..capture import Capture, read_bands
from ..connection import make_client
from ..errors import PluginError, plain_message
from ..outputs import write_geotiff
from ..processors import auto_smooth, auto_window_sizes, grid_windows
from ..settings import Settings


def _tr(text: str) -> str:
    return QCoreApplication.translate("MapQuery", text)


def raster_blocks(layer: Any, bands: Optional[Sequence[int]], block_px: int, resolution: Optional[float],
                  margin_px: int = 0, align_px: int = 1
                  ) -> Iterator[Tuple[int, int, Capture, Tuple[int, int, int, int]]]:
    """Yield (index, count, capture, inner) for blocks of at most ``block_px`` pixels covering the whole raster.

    Each capture reaches at least ``margin_px`` beyond its block on every side (within the raster), its
    origin snapped down to a multiple of ``align_px``, so that work near a block's edge sees the context
    across it on the same window grid as its neighbour; ``inner`` = (row0, row1, col0, col1) is the block
    itself inside the capture. Blocks tile the raster without overlap once cropped to ``inner``.
    """
    full = layer.extent()
    if resolution:
        xres = yres = float(resolution)
        width, height = max(1, round(full.width() / xres)), max(1, round(full.height() / yres))
    else:
        width, height = layer.width(), layer.height()
        xres, yres = full.width() / width, full.height() / height
    rows, cols = math.ceil(height / block_px), math.ceil(width / block_px)
    count = rows * cols
    for i in range(rows):
        for j in range(cols):
            c0, r0 = j * block_px, i * block_px
            c1, r1 = min(width, c0 + block_px), min(height, r0 + block_px)
            mc0, mr0 = (max(0, (v - margin_px) // align_px * align_px) for v in (c0, r0))
            mc1, mr1 = min(width, c1 + margin_px), min(height, r1 + margin_px)
            ext = QgsRectangle(full.xMinimum() + mc0 * xres, full.yMaximum() - mr1 * yres,
                               full.xMinimum() + mc1 * xres, full.yMaximum() - mr0 * yres)
            cap = read_bands(layer, bands, ext, resolution) if resolution else read_bands(layer, bands, ext)
            yield i * cols + j, count, cap, (r0 - mr0, r1 - mr0, c0 - mc0, c1 - mc0)


def value_range_of(layer: Any, bands: Optional[Sequence[int]]) -> Optional[List[float]]:
    """One 2nd-98th percentile range for a whole uint16 raster (so that every batch is scaled alike)."""
    side = max(layer.width(), layer.height())
    res = max(layer.extent().width(), layer.extent().height()) / min(side, 1024)
    preview = read_bands(layer, bands, None, res if side > 1024 else None)
    if preview.pixels.dtype != np.uint16:
        return None
    px = preview.pixels[..., :3].astype(np.float64)
    lo, hi = np.percentile(px, (2, 98))
    return [float(lo), float(hi) if hi > lo else float(lo) + 1.0]


class _Base(QgsProcessingAlgorithm):
    INPUT, BANDS, RESOLUTION = "INPUT", "BANDS", "RESOLUTION"
    BACKEND, TOKEN, ADAPTER, TIMEOUT = "BACKEND", "TOKEN", "ADAPTER", "TIMEOUT"
    OUTPUT = "OUTPUT"

    def group(self) -> str:
        return _tr("Ask the map")

    def groupId(self) -> str:  # noqa: N802
        return "askthemap"

    def createInstance(self):  # noqa: N802
        return type(self)()

    def _common_params(self) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, _tr("Raster layer")))
        self.addParameter(QgsProcessingParameterBand(self.BANDS, _tr("Bands (default: the first three)"), None,
                                                     self.INPUT, optional=True, allowMultiple=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.RESOLUTION, _tr("Resolution in map units per pixel (0: the raster's own)"),
            QgsProcessingParameterNumber.Double, 0.0, minValue=0.0))
        settings = Settings.load()
        for name, text, default, optional in (
                (self.BACKEND, "Backend address", settings.address, False),
                (self.TOKEN, "Access token", "", True),
                (self.ADAPTER, "Adapter (empty: the base model)", "", True)):
            p = QgsProcessingParameterString(name, _tr(text), default, optional=optional)
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)
        p = QgsProcessingParameterNumber(self.TIMEOUT, _tr("Timeout per request (s)"),
                                         QgsProcessingParameterNumber.Double, settings.timeout_s, minValue=1.0)
        p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(p)

    def _setup(self, parameters: Dict[str, Any], context: Any, feedback: Any):
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(_tr("cannot open the input raster"))
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        res = self.parameterAsDouble(parameters, self.RESOLUTION, context) or None
        settings = Settings.load()
        settings.address = self.parameterAsString(parameters, self.BACKEND, context) or settings.address
        settings.token = self.parameterAsString(parameters, self.TOKEN, context) or settings.token
        settings.timeout_s = self.parameterAsDouble(parameters, self.TIMEOUT, context) or settings.timeout_s
        adapter = self.parameterAsString(parameters, self.ADAPTER, context) or None
        cancel = threading.Event()
        feedback.canceled.connect(cancel.set)
        if feedback.isCanceled():
            cancel.set()
        return layer, bands, res, settings, adapter, cancel

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        try:
            return self.work(parameters, context, feedback)
        except (ProtocolError, PluginError, OSError) as exc:
            raise QgsProcessingException(plain_message(exc, self.displayName())) from None

    def work(self, parameters, context, feedback) -> Dict[str, Any]:
        raise NotImplementedError


def _polygon(ring: List[Tuple[float, float]]) -> QgsGeometry:
    return QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in ring]])


class _TileAlgorithm(_Base):
    TILE_SIZE, BATCH, TOP_K = "TILE_SIZE", "BATCH", "TOP_K"
    BLOCK = 4096

    def _tile_params(self, top_k: int) -> None:
        self.addParameter(QgsProcessingParameterNumber(self.TILE_SIZE, _tr("Tile size (pixels)"),
                                                       QgsProcessingParameterNumber.Integer, 224, minValue=8))
        self.addParameter(QgsProcessingParameterNumber(self.TOP_K, _tr("Top-k"), QgsProcessingParameterNumber.Integer,
                                                       top_k, minValue=1))
        p = QgsProcessingParameterNumber(self.BATCH, _tr("Tiles per request"), QgsProcessingParameterNumber.Integer,
                                         64, minValue=1)
        p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(p)

    def batches(self, layer, bands, res, tile: int, batch: int, feedback
                ) -> Iterator[Tuple[float, Capture, np.ndarray, np.ndarray, np.ndarray]]:
        """(progress, block capture, cells, windows, tiles) for every batch of tiles of the raster."""
        block = max(tile, (self.BLOCK // tile) * tile)
        for index, count, cap, _ in raster_blocks(layer, bands, block, res):
            cells, windows = grid_windows(cap.height, cap.width, tile)
            for start in range(0, len(windows), batch):
                if feedback.isCanceled():
                    return
                part = windows[start:start + batch]
                tiles = np.stack([cap.pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in part])
                done = (index + min(1.0, (start + batch) / len(windows))) / count
                yield done, cap, cells[start:start + batch], part, tiles


class ClassifyRasterAlgorithm(_TileAlgorithm):
    CLASSES = "CLASSES"

    def name(self) -> str:
        return "classifyraster"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Classify raster (zero-shot)")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Cuts the raster into tiles, sends them in batches to the MapQuery backend and writes a grid "
                   "of polygons with each tile's best class and its probability.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._common_params()
        self.addParameter(QgsProcessingParameterString(self.CLASSES, _tr("Class names (one per line or comma "
                                                                          "separated)"), multiLine=True))
        self._tile_params(3)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, _tr("Classification grid"),
                                                            QgsProcessing.TypeVectorPolygon))

    def work(self, parameters, context, feedback):
        layer, bands, res, settings, adapter, cancel = self._setup(parameters, context, feedback)
        raw = self.parameterAsString(parameters, self.CLASSES, context)
        classes = [c.strip() for part in raw.splitlines() for c in part.split(",") if c.strip()]
        if not classes:
            raise QgsProcessingException(_tr("give at least one class name"))
        tile = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        top_k = min(self.parameterAsInt(parameters, self.TOP_K, context), len(classes))
        batch = self.parameterAsInt(parameters, self.BATCH, context)
        fields = QgsFields()
        for name, kind in (("tile", QVariant.Int), ("label", QVariant.String), ("score", QVariant.Double),
                           ("top", QVariant.String)):
            fields.append(QgsField(name, kind))
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.Polygon, layer.crs())
        vr = value_range_of(layer, bands)
        n = 0
        with make_client(settings) as client:
            for done, cap, cells, _windows, tiles in self.batches(layer, bands, res, tile, batch, feedback):
                reply = client.classify(classes, tiles, top_k=top_k, value_range=vr, adapter=adapter, cancel=cancel)
                for t, box in zip(reply.result["tiles"], cells):
                    f = QgsFeature(fields)
                    f.setGeometry(_polygon(cap.box_to_map(*[int(v) for v in box])))
                    top = t["top"]
                    f.setAttributes([n, top[0]["label"], float(top[0]["score"]),
                                     "; ".join(f"{m['label']} {m['score']:.3f}" for m in top)])
                    sink.addFeature(f, QgsFeatureSink.FastInsert)
                    n += 1
                feedback.setProgress(100.0 * done)
        for w in reply.result.get("warnings", []) if n else []:
            feedback.pushWarning(str(w))
        feedback.pushInfo(f"{n} tiles classified")
        return {self.OUTPUT: dest}


class RankRasterAlgorithm(_TileAlgorithm):
    QUERY = "QUERY"

    def name(self) -> str:
        return "rankraster"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Search raster tiles by text")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Ranks every tile of the raster against a text query and writes the best tiles with their rank "
                   "and similarity score.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._common_params()
        self.addParameter(QgsProcessingParameterString(self.QUERY, _tr("Text query")))
        self._tile_params(20)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, _tr("Best tiles"),
                                                            QgsProcessing.TypeVectorPolygon))

    def work(self, parameters, context, feedback):
        layer, bands, res, settings, adapter, cancel = self._setup(parameters, context, feedback)
        query = self.parameterAsString(parameters, self.QUERY, context).strip()
        if not query:
            raise QgsProcessingException(_tr("give a text query"))
        tile = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        top_k = self.parameterAsInt(parameters, self.TOP_K, context)
        batch = self.parameterAsInt(parameters, self.BATCH, context)
        vr = value_range_of(layer, bands)
        hits: List[Tuple[float, List[Tuple[float, float]]]] = []
        with make_client(settings) as client:
            for done, cap, _cells, windows, tiles in self.batches(layer, bands, res, tile, batch, feedback):
                reply = client.rank(tiles, [query], top_k=min(top_k, len(tiles)), value_range=vr, adapter=adapter,
                                    cancel=cancel)
                for m in reply.result["by_query"][0]:
                    hits.append((float(m["score"]), cap.box_to_map(*[int(v) for v in windows[m["index"]]])))
                hits = sorted(hits, key=lambda h: -h[0])[:top_k]
                feedback.setProgress(100.0 * done)
        fields = QgsFields()
        for name, kind in (("rank", QVariant.Int), ("score", QVariant.Double), ("query", QVariant.String)):
            fields.append(QgsField(name, kind))
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.Polygon, layer.crs())
        for rank, (score, ring) in enumerate(hits, start=1):
            f = QgsFeature(fields)
            f.setGeometry(_polygon(ring))
            f.setAttributes([rank, score, query])
            sink.addFeature(f, QgsFeatureSink.FastInsert)
        return {self.OUTPUT: dest}


class LocalizeRasterAlgorithm(_Base):
    QUERY, BLOCK_SIZE = "QUERY", "BLOCK_SIZE"

    def name(self) -> str:
        return "localizeraster"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Localize text query (heatmap)")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Semantic localization over the whole raster: blocks of the raster are sent to the backend, "
                   "their raw similarity maps are stitched and normalised to 0-1 over the whole raster.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._common_params()
        self.addParameter(QgsProcessingParameterString(self.QUERY, _tr("Text query")))
        p = QgsProcessingParameterNumber(self.BLOCK_SIZE, _tr("Block size (pixels per request)"),
                                         QgsProcessingParameterNumber.Integer, 2048, minValue=64)
        p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(p)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, _tr("Heatmap")))

    def work(self, parameters, context, feedback):
        layer, bands, res, settings, adapter, cancel = self._setup(parameters, context, feedback)
        query = self.parameterAsString(parameters, self.QUERY, context).strip()
        if not query:
            raise QgsProcessingException(_tr("give a text query"))
        block = self.parameterAsInt(parameters, self.BLOCK_SIZE, context)
        dest = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        vr = value_range_of(layer, bands)
        pieces: List[Tuple[Capture, np.ndarray]] = []
        with make_client(settings) as client:
            # window sizes and smoothing are chosen for the block; every block is read with a margin of the
            # largest window plus the median kernel, from an origin on the common grid of the window strides,
            # offsets and smoothing blocks, so that its pixels get what one whole-raster run would give them
            sizes = auto_window_sizes(min(block, layer.height()), min(block, layer.width()))
            smooth = auto_smooth(min(block, layer.height()), min(block, layer.width()))
            align = math.lcm(*[max(1, s // 2) for s in sizes], *sizes, max(1, smooth // SMOOTH_WORK_KERNEL))
            margin = max(sizes) + smooth
            for index, count, cap, (r0, r1, c0, c1) in raster_blocks(layer, bands, block, res, margin, align):
                if feedback.isCanceled():
                    break
                reply = client.localize(cap.pixels, [query], window_sizes=sizes, smooth=smooth, normalize=False,
                                        value_range=vr, adapter=adapter, cancel=cancel)
                inner = np.array(reply.arrays["heatmaps"][0][r0:r1, c0:c1], dtype=np.float32)
                pieces.append((cap.pixel_to_map(c0, r0), inner))
                feedback.setProgress(100.0 * (index + 1) / count)
        if feedback.isCanceled() or not pieces:
            return {}
        (x0, y0), _ = pieces[0]
        a, e = cap.transform[0], cap.transform[4]
        placed = [(int(round((y - y0) / e)), int(round((x - x0) / a)), h) for (x, y), h in pieces]
        heat = np.zeros((max(r + h.shape[0] for r, _, h in placed), max(c + h.shape[1] for _, c, h in placed)),
                        np.float32)
        for row, col, h in placed:
            heat[row:row + h.shape[0], col:col + h.shape[1]] = h
        lo, hi = float(heat.min()), float(heat.max())
        heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        from pathlib import Path
        write_geotiff(Path(dest), heat, (a, 0.0, x0, 0.0, e, y0), cap.crs_wkt, [f"heatmap: {query}"])
        return {self.OUTPUT: dest}
