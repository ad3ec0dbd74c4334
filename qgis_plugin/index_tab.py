"""The dock's *Index* tab: build an index from chosen raster layers, list the backend's indexes, search one by
text and/or the selected features of a vector layer (minus negatives) -> ranked footprints and score surfaces.

Only widgets: the work is :mod:`tools.index` in a :class:`tasks.MapQueryTask` started through the dock (its
progress bar and Cancel button); layers are added by the dock's ``task_done`` on the main thread.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional

from qgis.core import (Qgis, QgsApplication, QgsCoordinateReferenceSystem, QgsCoordinateTransform,
                       QgsMapLayerProxyModel, QgsProject, QgsRasterLayer, QgsRectangle)
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLineEdit,
                                 QListWidget, QListWidgetItem, QPushButton, QSpinBox, QTableWidget, QTableWidgetItem,
                                 QVBoxLayout, QWidget)

from .errors import PluginError
from .tasks import MapQueryTask
from .tools.base import Outcome
from .tools.index import (IndexBuildParams, IndexBuildProcessor, IndexSearchParams, IndexSearchProcessor,
                          features_geojson, index_list, raster_file)


class IndexListProcessor:
    """``index_info`` without an index: the indexes open on the backend (a short task of its own)."""

    title = "index list"

    def run(self, client: Any, fb: Any) -> Outcome:
        return Outcome(self.title, rows=index_list(client))


class IndexTab(QWidget):
    """Build / list / search; ``dock`` gives the settings, the common outputs and the task plumbing."""

    def __init__(self, dock: Any):
        super().__init__()
        self.dock = dock
        self.indexes: List[Dict[str, Any]] = []
        self.hit_rows: List[Dict[str, Any]] = []
        self.hit_crs = "EPSG:4326"
        self._list_tasks: List[MapQueryTask] = []
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self._build_box())
        lay.addWidget(self._search_box())
        project = QgsProject.instance()
        project.layersAdded.connect(self.refresh_rasters)
        project.layersRemoved.connect(self.refresh_rasters)
        self.refresh_rasters()

    # -- widgets ------------------------------------------------------------------------------------
    def _build_box(self) -> QGroupBox:
        box = QGroupBox("Build an index")
        form = QFormLayout(box)
        self.raster_list = QListWidget()
        self.raster_list.setMaximumHeight(90)
        self.raster_list.setToolTip("Raster files to index (web and memory layers cannot be indexed)")
        form.addRow("Rasters", self.raster_list)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("a folder (created when missing)")
        browse = QPushButton("…")
        browse.clicked.connect(self.choose_folder)
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(browse)
        form.addRow("Folder", row)
        self.sizes_edit = QLineEdit()
        self.sizes_edit.setPlaceholderText("window sizes, px (default 256, 512, 768)")
        form.addRow("Windows", self.sizes_edit)
        build = QPushButton("Build / add")
        build.setToolTip("Index the checked rasters; unchanged ones are skipped, a cancelled build resumes")
        build.clicked.connect(self.build)
        form.addRow(build)
        return box

    def _search_box(self) -> QGroupBox:
        box = QGroupBox("Search an index")
        form = QFormLayout(box)
        self.index_combo = QComboBox()
        self.index_combo.setEditable(True)
        self.index_combo.setToolTip("The backend's name for an index, or its folder")
        refresh = QPushButton("List")
        refresh.setToolTip("The indexes open on the backend")
        refresh.clicked.connect(lambda: self.list_indexes())
        row = QHBoxLayout()
        row.addWidget(self.index_combo, 1)
        row.addWidget(refresh)
        form.addRow("Index", row)
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("e.g. a marina (';' separates texts)")
        self.text_edit.returnPressed.connect(self.search)
        form.addRow("Text", self.text_edit)
        self.examples_combo = self._vector_combo()
        form.addRow("Examples", self.examples_combo)
        self.negative_edit = QLineEdit()
        self.negative_edit.setPlaceholderText("not like this (optional)")
        form.addRow("Not text", self.negative_edit)
        self.negatives_combo = self._vector_combo()
        form.addRow("Not like", self.negatives_combo)
        self.topk = QSpinBox()
        self.topk.setRange(1, 1000)
        self.topk.setValue(20)
        form.addRow("Top-k", self.topk)
        self.view_only = QCheckBox("Only the map view")
        self.surface = QCheckBox("Score surfaces")
        self.surface.setChecked(True)
        row = QHBoxLayout()
        row.addWidget(self.view_only)
        row.addWidget(self.surface)
        form.addRow(row)
        btn = QPushButton("Search the index")
        btn.clicked.connect(self.search)
        form.addRow(btn)
        self.hits = QTableWidget(0, 3)
        self.hits.setHorizontalHeaderLabels(["rank", "score", "raster"])
        self.hits.setEditTriggers(QTableWidget.NoEditTriggers)
        self.hits.setSelectionBehavior(QTableWidget.SelectRows)
        self.hits.setMaximumHeight(160)
        self.hits.cellClicked.connect(self.zoom_to_hit)
        form.addRow(self.hits)
        return box

    @staticmethod
    def _vector_combo() -> QgsMapLayerComboBox:
        combo = QgsMapLayerComboBox()
        combo.setFilters(QgsMapLayerProxyModel.VectorLayer)
        combo.setAllowEmptyLayer(True)
        combo.setLayer(None)
        combo.setToolTip("The selected features of this layer (all of them when none is selected)")
        return combo

    def choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Index folder", self.folder_edit.text())
        if path:
            self.folder_edit.setText(path)

    def refresh_rasters(self, *_args) -> None:
        """The project's raster layers (not MapQuery's own outputs), checked ones kept checked."""
        from .layers import is_output
        checked = set(self.checked_layer_ids())
        self.raster_list.clear()
        for layer in QgsProject.instance().mapLayers().values():
            if isinstance(layer, QgsRasterLayer) and not is_output(layer):
                item = QListWidgetItem(layer.name())
                item.setData(Qt.UserRole, layer.id())
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if layer.id() in checked else Qt.Unchecked)
                self.raster_list.addItem(item)

    def checked_layer_ids(self) -> List[str]:
        items = [self.raster_list.item(i) for i in range(self.raster_list.count())]
        return [it.data(Qt.UserRole) for it in items if it.checkState() == Qt.Checked]

    def set_checked(self, layer_ids: List[str]) -> None:
        for i in range(self.raster_list.count()):
            it = self.raster_list.item(i)
            it.setCheckState(Qt.Checked if it.data(Qt.UserRole) in layer_ids else Qt.Unchecked)

    # -- actions ------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        if self.dock.active is not None and not self.dock.active.done:
            self.dock.message("A MapQuery request is still running; cancel it or wait.", Qgis.Warning)
            return True
        return False

    def make_build(self) -> IndexBuildProcessor:
        project = QgsProject.instance()
        layers = [project.mapLayer(i) for i in self.checked_layer_ids()]
        raw = self.sizes_edit.text().replace(";", ",")
        try:
            sizes = [int(s) for s in raw.split(",") if s.strip()]
        except ValueError:
            raise PluginError(f"window sizes must be whole numbers, not '{self.sizes_edit.text()}'") from None
        params = IndexBuildParams(self.folder_edit.text(), [raster_file(lyr) for lyr in layers if lyr is not None],
                                  sizes or None)
        return IndexBuildProcessor(params, self.dock._common())

    def _examples(self, combo: QgsMapLayerComboBox):
        layer = combo.currentLayer()
        if layer is None:
            return None, None
        return features_geojson(layer, selected_only=layer.selectedFeatureCount() > 0)

    def make_search(self) -> IndexSearchProcessor:
        examples, crs = self._examples(self.examples_combo)
        negatives, neg_crs = self._examples(self.negatives_combo)
        if examples and negatives and crs != neg_crs:
            raise PluginError("the example and negative layers must share one CRS")
        extent, extent_crs = None, "EPSG:4326"
        if self.view_only.isChecked():
            canvas = self.dock._canvas()
            r, dest = canvas.extent(), canvas.mapSettings().destinationCrs()
            extent, extent_crs = [r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum()], dest.authid() or dest.toWkt()
        params = IndexSearchParams(self.index_combo.currentText(), self.text_edit.text().split(";"),
                                   self.negative_edit.text().split(";"), examples, negatives,
                                   crs or neg_crs or "EPSG:4326", self.topk.value(), extent, extent_crs,
                                   self.surface.isChecked())
        return IndexSearchProcessor(params, self.dock._common())

    def _start(self, make) -> Optional[MapQueryTask]:
        if self._busy():
            return None
        try:
            processor = make()
        except PluginError as exc:
            self.dock.message(str(exc), Qgis.Warning)
            return None
        task = MapQueryTask(processor, dataclasses.replace(self.dock.manager.settings), self.task_done)
        self.dock.start_task(task)
        return task

    def build(self) -> Optional[MapQueryTask]:
        return self._start(self.make_build)

    def search(self) -> Optional[MapQueryTask]:
        return self._start(self.make_search)

    def task_done(self, task: MapQueryTask) -> None:
        self.dock.task_done(task)
        if isinstance(task.processor, IndexSearchProcessor) and task.outcome is not None:
            self.show_hits(task.outcome.rows, str(task.outcome.result.get("footprint_crs") or "EPSG:4326"))
        if isinstance(task.processor, IndexBuildProcessor) and task.outcome is not None:
            name = str(task.outcome.result.get("name") or "")
            if name:
                self.index_combo.setEditText(name)
            self.list_indexes()

    def show_hits(self, rows: List[Dict[str, Any]], crs: str) -> None:
        """The ranked windows of the last search (click one to zoom to it)."""
        self.hit_rows, self.hit_crs = list(rows), crs
        self.hits.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for j, text in enumerate((str(r["rank"]), f"{r['score']:.3f}", Path(str(r["raster"])).name)):
                self.hits.setItem(i, j, QTableWidgetItem(text))

    def zoom_to_hit(self, row: int, _col: int = 0) -> None:
        r = self.hit_rows[row]
        rect = QgsRectangle(r["xmin"], r["ymin"], r["xmax"], r["ymax"])
        canvas = self.dock._canvas()
        dest = canvas.mapSettings().destinationCrs()
        src = QgsCoordinateReferenceSystem(self.hit_crs)
        if src != dest:
            rect = QgsCoordinateTransform(src, dest, QgsProject.instance()).transformBoundingBox(rect)
        canvas.setExtent(rect.buffered(max(rect.width(), rect.height()) * 0.25))
        canvas.refresh()

    def list_indexes(self) -> MapQueryTask:
        """Ask the backend for its indexes in a task of its own (never blocks the dock's active task)."""
        task = MapQueryTask(IndexListProcessor(), dataclasses.replace(self.dock.manager.settings), self._listed)
        self._list_tasks.append(task)
        QgsApplication.taskManager().addTask(task)
        return task

    def _listed(self, task: MapQueryTask) -> None:
        if task in self._list_tasks:
            self._list_tasks.remove(task)
        if task.error is not None:
            self.dock.message(task.message(), Qgis.Warning)
            return
        self.indexes = task.outcome.rows
        current = self.index_combo.currentText()
        self.index_combo.clear()
        for ix in self.indexes:
            self.index_combo.addItem(f"{ix['name']}", ix["name"])
            self.index_combo.setItemData(self.index_combo.count() - 1, f"{ix['path']} ({ix['rows']} windows)",
                                         Qt.ToolTipRole)
        self.index_combo.setEditText(current or (self.indexes[0]["name"] if self.indexes else ""))
