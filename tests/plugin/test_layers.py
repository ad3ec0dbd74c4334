"""Result layers: right extent, CRS and style, grouped under the query, never overwriting anything."""
from __future__ import annotations

import os

import numpy as np
import pytest
from qgis.core import (QgsCoordinateReferenceSystem, QgsLayerTreeGroup, QgsPointXY, QgsRectangle)

from qgis_plugin import capture as C
from qgis_plugin.layers import GROUP_PREFIX, add_group, classification_layer, heatmap_layer, ranking_layer
from qgis_plugin.outputs import (atomic_write_bytes, output_dir, slug, unique_path, write_geotiff,
                                 write_polygons_gpkg)
from qgis_plugin.tools.base import grid_windows

CRSS = ["EPSG:32618", "EPSG:3857", "EPSG:4326"]


def fake_capture(authid: str, w: int = 120, h: int = 80) -> C.Capture:
    crs = QgsCoordinateReferenceSystem(authid)
    res, x0, y1 = {"EPSG:32618": (30.0, 300000.0, 4000000.0), "EPSG:3857": (150.0, -8.8e6, 2.9e6),
                   "EPSG:4326": (0.01, -75.3, 40.2)}[authid]
    authid_, wkt = C.crs_strings(crs)
    return C.Capture(np.zeros((h, w, 3), np.uint8), (res, 0.0, x0, 0.0, -res, y1), wkt, authid_)


@pytest.mark.parametrize("authid", CRSS)
def test_heatmap_layer_extent_crs_values_and_style(qgis_app, tmp_path, authid):
    cap = fake_capture(authid)
    heat = np.tile(np.linspace(0, 1, cap.width, dtype=np.float32), (cap.height, 1))
    heat[5, 7] = 0.777
    path = write_geotiff(tmp_path / "h.tif", heat, cap.transform, cap.crs_wkt, ["heatmap: x"])
    layer = heatmap_layer(str(path), "heatmap: x", opacity=0.5)
    assert layer.isValid() and layer.crs().authid() == authid
    xmin, ymin, xmax, ymax = cap.extent()
    ext = layer.extent()
    for got, want in ((ext.xMinimum(), xmin), (ext.yMinimum(), ymin), (ext.xMaximum(), xmax), (ext.yMaximum(), ymax)):
        assert got == pytest.approx(want, abs=1e-9 * max(1, abs(want)))
    # the value of pixel (col 7, row 5) sits at the map point of that pixel's centre
    x, y = cap.pixel_to_map(7.5, 5.5)
    value, ok = layer.dataProvider().sample(QgsPointXY(x, y), 1)
    assert ok and value == pytest.approx(0.777, abs=1e-6)
    r = layer.renderer()
    assert r.type() == "singlebandpseudocolor"
    assert (r.classificationMin(), r.classificationMax()) == (0.0, 1.0)
    assert r.opacity() == pytest.approx(0.5)
    items = r.shader().rasterShaderFunction().colorRampItemList()
    assert len(items) >= 5 and items[0].value == pytest.approx(0) and items[-1].value == pytest.approx(1)
    transparent = r.rasterTransparency().transparentSingleValuePixelList()
    assert transparent and transparent[0].max == pytest.approx(0.2)


def test_classification_grid_geometry_style_and_labels(qgis_app, tmp_path):
    cap = fake_capture("EPSG:32618", 100, 70)
    cells, _ = grid_windows(cap.height, cap.width, 32)
    labels = ["forest", "river", "forest", "city"]
    rows = [(cap.box_to_map(*map(int, box)), {"tile": i, "label": labels[i % 4], "score": 0.5 + i / 100,
                                             "top": "x"}) for i, box in enumerate(cells)]
    path = write_polygons_gpkg(tmp_path / "c.gpkg", "classification",
                               [("tile", "int"), ("label", "string"), ("score", "double"), ("top", "string")],
                               rows, cap.qgs_crs())
    layer = classification_layer(str(path), "classification", ["forest", "river", "city", "unused"])
    assert layer.isValid() and layer.featureCount() == len(cells) == 12
    assert layer.crs().authid() == "EPSG:32618"
    assert layer.renderer().type() == "categorizedSymbol"
    assert layer.renderer().classAttribute() == "label"
    assert sorted(c.value() for c in layer.renderer().categories()) == ["city", "forest", "river"]
    assert layer.labelsEnabled() and "score" in layer.labeling().settings().fieldName
    # labels only where a 32 px tile of 30 m (960 m) is at least 64 screen pixels wide (96 dpi): scale 1:~15118
    pal = layer.labeling().settings()
    assert pal.scaleVisibility and pal.minimumScale == pytest.approx(960 / (64 * 0.0254 / 96))
    assert layer.customProperty("mapquery_rs/output") == "classification"
    feat = next(f for f in layer.getFeatures() if f["tile"] == 5)
    x0, y0, x1, y1 = (int(v) for v in cells[5])
    bbox = feat.geometry().boundingBox()
    (ax, ay), (bx, by) = cap.pixel_to_map(x0, y1), cap.pixel_to_map(x1, y0)
    assert (bbox.xMinimum(), bbox.yMinimum(), bbox.xMaximum(), bbox.yMaximum()) == pytest.approx((ax, ay, bx, by))
    # the layer covers the capture exactly (edge cells are clipped)
    assert layer.extent().toRectF() == QgsRectangle(*cap.extent()).toRectF()


