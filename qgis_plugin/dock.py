"""The dock widget: backend status, model/adapter, capture options and the Classify / Search / Localize tools.

The widget only gathers parameters and shows results: captures come from :mod:`capture`, the work runs in
a :class:`tasks.MapQueryTask`, layers are added in its ``finished()`` (main thread).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional

from qgis.core import (Qgis, QgsApplication, QgsCoordinateTransform, QgsMapLayerProxyModel, QgsMapRendererParallelJob,
                       QgsProject, QgsRasterLayer, QgsRectangle, QgsTask, QgsUnitTypes)
from qgis.gui import QgsCheckableComboBox, QgsMapLayerComboBox, QgsMapToolEmitPoint
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QDockWidget, QDoubleSpinBox, QFormLayout, QFrame, QGroupBox,
                                 QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit, QProgressBar, QPushButton,
                                 QScrollArea, QSpinBox, QTableWidget, QTableWidgetItem, QTabWidget, QVBoxLayout,
                                 QWidget)

from shared_protocol.defaults import DEFAULT_TILE_SIZE

from . import capture as cap_mod
from .adapt_tab import AdaptTab
from .connection import describe, probe
from .errors import PluginError, is_cancel, plain_message
from .index_tab import IndexTab
from .layers import is_output, project_sources
from .manager import BackendManager
from .masks import AreaOfInterest
from .outputs import output_dir, write_csv
from .settings_dialog import PRESETS, SettingsDialog
from .setup_dialog import FirstRun
from .sources import CaptureSource
from .tasks import MapQueryTask, add_outcome
from .tools.base import Common, Outcome, tile_pixels
from .tools.classify import TABLE_FIELDS, ClassifyParams, ClassifyProcessor
from .tools.localize import LocalizeParams, LocalizeProcessor, heatmap_regions
from .tools.search import SearchParams, SearchProcessor, example_tile

def clipped_labels(root: QWidget) -> List[str]:
    """The texts of the visible labels under ``root`` that do not fit their size (the layout check for small
    screens, run by the tests and the desktop screenshot test)."""
    out = []
    for label in root.findChildren(QLabel):
        if not label.isVisibleTo(root) or not label.text():
            continue
        if label.wordWrap():
            need_w, need_h = label.minimumSizeHint().width(), label.heightForWidth(label.width())
        else:
            need_w, need_h = label.sizeHint().width(), label.sizeHint().height()
        cut = False  # a scroll area without a horizontal scroll bar cuts what reaches past its right edge
        parent = label.parentWidget()
        while parent is not None and parent is not root.parentWidget():
            if isinstance(parent, QScrollArea) and parent.horizontalScrollBarPolicy() == Qt.ScrollBarAlwaysOff:
                right = label.mapTo(parent.viewport(), label.rect().topRight()).x()
                cut = cut or right >= parent.viewport().width()
            parent = parent.parentWidget()
        if cut or label.width() < need_w or label.height() < need_h:
            out.append(label.text())
    return out


def describe_area(names: List[str], area: str, aoi: Optional[AreaOfInterest]) -> str:
    """Which raster(s) and area a result comes from, for its group's name."""
    rasters = ", ".join(names)
    rasters = rasters if len(rasters) <= 60 else rasters[:57] + "..."
    return f"{rasters}, {area}" + (f", AOI {aoi.name}" if aoi is not None else "")


def breakable(text: str) -> str:
    """``text`` with line-break opportunities after path separators (long file names wrap in a narrow dock)."""
    for sep in "/\\_-.":
        text = text.replace(sep, sep + "\u200b")
    return text


SOURCES = [("view", "Map view (rendered)"), ("layer", "Layer extent (rendered)"),
           ("bands", "Raw bands of a raster layer")]
POLL_MS = 4000
MAX_AUTO_RESTARTS = 3


