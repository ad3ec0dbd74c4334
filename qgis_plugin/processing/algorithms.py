"""Classify / rank / localize over a whole raster layer, for the toolbox, the modeler and ``qgis_process``.

Thin wrappers: parameters in, a :class:`sources.RasterBlocks` source (the raster's raw bands in blocks, with
nodata, alpha and the optional area of interest as each block's mask), the same tools as the dock
(:mod:`tools`), features into a sink or a GeoTIFF out.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from qgis.core import (QgsFeature, QgsFeatureSink, QgsField, QgsFields, QgsGeometry, QgsPointXY, QgsProcessing,
                       QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingLayerPostProcessorInterface,
                       QgsProcessingParameterBand,
                       QgsProcessingParameterDefinition, QgsProcessingParameterEnum, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString, QgsWkbTypes)
from qgis.PyQt.QtCore import QCoreApplication, QVariant

from shared_protocol import ProtocolError
from shared_protocol.defaults import DEFAULT_TILE_SIZE, MIN_VALID_SHARE
from shared_protocol.ops import SELO_MODES

from ..connection import make_client
from ..errors import PluginError, plain_message
from ..layers import set_provenance, style_classification, style_heatmap, style_ranking
from ..masks import AreaOfInterest
from ..settings import Settings
from ..sources import RasterBlocks
from ..tools import classify, localize, search
from ..tools.base import Common, Feedback, Row

_KINDS = {"int": QVariant.Int, "double": QVariant.Double, "string": QVariant.String}


def _tr(text: str) -> str:
    return QCoreApplication.translate("MapQuery", text)


def _fields(spec: Sequence[Tuple[str, str]]) -> QgsFields:
    fields = QgsFields()
    for name, kind in spec:
        fields.append(QgsField(name, _KINDS[kind]))
    return fields


def _write_rows(sink: Any, fields: QgsFields, spec: Sequence[Tuple[str, str]], rows: List[Row]) -> None:
    for ring, attrs in rows:
        f = QgsFeature(fields)
        f.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in ring]]))
        f.setAttributes([attrs.get(name) for name, _ in spec])
        sink.addFeature(f, QgsFeatureSink.FastInsert)


class _Style(QgsProcessingLayerPostProcessorInterface):
    """Styles an output like the dock's when Processing loads it into the project (kept alive until then)."""

    _pending: List["_Style"] = []

    def __init__(self, apply: Callable[[Any], Any]):
        super().__init__()
        self.apply = apply

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        self.apply(layer)
        if self in _Style._pending:
            _Style._pending.remove(self)

    @classmethod
    def on_load(cls, context: Any, dest: str, apply: Callable[[Any], Any]) -> None:
        if context.willLoadLayerOnCompletion(dest):
            post = cls(apply)
            cls._pending.append(post)
            context.layerToLoadOnCompletionDetails(dest).setPostProcessor(post)