def test_ranking_layer(qgis_app, tmp_path):
    cap = fake_capture("EPSG:4326")
    rows = [(cap.box_to_map(0, 0, 10, 10), {"rank": 1, "score": 0.9, "tile": 0, "query": "q"})]
    path = write_polygons_gpkg(tmp_path / "r.gpkg", "search", [("rank", "int"), ("score", "double"),
                                                               ("tile", "int"), ("query", "string")], rows,
                               cap.qgs_crs())
    layer = ranking_layer(str(path), "top 1")
    assert layer.isValid() and layer.crs().authid() == "EPSG:4326" and layer.labelsEnabled()
    # a tile of 0.1 degrees (~11.1 km at the equator) is 64 px wide from 1:~42 million in
    assert layer.labeling().settings().minimumScale == pytest.approx(0.1 * 111319.49 / (64 * 0.0254 / 96), rel=1e-3)
    assert [f["rank"] for f in layer.getFeatures()] == [1]


def test_groups_are_named_after_the_query_and_never_merge(qgis_app, project, tmp_path):
    cap = fake_capture("EPSG:3857")
    paths = [write_geotiff(tmp_path / f"h{i}.tif", np.zeros((cap.height, cap.width), np.float32), cap.transform,
                           cap.crs_wkt) for i in range(2)]
    g1 = add_group("localize: river", [heatmap_layer(str(paths[0]), "a")], project)
    g2 = add_group("localize: river", [heatmap_layer(str(paths[1]), "b")], project)
    root = project.layerTreeRoot()
    names = [c.name() for c in root.children() if isinstance(c, QgsLayerTreeGroup)]
    assert names == [GROUP_PREFIX + "localize: river (2)", GROUP_PREFIX + "localize: river"]
    assert [lyr.name() for lyr in g1.findLayers()] == ["a"] and [lyr.name() for lyr in g2.findLayers()] == ["b"]
    assert len(project.mapLayers()) == 2


def test_output_names_never_overwrite(qgis_app, tmp_path):
    existing = tmp_path / "x.tif"
    existing.write_bytes(b"user data")
    seen = set()
    for _ in range(5):
        p = unique_path(tmp_path, "heatmap_river", ".tif", taken=[str(existing)])
        assert not p.exists() and p not in seen
        seen.add(p)
        p.write_bytes(b"")
    # a name used by a project layer (even with an OGR '|layername=' suffix) is never handed out
    p1 = unique_path(tmp_path, "s", ".gpkg")
    p2 = unique_path(tmp_path, "s", ".gpkg", taken=[f"{p1}|layername=search"])
    assert p1 != p2
    assert existing.read_bytes() == b"user data"
    assert slug("A river / near: the bridge!") == "a_river_near_the_bridge"


def test_atomic_writes_leave_no_temporary_files(qgis_app, tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"123")
    write_geotiff(tmp_path / "b.tif", np.ones((4, 4), np.float32), (1, 0, 0, 0, -1, 4), "")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.tif"]


def test_output_dir_is_project_relative(tmp_path):
    assert output_dir("", str(tmp_path)) == tmp_path / "mapquery_outputs"
    assert output_dir("results", str(tmp_path)) == tmp_path / "results"
    assert output_dir(str(tmp_path / "abs"), "/elsewhere") == tmp_path / "abs"
    assert (tmp_path / "results").is_dir()
