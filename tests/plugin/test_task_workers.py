"""A task's work runs on a thread that lives on: on QGIS 3.22 a thread that used PROJ (here: a GeoPackage written
with QGIS's writer, as every tool does) and then ended inside a task's thread left QGIS's CRS caches broken, so
that an ellipsoidal area measured later on the main thread (the dock's class table) was NaN."""
from __future__ import annotations

import math
from pathlib import Path

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransformContext, QgsDistanceArea, QgsGeometry,
                       QgsPointXY, QgsUnitTypes)

from qgis_plugin.outputs import write_polygons_gpkg
from qgis_plugin.settings import Settings
from qgis_plugin.tasks import WORKERS, MapQueryTask, run_and_wait
from qgis_plugin.tools.base import Outcome


class NoClient:
    def close(self):
        pass


class WritesAGeoPackage:
    title = "write"

    def __init__(self, path: Path):
        self.path = path

    def run(self, client, fb):
        ring = [(500000.0, 5000000.0), (500100.0, 5000000.0), (500100.0, 5000100.0), (500000.0, 5000000.0)]
        write_polygons_gpkg(self.path, "t", [("a", "int")], [(ring, {"a": 1})],
                            QgsCoordinateReferenceSystem("EPSG:32633"))
        return Outcome("write")


def ellipsoidal_km2(epsg: str, ellipsoid: str, x0: float, y0: float, side: float) -> float:
    da = QgsDistanceArea()
    da.setSourceCrs(QgsCoordinateReferenceSystem(epsg), QgsCoordinateTransformContext())
    da.setEllipsoid(ellipsoid)
    square = [QgsPointXY(x, y) for x, y in ((x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side))]
    return da.convertAreaMeasurement(da.measureArea(QgsGeometry.fromPolygonXY([square])),
                                     QgsUnitTypes.AreaSquareKilometers)


def test_crs_work_in_tasks_leaves_main_thread_measurements_intact(qgis_app, tmp_path):
    for i in range(3):  # a GeoPackage written in three tasks, one after the other
        task = run_and_wait(MapQueryTask(WritesAGeoPackage(tmp_path / f"t{i}.gpkg"), Settings(),
                                         client_factory=NoClient))
        assert task.error is None and (tmp_path / f"t{i}.gpkg").is_file()
    assert len(WORKERS.threads) >= 1 and all(t.is_alive() for t in WORKERS.threads)
    # then, on the main thread, a CRS and an ellipsoid no test used before: a 10 km square of Gauss-Krueger
    # zone 3 (Bessel) near its central meridian (scale factor 1) measures 100 km2 on the ellipsoid
    area = ellipsoidal_km2("EPSG:31467", "EPSG:7004", 3500000.0, 5500000.0, 10000.0)
    assert math.isfinite(area) and abs(area - 100.0) < 0.5
