"""Build and search an index (issue 14) from the toolbox, the modeler and ``qgis_process``: the same processors
as the dock's Index tab (:mod:`tools.index`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from qgis.core import (QgsCoordinateReferenceSystem, QgsProcessing, QgsProcessingException,
                       QgsProcessingOutputMultipleLayers, QgsProcessingOutputNumber, QgsProcessingOutputString,
                       QgsProcessingParameterBoolean, QgsProcessingParameterExtent, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterFolderDestination,
                       QgsProcessingParameterMultipleLayers, QgsProcessingParameterNumber,
                       QgsProcessingParameterString, QgsProcessingUtils, QgsWkbTypes)

from ..connection import make_client
from ..layers import set_provenance, style_ranking, style_surface
from ..outputs import atomic_write_bytes, slug
from ..tools import index
from .algorithms import _Base, _fields, _Style, _tr, _write_rows


def _texts(raw: str) -> List[str]:
    return [t.strip() for t in (raw or "").split(";") if t.strip()]


class _IndexBase(_Base):
    INDEX = "INDEX"

    def group(self) -> str:
        return _tr("Index")

    def groupId(self) -> str:  # noqa: N802
        return "index"


class IndexBuildAlgorithm(_IndexBase):
    RASTERS, WINDOW_SIZES, ROWS, NAME = "RASTERS", "WINDOW_SIZES", "ROWS", "NAME"

    def name(self) -> str:
        return "indexbuild"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Build or extend an index")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Adds raster files (GeoTIFF, COG, VRT) to an index folder on the backend: windows of each size "
                   "embedded once, nodata windows left out. Unchanged rasters are skipped, changed ones replaced; "
                   "a cancelled build keeps what was stored and running it again resumes. Web and memory layers "
                   "cannot be indexed.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers(self.RASTERS, _tr("Raster files"),
                                                               QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterString(self.INDEX, _tr("Index folder (created when missing)")))
        self.addParameter(QgsProcessingParameterString(
            self.WINDOW_SIZES, _tr("Window sizes in pixels, comma separated (empty: the index's; new: 256,512,768)"),
            "", optional=True))
        self._backend_params()
        self.addOutput(QgsProcessingOutputString(self.NAME, _tr("The backend's name for the index")))
        self.addOutput(QgsProcessingOutputNumber(self.ROWS, _tr("Windows in the index")))

    def work(self, parameters, context, feedback):
        settings, common, fb = self._backend(parameters, context, feedback)
        layers = self.parameterAsLayerList(parameters, self.RASTERS, context)
        raw = self.parameterAsString(parameters, self.WINDOW_SIZES, context)
        try:
            sizes = [int(s) for s in raw.replace(";", ",").split(",") if s.strip()]
        except ValueError:
            raise QgsProcessingException(_tr(f"window sizes must be whole numbers, not {raw!r}")) from None
        params = index.IndexBuildParams(self.parameterAsString(parameters, self.INDEX, context),
                                        [index.raster_file(lyr) for lyr in layers], sizes or None)
        with make_client(settings) as client:
            out = index.IndexBuildProcessor(params, common).run(client, fb)
        self._report(feedback, out.warnings, out.summary)
        return {self.NAME: out.result.get("name"), self.ROWS: out.result.get("rows"), self.INDEX: params.index}


class IndexSearchAlgorithm(_IndexBase):
    TEXT, NEGATIVE_TEXT, EXAMPLES, NEGATIVES = "TEXT", "NEGATIVE_TEXT", "EXAMPLES", "NEGATIVES"
    TOP_K, EXTENT, SURFACES, SURFACE_FILES = "TOP_K", "EXTENT", "SURFACES", "SURFACE_FILES"

    def name(self) -> str:
        return "indexsearch"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Search an index")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Searches an index by texts (';' separates them) and/or example features (their windows' "
                   "mean), minus negative texts or features: the top-k windows as ranked footprints, and optionally "
                   "each raster's score surface (GeoTIFF, NaN where nothing was indexed). The pixels are not read "
                   "again.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterString(self.INDEX, _tr("Index (its name on the backend, or folder)")))
        self.addParameter(QgsProcessingParameterString(self.TEXT, _tr("Text query"), "", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.EXAMPLES, _tr("Example features (positives)"), [QgsProcessing.TypeVectorAnyGeometry], optional=True))
        self.addParameter(QgsProcessingParameterString(self.NEGATIVE_TEXT, _tr("Negative text"), "", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.NEGATIVES, _tr("Negative example features"), [QgsProcessing.TypeVectorAnyGeometry], optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.TOP_K, _tr("Top-k"), QgsProcessingParameterNumber.Integer,
                                                       20, minValue=1))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, _tr("Only windows meeting this extent"),
                                                       optional=True))
        self._backend_params()
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, _tr("Ranked footprints"),
                                                            QgsProcessing.TypeVectorPolygon))
        self.addParameter(QgsProcessingParameterBoolean(self.SURFACES, _tr("Score surfaces too"), False))
        self.addParameter(QgsProcessingParameterFolderDestination(
            self.SURFACE_FILES, _tr("Folder for the score surfaces"), optional=True, createByDefault=False))
        self.addOutput(QgsProcessingOutputMultipleLayers("SURFACE_LAYERS", _tr("Score surfaces")))

    def _examples(self, parameters, name, context):
        source = self.parameterAsSource(parameters, name, context)
        if source is None:
            return None, None
        return index.geojson_of(source.getFeatures(), source.sourceCrs(), source.sourceName() or name)

    def work(self, parameters, context, feedback):
        settings, common, fb = self._backend(parameters, context, feedback)
        examples, crs = self._examples(parameters, self.EXAMPLES, context)
        negatives, neg_crs = self._examples(parameters, self.NEGATIVES, context)
        if examples and negatives and crs != neg_crs:
            raise QgsProcessingException(_tr("the example and negative features must share one CRS"))
        extent, extent_crs = None, index.WGS84
        if parameters.get(self.EXTENT):
            rect = self.parameterAsExtent(parameters, self.EXTENT, context)
            ecrs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
            extent = [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]
            extent_crs = ecrs.authid() or ecrs.toWkt() if ecrs.isValid() else index.WGS84
        folder = self.parameterAsString(parameters, self.SURFACE_FILES, context)
        want_surface = self.parameterAsBool(parameters, self.SURFACES, context) or bool(folder)
        params = index.IndexSearchParams(
            self.parameterAsString(parameters, self.INDEX, context),
            _texts(self.parameterAsString(parameters, self.TEXT, context)),
            _texts(self.parameterAsString(parameters, self.NEGATIVE_TEXT, context)), examples, negatives,
            crs or neg_crs or index.WGS84, self.parameterAsInt(parameters, self.TOP_K, context), extent, extent_crs,
            surface=want_surface)
        with make_client(settings) as client:
            res = index.IndexSearchProcessor(params, common).compute(client, fb)
        fields = _fields(index.FIELDS)
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.Polygon,
                                          QgsCoordinateReferenceSystem(res.crs))
        _write_rows(sink, fields, index.FIELDS, res.rows)
        _Style.on_load(context, dest, lambda layer: set_provenance(style_ranking(layer), res.provenance))
        surfaces: List[str] = []
        if res.surfaces:
            out = Path(folder) if folder else Path(QgsProcessingUtils.tempFolder())
            out.mkdir(parents=True, exist_ok=True)
            for i, (raster, data) in enumerate(res.surfaces):
                path = out / f"surface_{i}_{slug(Path(raster).stem, 32)}.tif"
                atomic_write_bytes(path, data)
                surfaces.append(str(path))
                context.addLayerToLoadOnCompletion(str(path), _details(context, f"score: {Path(raster).name}"))
                _Style.on_load(context, str(path), lambda layer: style_surface(layer))
        self._report(feedback, [str(w) for w in res.result.get("warnings") or ()],
                     f"{len(res.rows)} windows of {res.result.get('total_rows', '?')}"
                     + (f"; {len(surfaces)} score surface(s)" if surfaces else ""))
        result: Dict[str, Any] = {self.OUTPUT: dest, "SURFACE_LAYERS": surfaces}
        if folder:
            result[self.SURFACE_FILES] = folder
        return result


def _details(context: Any, name: str):
    from qgis.core import QgsProcessingContext
    return QgsProcessingContext.LayerDetails(name, context.project(), name)