class MapQueryDock(QDockWidget):
    def __init__(self, iface: Any, manager: BackendManager, parent: Optional[QWidget] = None):
        super().__init__("MapQuery RS", parent)
        self.setObjectName("MapQueryRSDock")
        self.iface = iface
        self.manager = manager
        self.info: Dict[str, Any] = {}
        self.tasks: List[MapQueryTask] = []
        self.active: Optional[MapQueryTask] = None
        self._jobs: List[Any] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapquery-probe")
        self._probe: Optional[concurrent.futures.Future] = None
        self._last_state = ""
        self._restarts = 0
        self._user_stopped = False
        self.first_run = FirstRun(self)  # no backend Python yet: set one up, or connect
        self.search_hits: List[Dict[str, Any]] = []
        self.last_heatmap: Optional[str] = None
        self._shut_down = False
        self._previous_tool: Any = None
        self._example_tool: Any = None
        self._search_crs = None

        body = QWidget()
        lay = QVBoxLayout(body)
        lay.addWidget(self._status_box())
        lay.addWidget(self._capture_box())
        self.tabs = QTabWidget()
        self.tabs.addTab(self._classify_tab(), "Classify")
        self.tabs.addTab(self._search_tab(), "Search")
        self.tabs.addTab(self._localize_tab(), "Localize")
        self.index_tab = IndexTab(self)
        self.tabs.addTab(self.index_tab, "Index")
        self.adapt_tab = AdaptTab(self)
        self.tabs.addTab(self.adapt_tab, "Adapt")
        lay.addWidget(self.tabs)
        row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel_active)
        row.addWidget(self.progress)
        row.addWidget(self.cancel_btn)
        lay.addLayout(row)
        lay.addStretch(1)
        scroll = QScrollArea()  # fits small screens (1366 x 768, 1280 x 800): scroll rather than clip
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(body)
        # it scrolls only vertically, so it never gets narrower than its content
        scroll.setMinimumWidth(body.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width())
        self.setWidget(scroll)
        project = QgsProject.instance()
        project.layersAdded.connect(self.refresh_imagery)
        project.layersRemoved.connect(self.refresh_imagery)
        self.refresh_imagery()
        self.source_combo.currentIndexChanged.connect(self.update_units)
        self.layer_combo.layerChanged.connect(self.update_units)
        self._canvas().destinationCrsChanged.connect(self.update_units)
        self.update_units()

        self.timer = QTimer(self)
        self.timer.timeout.connect(self.poll)
        self.timer.start(POLL_MS)
        self.check_timer = QTimer(self)
        self.check_timer.timeout.connect(self._check_probe)
        self.check_timer.start(150)
        QTimer.singleShot(0, self.poll)

    # -- building -----------------------------------------------------------------------------------
    def _status_box(self) -> QGroupBox:
        box = QGroupBox("Backend")
        form = QFormLayout(box)
        self.status_label = QLabel("not checked yet")
        self.status_label.setWordWrap(True)
        self.model_label, self.device_label = QLabel("-"), QLabel("-")
        self.protocol_label, self.weights_label = QLabel("-"), QLabel("-")
        for label in (self.weights_label, self.device_label, self.model_label):  # long texts wrap in a narrow dock
            label.setWordWrap(True)
        form.addRow("Status", self.status_label)
        form.addRow("Model", self.model_label)
        form.addRow("Weights", self.weights_label)
        form.addRow("Device", self.device_label)
        form.addRow("Protocol", self.protocol_label)
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(PRESETS)
        self.model_combo.setCurrentText(self.manager.settings.model)
        self.model_combo.setToolTip("Preset served by a backend the plugin starts (applied by restarting it)")
        apply_btn = QPushButton("Use")
        apply_btn.clicked.connect(self.apply_model)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(apply_btn)
        form.addRow("Model preset", row)
        self.adapter_combo = QComboBox()
        self.adapter_combo.addItem("(base model)", None)
        form.addRow("Adapter", self.adapter_combo)
        buttons = QHBoxLayout()
        self.start_btn = QPushButton("Start")
        self.start_btn.clicked.connect(self.start_backend)
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.clicked.connect(self.stop_backend)
        settings_btn = QPushButton("Settings…")
        settings_btn.clicked.connect(self.open_settings)
        for b in (self.start_btn, self.stop_btn, settings_btn):
            buttons.addWidget(b)
        form.addRow(buttons)
        return box

    def _capture_box(self) -> QGroupBox:
        box = QGroupBox("Area")
        form = QFormLayout(box)
        self.source_combo = QComboBox()
        for key, text in SOURCES:
            self.source_combo.addItem(text, key)
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(QgsMapLayerProxyModel.RasterLayer | QgsMapLayerProxyModel.VectorLayer)
        self.bands_edit = QLineEdit()
        self.bands_edit.setPlaceholderText("e.g. 3,2,1 (default: first three)")
        self.resolution = QDoubleSpinBox()
        self.resolution.setDecimals(8)
        self.resolution.setRange(0.0, 1e9)
        self.resolution.setSpecialValueText("the view's (auto)")  # shown for 0
        self.resolution.setToolTip("Ground size of one captured pixel, in map units (0: the view's current one)")
        view_btn = QPushButton("View")
        view_btn.setToolTip("Use the view's current resolution")
        view_btn.clicked.connect(lambda: self.resolution.setValue(self._view_resolution()))
        res_row = QHBoxLayout()
        res_row.addWidget(self.resolution, 1)
        res_row.addWidget(view_btn)
        self.imagery_combo = QgsCheckableComboBox()
        self.imagery_combo.setDefaultText("visible raster layers")
        self.imagery_combo.setToolTip("Raster layers drawn into map-view and vector-extent captures (none checked: "
                                      "the visible ones). Vector overlays and MapQuery's own results are never "
                                      "captured.")
        self.aoi_combo = QgsMapLayerComboBox()
        self.aoi_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.aoi_combo.setAllowEmptyLayer(True)
        self.aoi_combo.setLayer(None)
        self.aoi_combo.setToolTip("Answers come only from inside these polygons (empty: the whole area)")
        self.aoi_selected = QCheckBox("selected features only")
        aoi_row = QVBoxLayout()
        aoi_row.addWidget(self.aoi_combo)
        aoi_row.addWidget(self.aoi_selected)
        form.addRow("Capture", self.source_combo)
        form.addRow("Layer", self.layer_combo)
        form.addRow("Imagery", self.imagery_combo)
        form.addRow("Bands", self.bands_edit)
        form.addRow("Resolution", res_row)
        form.addRow("Area of interest", aoi_row)
        return box

    def _tile_row(self, default_px: int):
        spin = QDoubleSpinBox()
        spin.setRange(0.000001, 1e9)
        spin.setDecimals(6)
        spin.setValue(default_px)
        unit = QComboBox()
        unit.addItem("px", "pixels")
        unit.addItem("map units", "map units")
        unit.setProperty("previous", "pixels")
        unit.currentIndexChanged.connect(lambda _i: self._convert_tile(spin, unit))
        row = QHBoxLayout()
        row.addWidget(spin, 1)
        row.addWidget(unit)
        return spin, unit, row

    # -- imagery, units, area of interest --------------------------------------------------------------
    def refresh_imagery(self, *_args) -> None:
        """The imagery picker lists the project's raster layers that are not MapQuery outputs (keeps the checks)."""
        keep = set(self.imagery_combo.checkedItemsData())
        self.imagery_combo.clear()
        for layer in QgsProject.instance().layerTreeRoot().layerOrder():
            if isinstance(layer, QgsRasterLayer) and not is_output(layer):
                self.imagery_combo.addItemWithCheckState(
                    layer.name(), Qt.Checked if layer.id() in keep else Qt.Unchecked, layer.id())

    def imagery_layers(self) -> List[Any]:
        """The raster layers a rendered capture draws: the checked ones, else the visible ones (top first); never
        vector layers or MapQuery's own outputs."""
        chosen = set(self.imagery_combo.checkedItemsData())
        if chosen:
            layers = [lyr for lyr in QgsProject.instance().layerTreeRoot().layerOrder() if lyr.id() in chosen]
        else:
            layers = self._canvas().layers()
        return [lyr for lyr in layers if isinstance(lyr, QgsRasterLayer) and not is_output(lyr)]

    def area_of_interest(self) -> Optional[AreaOfInterest]:
        layer = self.aoi_combo.currentLayer()
        if layer is None:
            return None
        return AreaOfInterest.of_layer(layer, self.aoi_selected.isChecked())

    def _bands_layer(self) -> Optional[Any]:
        layer = self.layer_combo.currentLayer()
        if self.source_combo.currentData() == "bands" and isinstance(layer, QgsRasterLayer):
            return layer
        return None

    def capture_resolution(self) -> float:
        """Map units per captured pixel, as the capture will use it."""
        layer = self._bands_layer()
        if layer is not None:
            same_units = layer.crs().mapUnits() == self._canvas().mapSettings().destinationCrs().mapUnits()
            return self.resolution.value() if (self.resolution.value() and same_units) else \
                layer.rasterUnitsPerPixelX()
        return self.resolution.value() or self._view_resolution()

    def map_unit_name(self) -> str:
        """The capture CRS's map units: m, degrees, ft, ..."""
        layer = self._bands_layer()
        crs = layer.crs() if layer is not None else self._canvas().mapSettings().destinationCrs()
        units = crs.mapUnits()
        return "degrees" if units == QgsUnitTypes.DistanceDegrees else QgsUnitTypes.toAbbreviatedString(units)

    def update_units(self, *_args) -> None:
        name = self.map_unit_name()
        for combo in (self.cls_unit, self.srch_unit):
            combo.setItemText(combo.findData("map units"), name)

    def _convert_tile(self, spin: QDoubleSpinBox, unit: QComboBox) -> None:
        """Keep the tile's ground size when its unit switches: 224 px at 10 m/px <-> 2240 m."""
        new, old = unit.currentData(), unit.property("previous")
        unit.setProperty("previous", new)
        res = self.capture_resolution()
        if new == old or not res > 0:
            return
        spin.setValue(spin.value() * res if new == "map units" else spin.value() / res)

    def _classify_tab(self) -> QWidget:
        w = QWidget()
        form = QFormLayout(w)
        self.preset_combo = QComboBox()
        load = QPushButton("Load")
        load.clicked.connect(self.load_class_preset)
        row = QHBoxLayout()
        row.addWidget(self.preset_combo, 1)
        row.addWidget(load)
        form.addRow("Class preset", row)
        self.classes_edit = QPlainTextEdit()
        self.classes_edit.setPlaceholderText("one class per line")
        self.classes_edit.setPlainText("forest\nfarmland\nriver\ndense residential\nbare land")
        form.addRow("Classes", self.classes_edit)
        self.cls_tile, self.cls_unit, row = self._tile_row(DEFAULT_TILE_SIZE)
        form.addRow("Tile size", row)
        self.cls_topk = QSpinBox()
        self.cls_topk.setRange(1, 20)
        self.cls_topk.setValue(3)
        form.addRow("Top-k", self.cls_topk)
        btn = QPushButton("Classify")
        btn.clicked.connect(lambda: self.run_tool("classify"))
        form.addRow(btn)
        self.class_table = QTableWidget(0, 4)
        self.class_table.setHorizontalHeaderLabels(["class", "tiles", "km²", "share"])
        self.class_table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.class_table.setMaximumHeight(160)
        self.class_rows: List[Dict[str, Any]] = []
        export = QPushButton("Export CSV…")
        export.clicked.connect(self.export_class_table)
        form.addRow(self.class_table)
        form.addRow(export)
        return w

    def _search_tab(self) -> QWidget:
        w = QWidget()
        form = QFormLayout(w)
        self.search_edit = QLineEdit()
        self.search_edit.setPlaceholderText("e.g. a bridge over a river")
        self.search_edit.returnPressed.connect(lambda: self.run_tool("search"))
        form.addRow("Query", self.search_edit)
        self.srch_tile, self.srch_unit, row = self._tile_row(DEFAULT_TILE_SIZE)
        form.addRow("Tile size", row)
        self.srch_topk = QSpinBox()
        self.srch_topk.setRange(1, 500)
        self.srch_topk.setValue(10)
        form.addRow("Top-k", self.srch_topk)
        btn = QPushButton("Search")
        btn.clicked.connect(lambda: self.run_tool("search"))
        example = QPushButton("By example…")
        example.setToolTip("Click a tile on the map: find the tiles most like it")
        example.clicked.connect(self.pick_example)
        row = QHBoxLayout()
        row.addWidget(btn, 1)
        row.addWidget(example)
        form.addRow(row)
        self.results = QTableWidget(0, 2)
        self.results.setHorizontalHeaderLabels(["rank", "score"])
        self.results.setEditTriggers(QTableWidget.NoEditTriggers)
        self.results.setSelectionBehavior(QTableWidget.SelectRows)
        self.results.cellClicked.connect(self.zoom_to_hit)
        form.addRow(self.results)
        return w

    def _localize_tab(self) -> QWidget:
        w = QWidget()
        form = QFormLayout(w)
        self.localize_edit = QLineEdit()
        self.localize_edit.setPlaceholderText("e.g. a river winding through farmland (';' separates queries)")
        self.localize_edit.returnPressed.connect(lambda: self.run_tool("localize"))
        form.addRow("Query", self.localize_edit)
        btn = QPushButton("Localize")
        btn.clicked.connect(lambda: self.run_tool("localize"))
        form.addRow(btn)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        regions = QPushButton("Polygons")
        regions.setToolTip("Outline the last heatmap's regions at or above the threshold (a GeoPackage layer)")
        regions.clicked.connect(lambda: self.heatmap_regions())
        row = QHBoxLayout()
        row.addWidget(self.threshold, 1)
        row.addWidget(regions)
        form.addRow("Threshold", row)
        return w

    # -- messages -----------------------------------------------------------------------------------
    def message(self, text: str, level: Any = Qgis.Info, duration: int = 8) -> None:
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is not None:
            bar.pushMessage("MapQuery", text, level, duration)

    # -- backend status -----------------------------------------------------------------------------
    def poll(self) -> None:
        """Check the backend in a thread (never blocks the UI); also watch a backend the plugin owns."""
        if self._shut_down:  # a poll queued before shutdown (e.g. the first one, at once after opening)
            return
        self._watch_process()
        if self._probe is None:
            self._probe = self._pool.submit(probe, dataclasses.replace(self.manager.settings), 2.0)

    def _watch_process(self) -> None:
        state = self.manager.process_state()
        if state == self._last_state:
            return
        previous, self._last_state = self._last_state, state
        if state == "failed":
            hint = ""
            if self.manager.process is not None and self.manager.process.weights_missing():
                hint = (" Choose the checkpoint file, or download it, under Settings > Weights. To try the plugin "
                        "without them, choose the preset 'tiny' and add --random-weights under Settings > More "
                        "arguments (its answers are meaningless).")
            elif "No module named" in self.manager.failure():
                hint = (f" {self.manager.settings.backend_python} lacks the backend's packages: empty Settings > "
                        "Backend Python and press Start to set up an environment of its own.")
            self.message(f"The backend could not start: {self.manager.failure()}{hint}", Qgis.Critical, 0)
        elif state == "stopped" and previous in ("ready", "starting") and not self._user_stopped:
            if self._restarts < MAX_AUTO_RESTARTS:
                self._restarts += 1
                self.message("The backend stopped unexpectedly; restarting it.", Qgis.Warning)
                self.start_backend(auto=True)
            else:
                self.message("The backend keeps stopping; start it again from the MapQuery dock.", Qgis.Critical, 0)

    def _check_probe(self) -> None:
        fut = self._probe
        if fut is None or not fut.done():
            return
        self._probe = None
        try:
            info = fut.result()
            if self.manager.managed and self.manager.process_state() in ("stopped", "failed"):
                raise ConnectionError("stopped")  # a stopped backend winding down still answers: not ours now
            self.set_info(info)
        except Exception as exc:  # noqa: BLE001
            self.set_down(exc)

    def set_info(self, info: Dict[str, Any]) -> None:
        self.info = info
        d = describe(info)
        self.status_label.setText(f"<b style='color:#2a7d2a'>connected</b> to {self.manager.settings.address} "
                                  f"(backend {d['backend_version']})")
        self.model_label.setText(d["model"])
        self.weights_label.setText(breakable(d["weights"]))
        self.weights_label.setToolTip(d["weights"])
        self.device_label.setText(d["device"])
        self.protocol_label.setText(d["protocol"])
        names = [a.get("name") for a in info.get("adapters") or []]
        current = [self.adapter_combo.itemData(i) for i in range(1, self.adapter_combo.count())]
        if names != current:
            keep = self.adapter_combo.currentData()
            self.adapter_combo.clear()
            self.adapter_combo.addItem("(base model)", None)
            for n in names:
                self.adapter_combo.addItem(n, n)
            idx = self.adapter_combo.findData(keep)
            self.adapter_combo.setCurrentIndex(max(idx, 0))
        presets = sorted((info.get("capabilities") or {}).get("class_presets", {}))
        if presets != [self.preset_combo.itemText(i) for i in range(self.preset_combo.count())]:
            self.preset_combo.clear()
            self.preset_combo.addItems(presets)

    def set_down(self, exc: BaseException) -> None:
        state = self.manager.process_state()
        words = {"starting": "the backend is starting (loading the model)…",
                 "failed": f"the backend could not start: {self.manager.failure()}",
                 "stopped": "not running: press Start, or choose 'connect' in Settings"}.get(
            state, plain_message(exc))
        self.info = {}
        self.status_label.setText(f"<b style='color:#b00'>not connected</b>: {words}")
        self.clear_status()

    def clear_status(self) -> None:
        """Forget what a backend that is gone said about itself (model, weights, device, protocol)."""
        for label in (self.model_label, self.weights_label, self.device_label, self.protocol_label):
            label.setText("-")

    def start_backend(self, auto: bool = False) -> None:
        settings = self.manager.settings
        if settings.mode != "start":
            self.message("Settings say 'connect to a running backend': the plugin does not start one.", Qgis.Info)
            return
        if not self.first_run.backend_ready():
            return
        if not auto:
            self._restarts = 0
        self._user_stopped = False
        try:
            self.manager.start()
        except ValueError as exc:
            self.message(str(exc), Qgis.Critical)
            return
        self.status_label.setText("starting the backend (loading the model)…")

    def stop_backend(self) -> None:
        """Cancel running requests, stop the backend without waiting for it, and forget its status."""
        self._user_stopped = True
        for task in list(self.tasks):
            if not task.done:
                task.cancel()
        self.manager.stop(wait=False)
        self.info = {}
        self.clear_status()
        self.status_label.setText("stopped")
        self.poll()

    def apply_model(self) -> None:
        self.manager.settings.model = self.model_combo.currentText().strip()
        self.manager.settings.save()
        if self.manager.managed:
            self.start_backend()
        else:
            self.message("The model is chosen where the backend runs; this setting applies when the plugin starts "
                         "the backend.", Qgis.Info)

    def open_settings(self, proposed=None) -> None:
        """The settings dialog, showing ``proposed`` settings (default: the current ones) until OK."""
        dlg = SettingsDialog(proposed or self.manager.settings, self)
        if dlg.exec_():
            new = dlg.settings()
            restart = self.manager.managed and self.manager.process is not None and (
                new.serve_command() != self.manager.settings.serve_command())
            self.manager.settings = new
            new.save()
            self.model_combo.setCurrentText(new.model)
            if new.mode != "start":
                self.manager.stop()
            elif restart:
                self.start_backend()
            self.poll()

    def load_class_preset(self) -> None:
        presets = (self.info.get("capabilities") or {}).get("class_presets", {})
        names = presets.get(self.preset_combo.currentText())
        if names:
            self.classes_edit.setPlainText("\n".join(names))

    # -- capture ------------------------------------------------------------------------------------
    def _canvas(self):
        return self.iface.mapCanvas()

    def _view_resolution(self) -> float:
        return float(self._canvas().mapUnitsPerPixel())

    def capture_async(self, then) -> None:
        """Capture the chosen area and call ``then(capture)`` on the main thread (rendering is asynchronous)."""
        canvas = self._canvas()
        source = self.source_combo.currentData()
        crs = canvas.mapSettings().destinationCrs()
        res = self.resolution.value() or self._view_resolution()
        layer = self.layer_combo.currentLayer()
        aoi = self.area_of_interest()
        if source == "bands":
            if not isinstance(layer, QgsRasterLayer):
                raise PluginError("choose a raster layer to read bands from")
            bands = [int(b) for b in self.bands_edit.text().replace(" ", "").split(",") if b] or None
            view = QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transformBoundingBox(
                canvas.extent())
            same_units = layer.crs().mapUnits() == crs.mapUnits()
            self._read_bands_async(cap_mod.RasterSource.of(layer), bands, view,
                                   res if (self.resolution.value() and same_units) else None, aoi, then)
            return
        if source == "layer":
            if layer is None:
                raise PluginError("choose a layer whose extent to capture")
            extent = cap_mod.layer_extent_in(layer, crs)
            layers = [layer] if isinstance(layer, QgsRasterLayer) else self.imagery_layers()
            area = "layer extent" if isinstance(layer, QgsRasterLayer) else f"extent of {layer.name()}"
        else:
            extent = canvas.extent()
            layers = self.imagery_layers()
            area = "map view"
        if not layers:
            raise PluginError("no imagery to capture: show a raster layer, or check one under Imagery")
        ms = cap_mod.map_settings(layers, extent, crs, res)
        job = QgsMapRendererParallelJob(ms)
        self._jobs.append(job)

        def done() -> None:
            self._jobs.remove(job)
            try:
                cap = cap_mod.capture_from_image(job.renderedImage(), ms).restrict(aoi)
                cap.source = describe_area([lyr.name() for lyr in layers], area, aoi)
                then(cap)
            except Exception as exc:  # noqa: BLE001
                self.message(plain_message(exc, "Capture"), Qgis.Critical)
        job.finished.connect(done)
        job.start()

    def _read_bands_async(self, source, bands, view, res, aoi, then) -> None:
        """Read raw bands in a background task (a large read must not freeze QGIS); ``then`` on the main thread."""
        def read(task):
            cap = cap_mod.read_bands(source, bands, view, res).restrict(aoi)
            cap.source = describe_area([source.name], f"bands {','.join(map(str, bands or [])) or 'default'}, view",
                                       aoi)
            return cap

        def done(exception, capture=None) -> None:
            self._jobs.remove(task)
            if exception is not None:
                self.message(plain_message(exception, "Capture"), Qgis.Critical)
            elif capture is not None:
                then(capture)

        task = QgsTask.fromFunction("MapQuery: read raster bands", read, on_finished=done)
        self._jobs.append(task)  # keep a reference until it is done
        QgsApplication.taskManager().addTask(task)

    # -- tools --------------------------------------------------------------------------------------
    def _common(self) -> Common:
        project = QgsProject.instance()
        return Common(output_dir(self.manager.settings.output_dir, project.homePath()),
                      self.adapter_combo.currentData(), project_sources(project))

    def make_processor(self, tool: str, capture: cap_mod.Capture, example=None):
        common, source, res = self._common(), CaptureSource(capture), abs(capture.transform[0])
        if tool == "classify":
            tile = tile_pixels(self.cls_tile.value(), self.cls_unit.currentData(), res)
            params = ClassifyParams(self.classes_edit.toPlainText().splitlines(), tile, top_k=self.cls_topk.value())
            return ClassifyProcessor(source, params, common)
        if tool == "search":
            tile = tile_pixels(self.srch_tile.value(), self.srch_unit.currentData(), res)
            if example is None:
                return SearchProcessor(source, SearchParams(self.search_edit.text(), tile, self.srch_topk.value()),
                                       common)
            canvas_crs = self._canvas().mapSettings().destinationCrs()
            if canvas_crs != capture.qgs_crs():
                example = QgsCoordinateTransform(canvas_crs, capture.qgs_crs(), QgsProject.instance()).transform(
                    example)
            pixels, mask = example_tile(capture, example.x(), example.y(), tile)
            name = f"like the tile at {example.x():.6g}, {example.y():.6g}"
            return SearchProcessor(source, SearchParams(name, tile, self.srch_topk.value(), example=pixels,
                                                        example_mask=mask), common)
        return LocalizeProcessor(source, LocalizeParams(self.localize_edit.text().split(";")), common)

    def pick_example(self) -> None:
        """Search by example: the next click on the map picks the example tile."""
        canvas = self._canvas()
        self._previous_tool = canvas.mapTool()
        self._example_tool = QgsMapToolEmitPoint(canvas)
        self._example_tool.canvasClicked.connect(self._example_clicked)
        canvas.setMapTool(self._example_tool)
        self.message("Click a tile on the map: MapQuery finds the tiles most like it.", Qgis.Info, 4)

    def _example_clicked(self, point, _button=None) -> None:
        canvas = self._canvas()
        if self._previous_tool is not None:
            canvas.setMapTool(self._previous_tool)
        else:
            canvas.unsetMapTool(self._example_tool)
        self.search_by_example(point)

    def search_by_example(self, point) -> None:
        """Rank the capture's tiles by their similarity to the tile around ``point`` (canvas CRS)."""
        self.run_tool("search", example=point)

    def run_tool(self, tool: str, example=None) -> None:
        if self.active is not None and not self.active.done:
            self.message("A MapQuery request is still running; cancel it or wait.", Qgis.Warning)
            return

        def start(capture: cap_mod.Capture) -> None:
            try:
                processor = self.make_processor(tool, capture, example)
            except PluginError as exc:
                self.message(str(exc), Qgis.Warning)
                return
            self.start_task(MapQueryTask(processor, dataclasses.replace(self.manager.settings), self.task_done))
        try:
            self.capture_async(start)
        except PluginError as exc:
            self.message(plain_message(exc, "Capture"), Qgis.Warning)

    def start_task(self, task: MapQueryTask) -> None:
        self.tasks.append(task)  # keep a Python reference until it is finished
        self.active = task
        self.progress.setValue(0)
        self.cancel_btn.setEnabled(True)
        task.progressChanged.connect(lambda p: self.progress.setValue(int(p)))
        QgsApplication.taskManager().addTask(task)

    def cancel_active(self) -> None:
        if self.active is not None and not self.active.done:
            self.active.cancel()

    def task_done(self, task: MapQueryTask) -> None:
        if task in self.tasks:
            self.tasks.remove(task)
        if task is self.active:
            self.active = None
            self.cancel_btn.setEnabled(False)
        if task.error is not None:
            if is_cancel(task.error):
                self.message(f"{task.processor.title}: cancelled.", Qgis.Info, 4)
            else:
                self.message(task.message(), Qgis.Critical, 0)
            self.progress.setValue(0)
            return
        outcome = task.outcome
        try:
            if outcome.layers:  # an index build makes no layer
                add_outcome(outcome, QgsProject.instance(), self.manager.settings.heatmap_opacity)
        except PluginError as exc:
            self.message(str(exc), Qgis.Critical, 0)
            return
        self.progress.setValue(100)
        if isinstance(task.processor, SearchProcessor):
            self.show_hits(outcome.rows, task.processor.source.capture)
        if isinstance(task.processor, ClassifyProcessor):
            self.show_class_table(outcome.table)
        if isinstance(task.processor, LocalizeProcessor):
            self.last_heatmap = outcome.layers[0].path if outcome.layers else None
        warn = f" ({'; '.join(outcome.warnings)})" if outcome.warnings else ""
        self.message(f"{outcome.title}: {outcome.summary}{warn}", Qgis.Warning if warn else Qgis.Success)

    def heatmap_regions(self, then=None) -> None:
        """Polygons of the chosen heatmap (the active layer when it is one, else the last one) at the threshold,
        made in a background task and added as a layer."""
        active = self.iface.activeLayer() if hasattr(self.iface, "activeLayer") else None
        path = active.source() if active is not None and is_output(active) and \
            active.customProperty("mapquery_rs/output") == "heatmap" else self.last_heatmap
        if not path:
            self.message("Localize first (or select a heatmap layer): there is no heatmap to outline.", Qgis.Info)
            return
        threshold, common = self.threshold.value(), self._common()

        def work(task):
            return heatmap_regions(path, threshold, common)

        def done(exception, spec=None) -> None:
            self._jobs.remove(task)
            if exception is not None:
                self.message(plain_message(exception, "Polygons"), Qgis.Critical)
                return
            group, layers = add_outcome(Outcome(spec.name, [spec]), QgsProject.instance())
            if then is not None:
                then(layers[0])

        task = QgsTask.fromFunction("MapQuery: heatmap regions", work, on_finished=done)
        self._jobs.append(task)
        QgsApplication.taskManager().addTask(task)

    def show_class_table(self, rows: List[Dict[str, Any]]) -> None:
        """Per-class tiles, area and share of the last classification."""
        self.class_rows = rows
        self.class_table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            cells = (r["label"], str(r["tiles"]), f"{r['area_km2']:.3f}", f"{100 * r['share']:.1f} %")
            for j, text in enumerate(cells):
                self.class_table.setItem(i, j, QTableWidgetItem(text))

    def export_class_table(self, path: str = "") -> Optional[str]:
        """Write the class table as CSV (asks where when ``path`` is empty)."""
        if not self.class_rows:
            self.message("Classify first: there is no table to export.", Qgis.Info)
            return None
        if not path:
            path, _ = QFileDialog.getSaveFileName(self, "Export the class table", "", "CSV (*.csv)")
            if not path:
                return None
        write_csv(Path(path), TABLE_FIELDS, self.class_rows)
        self.message(f"Class table written to {path}", Qgis.Success, 4)
        return path

    def show_hits(self, rows: List[Dict[str, Any]], capture: cap_mod.Capture) -> None:
        self.search_hits = rows
        self._search_crs = capture.qgs_crs()
        self.results.setRowCount(len(rows))
        for i, r in enumerate(rows):
            self.results.setItem(i, 0, QTableWidgetItem(str(r["rank"])))
            self.results.setItem(i, 1, QTableWidgetItem(f"{r['score']:.4f}"))

    def zoom_to_hit(self, row: int, _col: int = 0) -> None:
        if not (0 <= row < len(self.search_hits)):
            return
        h = self.search_hits[row]
        rect = QgsRectangle(h["xmin"], h["ymin"], h["xmax"], h["ymax"])
        canvas = self._canvas()
        dest = canvas.mapSettings().destinationCrs()
        if self._search_crs is not None and self._search_crs != dest:
            rect = QgsCoordinateTransform(self._search_crs, dest, QgsProject.instance()).transformBoundingBox(rect)
        rect.scale(1.5)
        canvas.setExtent(rect)
        canvas.refresh()

    def shutdown(self) -> None:
        self._shut_down = True
        self.timer.stop()
        self.check_timer.stop()
        for task in list(self.tasks):
            if not task.done:
                task.cancel()
        self._pool.shutdown(wait=False)
        project = QgsProject.instance()
        for signal in (project.layersAdded, project.layersRemoved):
            try:
                signal.disconnect(self.refresh_imagery)
            except TypeError:
                pass
