"""Map layers from output files: styled, grouped under the query, added on the main thread only."""
from __future__ import annotations

import random
from typing import Any, Dict, Iterable, List, Optional, Sequence

from qgis.core import (QgsCategorizedSymbolRenderer, QgsColorRampShader, QgsFillSymbol, QgsGradientColorRamp,
                       QgsGradientStop, QgsLayerTreeGroup, QgsPalLayerSettings, QgsProject, QgsRasterLayer,
                       QgsRasterShader, QgsRasterTransparency, QgsRendererCategory,
                       QgsSingleBandPseudoColorRenderer, QgsTextBufferSettings, QgsTextFormat,
                       QgsVectorLayer, QgsVectorLayerSimpleLabeling)
from qgis.PyQt.QtGui import QColor

from .errors import PluginError

GROUP_PREFIX = "MapQuery: "
OUTPUT_PROPERTY = "mapquery_rs/output"  # custom layer property marking MapQuery's own results (value: the kind)
# "magma"-like ramp: dark purple (low) to pale yellow (high)
RAMP_STOPS = [(0.0, "#000004"), (0.25, "#51127c"), (0.5, "#b73779"), (0.75, "#fc8961"), (1.0, "#fcfdbf")]


def mark_output(layer, kind: str):
    """Mark a layer as one of MapQuery's results, so that captures never draw it (saved with the project)."""
    layer.setCustomProperty(OUTPUT_PROPERTY, kind)
    return layer


def set_provenance(layer, provenance: Dict[str, Any]):
    """Where a result comes from (query, model, adapter, resolution, tiling, date) as the layer's metadata:
    its abstract and the keywords under 'MapQuery'."""
    if provenance:
        md = layer.metadata()
        md.setTitle(layer.name())
        md.setAbstract("MapQuery RS result. " + "; ".join(f"{k}: {v}" for k, v in provenance.items()))
        md.addKeywords("MapQuery", [f"{k}={v}" for k, v in provenance.items()])
        layer.setMetadata(md)
    return layer


def is_output(layer) -> bool:
    return bool(layer.customProperty(OUTPUT_PROPERTY, ""))


def heat_ramp() -> QgsGradientColorRamp:
    first, last = RAMP_STOPS[0][1], RAMP_STOPS[-1][1]
    stops = [QgsGradientStop(v, QColor(c)) for v, c in RAMP_STOPS[1:-1]]
    return QgsGradientColorRamp(QColor(first), QColor(last), False, stops)


def heatmap_layer(path: str, name: str, opacity: float = 0.6, transparent_below: float = 0.2,
                  band: int = 1) -> QgsRasterLayer:
    """A heatmap GeoTIFF (values 0-1, NaN = nodata: transparent) with a pseudocolor ramp, layer opacity and low
    values transparent."""
    layer = QgsRasterLayer(path, name, "gdal")
    if not layer.isValid():
        raise PluginError(f"QGIS cannot open the heatmap {path}")
    return style_heatmap(layer, opacity, transparent_below, band)


def style_heatmap(layer: QgsRasterLayer, opacity: float = 0.6, transparent_below: float = 0.2,
                  band: int = 1) -> QgsRasterLayer:
    """Style a heatmap layer (the dock's and Processing's outputs alike)."""
    layer.dataProvider().setUseSourceNoDataValue(band, True)  # the GeoTIFF's NaN nodata: drawn transparent
    shader_fn = QgsColorRampShader(0.0, 1.0, heat_ramp(), QgsColorRampShader.Interpolated)
    shader_fn.classifyColorRamp(len(RAMP_STOPS) * 2 + 1, band, layer.extent(), layer.dataProvider())
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(shader_fn)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), band, shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    renderer.setOpacity(opacity)
    transparency = QgsRasterTransparency()
    pixel = QgsRasterTransparency.TransparentSingleValuePixel()
    pixel.min, pixel.max, pixel.percentTransparent = -1e30, transparent_below, 100.0
    transparency.setTransparentSingleValuePixelList([pixel])
    renderer.setRasterTransparency(transparency)
    layer.setRenderer(renderer)
    return mark_output(layer, "heatmap")


def surface_layer(path: str, name: str, opacity: float = 0.6) -> QgsRasterLayer:
    """An index's score surface (raw cosine scores, NaN = not indexed): styled like a heatmap over its own range."""
    layer = QgsRasterLayer(path, name, "gdal")
    if not layer.isValid():
        raise PluginError(f"QGIS cannot open the score surface {path}")
    return style_surface(layer, opacity)


def style_surface(layer: QgsRasterLayer, opacity: float = 0.6) -> QgsRasterLayer:
    """Style a score surface: the heatmap ramp stretched over its valid scores, NaN transparent."""
    from qgis.core import QgsRasterBandStats
    stats = layer.dataProvider().bandStatistics(1, QgsRasterBandStats.Min | QgsRasterBandStats.Max)
    lo, hi = float(stats.minimumValue), float(stats.maximumValue)
    style_heatmap(layer, opacity, transparent_below=-1e30)
    renderer = layer.renderer()
    if hi > lo:
        shader_fn = QgsColorRampShader(lo, hi, heat_ramp(), QgsColorRampShader.Interpolated)
        shader_fn.classifyColorRamp(len(RAMP_STOPS) * 2 + 1, 1, layer.extent(), layer.dataProvider())
        renderer.shader().setRasterShaderFunction(shader_fn)
        renderer.setClassificationMin(lo)
        renderer.setClassificationMax(hi)
    renderer.setRasterTransparency(QgsRasterTransparency())
    return mark_output(layer, "surface")


