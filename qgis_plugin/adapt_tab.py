"""The dock's Adapt tab: labelled layer + class field + raster + method + name -> Train (progress, cancel), the
report (held-out accuracy zero-shot vs adapted, per class, and the confusion matrix), then "Classify the view with
it" and "Where is it unsure?" (the tiles to label next). The work runs in :mod:`tools.adapt` / :mod:`tools.unsure`
through :class:`tasks.MapQueryTask`; this module only builds widgets and starts tasks."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from qgis.core import Qgis, QgsMapLayerProxyModel, QgsProject, QgsVectorLayer
from qgis.gui import QgsFieldComboBox, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                                 QProgressBar, QPushButton, QSpinBox, QTableWidget, QTableWidgetItem, QWidget)

from shared_protocol.ops import ADAPT_METHODS, INSTANT_METHODS

from .capture import RasterSource
from .errors import PluginError, is_cancel
from .sources import CaptureSource
from .tasks import MapQueryTask
from .tools.adapt import AdaptParams, AdaptProcessor, example_counts, examples_of_layer
from .tools.unsure import UnsureParams, UnsureProcessor


def adapter_classes(info: Dict[str, Any], name: Optional[str]) -> List[str]:
    """The classes of a loaded adapter, as ``info`` lists them."""
    for a in info.get("adapters") or []:
        if a.get("name") == name:
            return [str(c) for c in a.get("classes") or []]
    return []


class AdaptTab(QWidget):
    def __init__(self, dock: Any):
        super().__init__()
        self.dock = dock
        self.task: Optional[MapQueryTask] = None
        self.last: Dict[str, Any] = {}  # the last adapter trained here: name, classes
        self.unsure_layer: Optional[QgsVectorLayer] = None  # the last label-next layer
        form = QFormLayout(self)
        self.labels_combo = QgsMapLayerComboBox()
        self.labels_combo.setFilters(QgsMapLayerProxyModel.PointLayer | QgsMapLayerProxyModel.PolygonLayer)
        self.labels_combo.setAllowEmptyLayer(True)
        form.addRow("Labels", self.labels_combo)
        self.field_combo = QgsFieldComboBox()
        form.addRow("Class field", self.field_combo)
        self.selected_only = QCheckBox("selected features only")
        form.addRow(self.selected_only)
        self.counts_label = QLabel("")
        self.counts_label.setWordWrap(True)
        form.addRow(self.counts_label)
        self.raster_combo = QgsMapLayerComboBox()
        self.raster_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        form.addRow("Raster", self.raster_combo)
        self.method_combo = QComboBox()
        for m in ADAPT_METHODS:
            self.method_combo.addItem(m + ("  (seconds)" if m in INSTANT_METHODS else "  (trained)"), m)
        form.addRow("Method", self.method_combo)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("my-classes")
        form.addRow("Adapter name", self.name_edit)
        self.overwrite = QCheckBox("replace an adapter of that name")
        form.addRow(self.overwrite)
        self.resolution = QDoubleSpinBox()
        self.resolution.setDecimals(6)
        self.resolution.setRange(0.0, 1e9)
        self.resolution.setSpecialValueText("raster's own")
        form.addRow("Resolution", self.resolution)
        self.chip_size = QSpinBox()
        self.chip_size.setRange(8, 4096)
        self.chip_size.setValue(224)
        form.addRow("Chip size (px)", self.chip_size)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10000)
        self.epochs.setValue(10)
        form.addRow("Epochs (trained)", self.epochs)
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train")
        self.train_btn.clicked.connect(self.train)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.train_btn)
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_btn)
        form.addRow(row)
        self.report_label = QLabel("")
        self.report_label.setWordWrap(True)
        form.addRow(self.report_label)
        self.report = QTableWidget(0, 2)
        self.report.setEditTriggers(QTableWidget.NoEditTriggers)
        self.report.setMaximumHeight(180)
        self.report.setToolTip("held-out accuracy (%) per class, then the confusion matrix of the adapted model "
                               "(rows: truth, columns: prediction)")
        form.addRow(self.report)
        self.classify_btn = QPushButton("Classify the view with it")
        self.classify_btn.clicked.connect(self.classify_view)
        form.addRow(self.classify_btn)
        row = QHBoxLayout()
        self.unsure_btn = QPushButton("Where is it unsure?")
        self.unsure_btn.clicked.connect(self.where_unsure)
        self.unsure_count = QSpinBox()
        self.unsure_count.setRange(1, 1000)
        self.unsure_count.setValue(20)
        self.unsure_count.setSuffix(" tiles")
        row.addWidget(self.unsure_btn, 1)
        row.addWidget(self.unsure_count)
        form.addRow(row)
        self.labels_combo.layerChanged.connect(self._labels_changed)
        self.field_combo.fieldChanged.connect(self.update_counts)
        self.selected_only.toggled.connect(self.update_counts)
        self._labels_changed(self.labels_combo.currentLayer())

    # -- inputs -------------------------------------------------------------------------------------
    def _labels_changed(self, layer) -> None:
        self.field_combo.setLayer(layer)
        if layer is not None and not self.field_combo.currentField():
            names = [f.name() for f in layer.fields()]
            guess = next((n for n in names if n.lower() in ("class", "label", "landcover", "type")), None)
            if guess:
                self.field_combo.setField(guess)
        self.update_counts()

    def update_counts(self, *_args) -> None:
        """Features per class, shown before training."""
        layer, fld = self.labels_combo.currentLayer(), self.field_combo.currentField()
        if layer is None or not fld:
            self.counts_label.setText("")
            return
        counts: Dict[str, int] = {}
        feats = layer.getSelectedFeatures() if self.selected_only.isChecked() else layer.getFeatures()
        for f in feats:
            v = f[fld]
            name = "" if v is None or str(v) == "NULL" else str(v).strip()
            if name:
                counts[name] = counts.get(name, 0) + 1
        text = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "no labelled features"
        self.counts_label.setText(f"features per class: {text}")

    def make_processor(self) -> AdaptProcessor:
        """The processor for the current inputs (main thread; raises PluginError with what to fix)."""
        raster = self.raster_combo.currentLayer()
        if raster is None:
            raise PluginError("choose the raster to cut chips from")
        layer = self.labels_combo.currentLayer()
        fld = self.field_combo.currentField()
        if layer is not None and not fld:
            raise PluginError(f"choose the field of {layer.name()} that holds each feature's class")
        params = AdaptParams(fld, self.method_combo.currentData(), self.name_edit.text(),
                             self.resolution.value() or None, self.chip_size.value(), self.epochs.value(),
                             overwrite=self.overwrite.isChecked())
        examples, warnings = examples_of_layer(layer, fld, raster.crs(), self.selected_only.isChecked())
        proc = AdaptProcessor(RasterSource.of(raster), examples, params, self.dock._common(), layer.name())
        counts = ", ".join(f"{k}: {n}" for k, n in example_counts(examples).items())
        self.counts_label.setText(f"features per class: {counts}" + "".join(f"; {w}" for w in warnings))
        return proc

    # -- tasks --------------------------------------------------------------------------------------
    def _start(self, processor: Any, on_done) -> None:
        if self.task is not None and not self.task.done:
            self.dock.message("An adaptation is still running; cancel it or wait.", Qgis.Warning)
            return
        task = MapQueryTask(processor, dataclasses.replace(self.dock.manager.settings), on_done)
        self.task = task
        self.dock.tasks.append(task)  # the dock cancels its tasks when it shuts down
        self.progress.setValue(0)
        self.cancel_btn.setEnabled(True)
        self.train_btn.setEnabled(False)
        task.progressChanged.connect(lambda p: self.progress.setValue(int(p)))
        from qgis.core import QgsApplication
        QgsApplication.taskManager().addTask(task)

    def train(self) -> None:
        try:
            proc = self.make_processor()
        except PluginError as exc:
            self.dock.message(str(exc), Qgis.Warning)
            return
        self._start(proc, self._trained)

    def cancel(self) -> None:
        if self.task is not None and not self.task.done:
            self.task.cancel()

    def _finish(self, task: MapQueryTask) -> bool:
        if task in self.dock.tasks:
            self.dock.tasks.remove(task)
        if self.dock._shut_down:
            return False
        self.cancel_btn.setEnabled(False)
        self.train_btn.setEnabled(True)
        if task.error is None:
            self.progress.setValue(100)
            return True
        self.progress.setValue(0)
        if is_cancel(task.error):
            self.dock.message(f"{task.processor.title}: cancelled.", Qgis.Info, 4)
        else:
            self.dock.message(task.message(), Qgis.Critical, 0)
        return False

    def _trained(self, task: MapQueryTask) -> None:
        if not self._finish(task):
            return
        out = task.outcome
        self.last = {"name": out.result.get("name"), "classes": list(out.result.get("classes") or [])}
        self.show_report(out.table, self.last["classes"])
        self.report_label.setText(out.summary + (f" ({'; '.join(out.warnings)})" if out.warnings else ""))
        self._select_adapter(self.last["name"])
        self.dock.poll()  # the adapter list comes back from the backend's info
        self.dock.message(f"{out.title}: {out.summary}", Qgis.Success)

    def show_report(self, rows: List[Dict[str, Any]], classes: List[str]) -> None:
        """Rows: classes and 'all'; columns: zero-shot %, adapted %, then the confusion matrix's columns."""
        headers = ["0-shot %", "adapted %"] + [f"→{c[:8]}" for c in classes]
        self.report.clear()
        self.report.setColumnCount(len(headers))
        self.report.setRowCount(len(rows))
        self.report.setHorizontalHeaderLabels(headers)
        for j, c in enumerate(classes):
            self.report.horizontalHeaderItem(2 + j).setToolTip(f"held-out chips predicted as {c}")
        self.report.setVerticalHeaderLabels([r["class"] for r in rows])
        for i, r in enumerate(rows):
            values = [r["zero_shot"], r["adapted"]]
            texts = ["-" if v is None else f"{v:.1f}" for v in values] + [str(v) for v in r["confusion"]]
            for j, t in enumerate(texts):
                self.report.setItem(i, j, QTableWidgetItem(t))
        self.report.resizeColumnsToContents()

    # -- using the adapter --------------------------------------------------------------------------
    def current_adapter(self) -> tuple:
        """(name, classes): the adapter trained here last, else the one chosen in the dock."""
        name = self.last.get("name") or self.dock.adapter_combo.currentData()
        classes = (self.last.get("classes") if name == self.last.get("name") else None) or \
            adapter_classes(self.dock.info, name)
        if not name:
            raise PluginError("train an adapter first, or choose one under Adapter")
        if not classes:
            raise PluginError(f"the classes of adapter {name!r} are unknown; wait for the backend's info")
        return name, classes

    def _select_adapter(self, name: Optional[str]) -> None:
        combo = self.dock.adapter_combo
        if name and combo.findData(name) < 0:
            combo.addItem(name, name)
        if name:
            combo.setCurrentIndex(combo.findData(name))

    def classify_view(self) -> None:
        """Classify the dock's capture (the view by default) with the adapter and its classes."""
        try:
            name, classes = self.current_adapter()
        except PluginError as exc:
            self.dock.message(str(exc), Qgis.Warning)
            return
        self._select_adapter(name)
        self.dock.classes_edit.setPlainText("\n".join(classes))
        self.dock.run_tool("classify")

    def where_unsure(self) -> None:
        """The tiles of the capture with the least margin under the adapter, as a layer to label next."""
        try:
            name, classes = self.current_adapter()
            fld = self.field_combo.currentField() or "class"
            params = UnsureParams(name, classes, fld, self.unsure_count.value())
        except PluginError as exc:
            self.dock.message(str(exc), Qgis.Warning)
            return

        def start(capture) -> None:
            from .tools.base import tile_pixels
            try:
                params.tile_px = tile_pixels(self.dock.cls_tile.value(), self.dock.cls_unit.currentData(),
                                             abs(capture.transform[0]))
            except PluginError as exc:
                self.dock.message(str(exc), Qgis.Warning)
                return
            self._start(UnsureProcessor(CaptureSource(capture), params, self.dock._common()), self._unsure_done)
        try:
            self.dock.capture_async(start)
        except PluginError as exc:
            self.dock.message(str(exc), Qgis.Warning)

    def _unsure_done(self, task: MapQueryTask) -> Optional[QgsVectorLayer]:
        if not self._finish(task):
            return None
        spec = task.outcome.layers[0]
        layer = QgsVectorLayer(f"{spec.path}|layername=label_next", spec.name, "ogr")
        if not layer.isValid():
            self.dock.message(f"cannot load {spec.path}", Qgis.Critical, 0)
            return None
        symbol = layer.renderer().symbol()
        symbol.symbolLayer(0).setBrushStyle(Qt.NoBrush)  # outlines only
        symbol.symbolLayer(0).setStrokeWidth(0.8)
        QgsProject.instance().addMapLayer(layer)
        self.unsure_layer = layer
        self.dock.message(f"{task.outcome.title}: {task.outcome.summary}; fill in '{task.processor.params.class_field}'"
                          " and adapt again", Qgis.Success)
        return layer