class _Base(QgsProcessingAlgorithm):
    INPUT, BANDS, RESOLUTION, AOI, MIN_VALID = "INPUT", "BANDS", "RESOLUTION", "AOI", "MIN_VALID"
    BACKEND, TOKEN, ADAPTER, TIMEOUT = "BACKEND", "TOKEN", "ADAPTER", "TIMEOUT"
    OUTPUT = "OUTPUT"

    def group(self) -> str:
        return _tr("Ask the map")

    def groupId(self) -> str:  # noqa: N802
        return "askthemap"

    def createInstance(self):  # noqa: N802
        return type(self)()

    def _advanced(self, p) -> None:
        p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(p)

    def _common_params(self) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, _tr("Raster layer")))
        self.addParameter(QgsProcessingParameterBand(self.BANDS, _tr("Bands (default: the first three)"), None,
                                                     self.INPUT, optional=True, allowMultiple=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.RESOLUTION, _tr("Resolution in map units per pixel (0: the raster's own)"),
            QgsProcessingParameterNumber.Double, 0.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.AOI, _tr("Area of interest (polygons; answers come only from inside)"),
            [QgsProcessing.TypeVectorPolygon], optional=True))
        self._advanced(QgsProcessingParameterNumber(
            self.MIN_VALID, _tr("Least share of valid pixels in a tile or window (0-1)"),
            QgsProcessingParameterNumber.Double, MIN_VALID_SHARE, minValue=0.0, maxValue=1.0))
        self._backend_params()

    def _backend_params(self) -> None:
        """The backend's address, token, adapter and timeout (advanced)."""
        settings = Settings.load()
        for name, text, default, optional in (
                (self.BACKEND, "Backend address", settings.address, False),
                (self.TOKEN, "Access token", "", True),
                (self.ADAPTER, "Adapter (empty: the base model)", "", True)):
            self._advanced(QgsProcessingParameterString(name, _tr(text), default, optional=optional))
        self._advanced(QgsProcessingParameterNumber(self.TIMEOUT, _tr("Timeout per request (s)"),
                                                    QgsProcessingParameterNumber.Double, settings.timeout_s,
                                                    minValue=1.0))

    def _setup(self, parameters: Dict[str, Any], context: Any, feedback: Any):
        """(source, settings, common, tool feedback, min_valid) from the common parameters."""
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(_tr("cannot open the input raster"))
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        res = self.parameterAsDouble(parameters, self.RESOLUTION, context) or None
        aoi = None
        aoi_source = self.parameterAsSource(parameters, self.AOI, context)
        if aoi_source is not None:
            aoi = AreaOfInterest.of_features(aoi_source.getFeatures(), aoi_source.sourceCrs(),
                                             context.transformContext(), "AOI")
        settings, common, fb = self._backend(parameters, context, feedback)
        min_valid = self.parameterAsDouble(parameters, self.MIN_VALID, context)
        return RasterBlocks(layer, bands, res, aoi), layer, settings, common, fb, min_valid

    def _backend(self, parameters: Dict[str, Any], context: Any, feedback: Any):
        """(settings, common, tool feedback) from the backend parameters; Processing's cancel sets the event."""
        settings = Settings.load()
        settings.address = self.parameterAsString(parameters, self.BACKEND, context) or settings.address
        settings.token = self.parameterAsString(parameters, self.TOKEN, context) or settings.token
        settings.timeout_s = self.parameterAsDouble(parameters, self.TIMEOUT, context) or settings.timeout_s
        common = Common(adapter=self.parameterAsString(parameters, self.ADAPTER, context) or None)
        cancel = threading.Event()
        feedback.canceled.connect(cancel.set)
        if feedback.isCanceled():
            cancel.set()
        fb = Feedback(lambda p, m: feedback.setProgress(100.0 * p), cancel)
        return settings, common, fb

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        try:
            return self.work(parameters, context, feedback)
        except (ProtocolError, PluginError, OSError) as exc:
            if feedback.isCanceled():
                return {}
            raise QgsProcessingException(plain_message(exc, self.displayName())) from None

    def work(self, parameters, context, feedback) -> Dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _report(feedback, warnings: Sequence[str], text: str) -> None:
        for w in warnings:
            feedback.pushWarning(str(w))
        feedback.pushInfo(text)


class _TileAlgorithm(_Base):
    TILE_SIZE, BATCH, TOP_K = "TILE_SIZE", "BATCH", "TOP_K"

    def _tile_params(self, top_k: int) -> None:
        self.addParameter(QgsProcessingParameterNumber(self.TILE_SIZE, _tr("Tile size (pixels)"),
                                                       QgsProcessingParameterNumber.Integer, DEFAULT_TILE_SIZE,
                                                       minValue=8))
        self.addParameter(QgsProcessingParameterNumber(self.TOP_K, _tr("Top-k"), QgsProcessingParameterNumber.Integer,
                                                       top_k, minValue=1))
        self._advanced(QgsProcessingParameterNumber(self.BATCH, _tr("Tiles per request"),
                                                    QgsProcessingParameterNumber.Integer, 64, minValue=1))


class ClassifyRasterAlgorithm(_TileAlgorithm):
    CLASSES = "CLASSES"

    def name(self) -> str:
        return "classifyraster"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Classify raster (zero-shot)")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Cuts the raster into tiles, sends them in batches to the MapQuery backend and writes a grid "
                   "of polygons with each tile's best class and its probability. Tiles with too few valid pixels "
                   "(nodata, alpha, outside the area of interest) are skipped.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._common_params()
        self.addParameter(QgsProcessingParameterString(self.CLASSES, _tr("Class names (one per line or comma "
                                                                          "separated)"), multiLine=True))
        self._tile_params(3)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, _tr("Classification grid"),
                                                            QgsProcessing.TypeVectorPolygon))

    def work(self, parameters, context, feedback):
        source, layer, settings, common, fb, min_valid = self._setup(parameters, context, feedback)
        raw = self.parameterAsString(parameters, self.CLASSES, context)
        params = classify.ClassifyParams([c for part in raw.splitlines() for c in part.split(",")],
                                         self.parameterAsInt(parameters, self.TILE_SIZE, context),
                                         top_k=self.parameterAsInt(parameters, self.TOP_K, context),
                                         batch=self.parameterAsInt(parameters, self.BATCH, context),
                                         min_valid=min_valid)
        fields = _fields(classify.FIELDS)
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.Polygon, layer.crs())
        with make_client(settings) as client:
            res = classify.ClassifyProcessor(source, params, common).compute(client, fb)
        _write_rows(sink, fields, classify.FIELDS, res.rows)
        _Style.on_load(context, dest, lambda layer: set_provenance(style_classification(layer, params.classes),
                                                                   res.provenance))
        self._report(feedback, res.warnings, f"{len(res.rows)} tiles classified, {res.skipped} skipped")
        return {self.OUTPUT: dest}


