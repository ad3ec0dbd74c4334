"""The settings dialog: start a backend (Python path, model, extra arguments) or connect to one."""
from __future__ import annotations

from typing import Optional

from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFileDialog,
                                 QFormLayout, QHBoxLayout, QLineEdit, QMessageBox, QPushButton, QSpinBox, QVBoxLayout,
                                 QWidget)

from .settings import Settings

PRESETS = ["georsclip-vit-b-32", "georsclip-vit-b-32-ret2", "georsclip-vit-b-32-rsicd", "georsclip-vit-l-14",
           "georsclip-vit-l-14-336", "georsclip-vit-h-14", "remoteclip-rn50", "remoteclip-vit-b-32",
           "remoteclip-vit-l-14", "skyclip-vit-b-32", "skyclip-vit-l-14", "openai-vit-b-32", "openai-vit-b-16",
           "openai-vit-l-14", "openai-rn50", "tiny"]  # python -m backend presets
MODES = [("start", "Start the backend myself (stopped when QGIS quits)"),
         ("connect", "Connect to a running backend (this or another machine)")]


def _with_browse(edit: QLineEdit, directory: bool, caption: str = "Choose the Python interpreter") -> QWidget:
    box = QWidget()
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(edit)
    btn = QPushButton("…")
    btn.setMaximumWidth(30)

    def browse() -> None:
        path = (QFileDialog.getExistingDirectory(box, "Choose a folder", edit.text()) if directory else
                QFileDialog.getOpenFileName(box, caption, edit.text())[0])
        if path:
            edit.setText(path)
    btn.clicked.connect(browse)
    lay.addWidget(btn)
    return box


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.setWindowTitle("MapQuery RS settings")
        form = QFormLayout()
        self.mode = QComboBox()
        for key, text in MODES:
            self.mode.addItem(text, key)
        self.mode.setCurrentIndex(max(0, [k for k, _ in MODES].index(settings.mode) if settings.mode in
                                      dict(MODES) else 0))
        self.address = QLineEdit(settings.address)
        self.address.setToolTip("tcp://HOST:PORT (ipc://PATH also works locally)")
        self.token = QLineEdit(settings.token)
        self.token.setEchoMode(QLineEdit.Password)
        self.token.setToolTip("Access token; needed by a backend on another machine")
        self.server_key = QLineEdit(settings.server_key)
        self.server_key.setToolTip("CURVE encryption: the backend's public key (its server.key file or the 40 "
                                   "characters 'python -m backend keys list' prints); empty: no encryption")
        self.client_key = QLineEdit(settings.client_key)
        self.client_key.setToolTip("CURVE: this machine's NAME.key_secret ('python -m backend keys make DIR "
                                   "--name NAME'); its NAME.key must be in the backend's allow-list")
        self.python = QLineEdit(settings.backend_python)
        self.backend_dir = QLineEdit(settings.backend_dir)
        self.backend_dir.setToolTip("Folder holding the 'backend' package (added to PYTHONPATH); empty when "
                                    "the backend is installed in that Python")
        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.addItems(PRESETS)
        self.model.setCurrentText(settings.model)
        self.checkpoint = QLineEdit(settings.checkpoint)
        self.checkpoint.setPlaceholderText("empty: the preset's file in the weights folder")
        self.checkpoint.setToolTip("A weights file for the model (serve --checkpoint FILE)")
        self.download_btn = QPushButton("Download…")
        self.download_btn.setToolTip("Download the preset's weights into the weights folder (online), or show "
                                     "where to get them")
        self.download_btn.clicked.connect(self.download_weights)
        self.extra = QLineEdit(settings.extra_args)
        self.extra.setPlaceholderText("--device cpu --adapter mine=/path/adapter.pt --random-weights")
        self.offline = QCheckBox("Do not download weights (--offline)")
        self.offline.setChecked(settings.offline)
        self.timeout = QDoubleSpinBox()
        self.timeout.setRange(1, 36000)
        self.timeout.setSuffix(" s")
        self.timeout.setValue(settings.timeout_s)
        self.retries = QSpinBox()
        self.retries.setRange(0, 10)
        self.retries.setValue(settings.retries)
        self.output_dir = QLineEdit(settings.output_dir)
        self.output_dir.setPlaceholderText("<project folder>/mapquery_outputs")
        self.opacity = QDoubleSpinBox()
        self.opacity.setRange(0.05, 1.0)
        self.opacity.setSingleStep(0.05)
        self.opacity.setValue(settings.heatmap_opacity)
        form.addRow("Backend", self.mode)
        form.addRow("Address", self.address)
        form.addRow("Access token", self.token)
        form.addRow("Server public key", _with_browse(self.server_key, False, "Choose the server's public key"))
        form.addRow("Client key", _with_browse(self.client_key, False, "Choose this client's .key_secret file"))
        form.addRow("Backend Python", _with_browse(self.python, False))
        form.addRow("Backend source folder", _with_browse(self.backend_dir, True))
        form.addRow("Model preset", self.model)
        weights_row = QHBoxLayout()
        weights_row.addWidget(_with_browse(self.checkpoint, False, "Choose the checkpoint"), 1)
        weights_row.addWidget(self.download_btn)
        form.addRow("Weights", weights_row)
        form.addRow("More arguments", self.extra)
        form.addRow("", self.offline)
        form.addRow("Request timeout", self.timeout)
        form.addRow("Retries", self.retries)
        form.addRow("Output folder", _with_browse(self.output_dir, True))
        form.addRow("Heatmap opacity", self.opacity)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(buttons)
        self.mode.currentIndexChanged.connect(self._update)
        self._update()

    def _update(self) -> None:
        start = self.mode.currentData() == "start"
        for w in (self.python, self.backend_dir, self.model, self.checkpoint, self.download_btn, self.extra,
                  self.offline):
            w.setEnabled(start)

    def download_weights(self) -> None:
        """Fetch the preset's weights through the backend's environment (progress, log, offline instructions)."""
        from qgis.core import QgsApplication
        from .backend_setup import log_path
        from .setup_dialog import StepsDialog, backend_python_usable, weights_download_step
        settings = self.settings()
        if not backend_python_usable(settings):
            QMessageBox.information(self, "MapQuery RS", "Set up the backend first (MapQuery dock > Start): the "
                                    "download runs in its environment.")
            return
        self.downloader = StepsDialog("MapQuery RS: weights", [weights_download_step(settings, settings.model)],
                                      log_path(QgsApplication.qgisSettingsDirPath()).with_name("weights.log"), self)
        self.downloader.show()

    def settings(self) -> Settings:
        return Settings(mode=self.mode.currentData(), address=self.address.text().strip(),
                        token=self.token.text().strip(), server_key=self.server_key.text().strip(),
                        client_key=self.client_key.text().strip(), timeout_s=self.timeout.value(),
                        retries=self.retries.value(), backend_python=self.python.text().strip(),
                        backend_dir=self.backend_dir.text().strip(), model=self.model.currentText().strip(),
                        checkpoint=self.checkpoint.text().strip(), extra_args=self.extra.text().strip(),
                        offline=self.offline.isChecked(),
                        output_dir=self.output_dir.text().strip(), heatmap_opacity=self.opacity.value())