LABEL_MIN_PX = 64  # labels show once a tile is at least this many screen pixels across
SCREEN_M_PER_PX = 0.0254 / 96  # a 96 dpi screen pixel, in metres


def label_min_scale(layer) -> float:
    """The most zoomed-out scale (denominator) at which a tile of ``layer`` spans LABEL_MIN_PX screen pixels: labels
    are hidden further out, where they would pile up; 0 (always shown) for an empty layer."""
    from qgis.core import QgsUnitTypes
    feat = next(layer.getFeatures(), None)
    if feat is None or not feat.hasGeometry():
        return 0.0
    tile = feat.geometry().boundingBox().width()
    metres = tile * QgsUnitTypes.fromUnitToUnitFactor(layer.crs().mapUnits(), QgsUnitTypes.DistanceMeters)
    return metres / (LABEL_MIN_PX * SCREEN_M_PER_PX)


def _label_settings(expression: str, min_scale: float = 0.0) -> QgsVectorLayerSimpleLabeling:
    pal = QgsPalLayerSettings()
    if min_scale > 0:
        pal.scaleVisibility = True
        pal.minimumScale = min_scale  # most zoomed-out scale that shows labels
        pal.maximumScale = 0.0
    pal.isExpression = True
    pal.fieldName = expression
    fmt = QgsTextFormat()
    fmt.setSize(8)
    buf = QgsTextBufferSettings()
    buf.setEnabled(True)
    buf.setSize(0.8)
    buf.setColor(QColor("white"))
    fmt.setBuffer(buf)
    pal.setFormat(fmt)
    pal.placement = QgsPalLayerSettings.OverPoint if hasattr(QgsPalLayerSettings, "OverPoint") else pal.placement
    return QgsVectorLayerSimpleLabeling(pal)


def classification_layer(path: str, name: str, classes: Sequence[str], opacity: float = 0.55) -> QgsVectorLayer:
    """A classification grid: one category (colour) per class on ``label``, labelled 'label score'."""
    layer = QgsVectorLayer(path, name, "ogr")
    if not layer.isValid():
        raise PluginError(f"QGIS cannot open the classification grid {path}")
    return style_classification(layer, classes, opacity)


def style_classification(layer: QgsVectorLayer, classes: Sequence[str], opacity: float = 0.55) -> QgsVectorLayer:
    """Style a classification grid (the dock's and Processing's outputs alike)."""
    rng = random.Random(7)
    categories = []
    present = set(layer.uniqueValues(layer.fields().indexOf("label")))
    for cls in classes:
        if cls not in present:
            continue
        symbol = QgsFillSymbol.createSimple({"color": QColor.fromHsv(rng.randrange(360), 160, 230).name(),
                                             "outline_color": "#333333", "outline_width": "0.2"})
        categories.append(QgsRendererCategory(cls, symbol, cls))
    layer.setRenderer(QgsCategorizedSymbolRenderer("label", categories))
    layer.setOpacity(opacity)
    layer.setLabeling(_label_settings("\"label\" || ' ' || format_number(\"score\", 2)", label_min_scale(layer)))
    layer.setLabelsEnabled(True)
    return mark_output(layer, "classification")


def ranking_layer(path: str, name: str) -> QgsVectorLayer:
    """Search results: tile outlines, labelled '#rank score'."""
    layer = QgsVectorLayer(path, name, "ogr")
    if not layer.isValid():
        raise PluginError(f"QGIS cannot open the search results {path}")
    return style_ranking(layer)


def style_ranking(layer: QgsVectorLayer) -> QgsVectorLayer:
    """Style search results (the dock's and Processing's outputs alike)."""
    symbol = QgsFillSymbol.createSimple({"color": "255,255,0,40", "outline_color": "#ffd400",
                                         "outline_width": "0.8"})
    layer.renderer().setSymbol(symbol)
    layer.setLabeling(_label_settings("'#' || \"rank\" || ' ' || format_number(\"score\", 3)",
                                      label_min_scale(layer)))
    layer.setLabelsEnabled(True)
    return mark_output(layer, "ranking")


def regions_layer(path: str, name: str) -> QgsVectorLayer:
    """Heatmap regions above a threshold: red outlines."""
    layer = QgsVectorLayer(path, name, "ogr")
    if not layer.isValid():
        raise PluginError(f"QGIS cannot open the regions {path}")
    layer.renderer().setSymbol(QgsFillSymbol.createSimple({"color": "255,0,0,30", "outline_color": "#e31a1c",
                                                           "outline_width": "0.6"}))
    return mark_output(layer, "regions")


def project_sources(project: Optional[QgsProject] = None) -> List[str]:
    """The file sources of the project's layers (to never hand out one of them as an output name)."""
    project = project or QgsProject.instance()
    return [lyr.source() for lyr in project.mapLayers().values()]


def add_group(title: str, layers: Iterable, project: Optional[QgsProject] = None) -> QgsLayerTreeGroup:
    """Add ``layers`` to a new group named after the query, at the top of the layer tree."""
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    base = GROUP_PREFIX + title
    name, n = base, 2
    existing = {child.name() for child in root.children() if isinstance(child, QgsLayerTreeGroup)}
    while name in existing:
        name, n = f"{base} ({n})", n + 1
    group = root.insertGroup(0, name)
    for layer in layers:
        project.addMapLayer(layer, False)
        group.addLayer(layer)
    return group