class RankRasterAlgorithm(_TileAlgorithm):
    QUERY = "QUERY"

    def name(self) -> str:
        return "rankraster"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Search raster tiles by text")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Ranks every tile of the raster against a text query and writes the best tiles with their rank "
                   "and similarity score. Tiles with too few valid pixels are never ranked.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._common_params()
        self.addParameter(QgsProcessingParameterString(self.QUERY, _tr("Text query")))
        self._tile_params(20)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, _tr("Best tiles"),
                                                            QgsProcessing.TypeVectorPolygon))

    def work(self, parameters, context, feedback):
        source, layer, settings, common, fb, min_valid = self._setup(parameters, context, feedback)
        params = search.SearchParams(self.parameterAsString(parameters, self.QUERY, context),
                                     self.parameterAsInt(parameters, self.TILE_SIZE, context),
                                     self.parameterAsInt(parameters, self.TOP_K, context),
                                     self.parameterAsInt(parameters, self.BATCH, context), min_valid)
        with make_client(settings) as client:
            res = search.SearchProcessor(source, params, common).compute(client, fb)
        fields = _fields(search.FIELDS)
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.Polygon, layer.crs())
        _write_rows(sink, fields, search.FIELDS, res.rows)
        _Style.on_load(context, dest, lambda layer: set_provenance(style_ranking(layer), res.provenance))
        self._report(feedback, res.warnings, f"{res.ranked} tiles ranked, {res.skipped} skipped")
        return {self.OUTPUT: dest}


class LocalizeRasterAlgorithm(_Base):
    QUERY, BLOCK_SIZE, SELO_MODE = "QUERY", "BLOCK_SIZE", "SELO_MODE"

    def name(self) -> str:
        return "localizeraster"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Localize text query (heatmap)")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Semantic localization over the whole raster, as one canvas: the raster's SeLo windows are sent "
                   "block by block to the backend, each window encoded once; their scores make the map (mean per "
                   "pixel, min-max over the valid pixels, median smoothing), written block by block; nodata, "
                   "transparent pixels and pixels outside the area of interest are NaN (nodata). "
                   "SeLo mode 'reference' runs the original pipeline (OpenCV resize, JPEG round trip, 8-bit map, "
                   "251 px median) on the whole raster as one canvas, for numbers comparable with the papers'.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._common_params()
        self.addParameter(QgsProcessingParameterString(self.QUERY, _tr("Text query")))
        self._advanced(QgsProcessingParameterNumber(self.BLOCK_SIZE, _tr("Block size (px; >= the largest window)"),
                                                    QgsProcessingParameterNumber.Integer, localize.DEFAULT_BLOCK,
                                                    minValue=64))
        self._advanced(QgsProcessingParameterEnum(self.SELO_MODE, _tr("SeLo mode"), list(SELO_MODES),
                                                  defaultValue=0))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, _tr("Heatmap")))

    def work(self, parameters, context, feedback):
        source, layer, settings, common, fb, min_valid = self._setup(parameters, context, feedback)
        query = self.parameterAsString(parameters, self.QUERY, context)
        params = localize.LocalizeParams([query], block_px=self.parameterAsInt(parameters, self.BLOCK_SIZE, context),
                                         min_valid=min_valid,
                                         selo_mode=SELO_MODES[self.parameterAsEnum(parameters, self.SELO_MODE,
                                                                                   context)])
        dest = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        with make_client(settings) as client:
            res = localize.LocalizeProcessor(source, params, common).compute(client, fb)
            res.write([Path(dest)], fb)
        _Style.on_load(context, dest, lambda layer: set_provenance(style_heatmap(layer, settings.heatmap_opacity),
                                                                   res.provenance[0]))
        self._report(feedback, res.warnings, f"heatmap of {source.width} x {source.height} px")
        return {self.OUTPUT: dest}
