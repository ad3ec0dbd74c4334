"""The first-run dialogs: set up the backend's environment (with progress, a log and a clear failure
message), or connect to a running backend. Commands run in ``QProcess``es: QGIS's main thread never waits."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
import re
from pathlib import Path
from typing import Any, Callable, List, Optional

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, Qt, QTimer, pyqtSignal
from qgis.PyQt.QtWidgets import (QComboBox, QDialog, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                                 QMessageBox, QPlainTextEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget)

from . import backend_setup as bs
from .settings import Settings, default_backend_dir

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapquery-setup")
PROGRESS_LINE = re.compile(r"^progress (\d+(?:\.\d+)?)\b")  # 'progress 0.42 ...' from a step: its own share


def _clean_environment() -> QProcessEnvironment:
    """QGIS's environment without what would make another Python load QGIS's (PYTHONHOME, PYTHONPATH)."""
    env = QProcessEnvironment.systemEnvironment()
    for key in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP"):
        env.remove(key)
    env.insert("PYTHONNOUSERSITE", "1")
    env.insert("PYTHONUNBUFFERED", "1")
    env.insert("PIP_NO_INPUT", "1")
    return env


class StepRunner(QObject):
    """Runs :class:`backend_setup.Step` commands one after the other, logging everything to ``log``."""

    stepStarted = pyqtSignal(int, int, str)  # index, count, title
    progress = pyqtSignal(float)  # overall fraction
    line = pyqtSignal(str)
    finished = pyqtSignal(bool, str)  # ok, message (on failure: what failed, the log, the command)

    def __init__(self, steps: List[bs.Step], log: Path, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.steps = steps
        self.log = log
        self.index = -1
        self.done = False
        self.ok = False
        self.message = ""
        self.tail: List[str] = []
        self._buffer = ""
        self._cancelled = False
        self.proc: Optional[QProcess] = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._write(f"== MapQuery RS backend setup, {datetime.datetime.now().isoformat(timespec='seconds')}")
        self._next()

    def cancel(self) -> None:
        self._cancelled = True
        if self.proc is not None and self.proc.state() != QProcess.NotRunning:
            self.proc.kill()

    # -- internals ------------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def _next(self) -> None:
        self.index += 1
        if self.index >= len(self.steps):
            self._finish(True, f"The backend's environment is ready. Log: {self.log}")
            return
        step = self.steps[self.index]
        self.tail = []
        self.stepStarted.emit(self.index, len(self.steps), step.title)
        self.progress.emit(self.index / len(self.steps))
        self._write(f"\n== step {self.index + 1}/{len(self.steps)}: {step.title}\n$ {step.shell()}")
        env = _clean_environment()
        for key, value in step.env.items():
            env.insert(key, value)
        proc = QProcess(self)
        proc.setProcessEnvironment(env)
        proc.setProcessChannelMode(QProcess.MergedChannels)
        proc.readyReadStandardOutput.connect(self._read)
        proc.finished.connect(self._step_done)
        proc.errorOccurred.connect(self._error)
        self.proc = proc
        proc.start(step.argv[0], step.argv[1:])

    def _read(self) -> None:
        if self.proc is None:
            return
        self._buffer += bytes(self.proc.readAllStandardOutput()).decode("utf-8", "replace").replace("\r", "\n")
        *lines, self._buffer = self._buffer.split("\n")
        for text in lines:
            if not text.strip():
                continue
            self._write(text)
            self.tail = (self.tail + [text])[-20:]
            match = PROGRESS_LINE.match(text)
            if match:
                self.progress.emit((self.index + min(float(match.group(1)), 1.0)) / len(self.steps))
            self.line.emit(text)

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart and not self.done:
            step = self.steps[self.index]
            self._write(f"cannot run {step.argv[0]}: {self.proc.errorString() if self.proc else error}")
            self._finish(False, bs.failure_message(step, -1, self.log, [f"cannot run {step.argv[0]}"]))

    def _step_done(self, code: int, status: QProcess.ExitStatus) -> None:
        if self.done:
            return
        self._read()
        step = self.steps[self.index]
        self._write(f"== exit code {code}")
        if self._cancelled:
            self._finish(False, f"Setup cancelled during '{step.title}'. Log: {self.log}")
        elif code != 0 or status != QProcess.NormalExit:
            self._finish(False, bs.failure_message(step, code, self.log, self.tail))
        else:
            self._next()

    def _finish(self, ok: bool, message: str) -> None:
        self.done, self.ok, self.message = True, ok, message
        self._write(("== done: " if ok else "== FAILED: ") + message)
        if ok:
            self.progress.emit(1.0)
        self.finished.emit(ok, message)


class SetupDialog(QDialog):
    """Choose the Python and the package source, then watch the setup. ``on_ready(settings)`` is called
    with the settings naming the new environment, only when every step succeeded."""

    def __init__(self, settings: Settings, profile_dir: str, on_ready: Optional[Callable[[Settings], None]] = None,
                 parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.setWindowTitle("MapQuery RS: set up the backend")
        self.base_settings = settings
        self.profile_dir = profile_dir
        self.on_ready = on_ready
        self.venv = bs.venv_dir(profile_dir)
        self.log = bs.log_path(profile_dir)
        self.source_dir = default_backend_dir()
        self.runner: Optional[StepRunner] = None
        self.gpu: Optional[bs.Gpu] = None  # detected in a thread (nvidia-smi can be slow)
        self._gpu_future = _POOL.submit(bs.detect_gpu)

        intro = QLabel("The backend (torch and the models) runs in a Python environment of its own, outside "
                       "QGIS's Python. This sets one up in your QGIS profile folder; it downloads about 1 GB "
                       "(CPU) to 4 GB (CUDA) from PyPI unless you choose another package source.")
        intro.setWordWrap(True)
        form = QFormLayout()
        self.python_edit = QLineEdit(bs.find_python() or "")
        self.python_edit.setPlaceholderText("no python3 found: choose one (3.10 or newer)")
        self.source_combo = QComboBox()
        for key, text in bs.SOURCES.items():
            self.source_combo.addItem(text, key)
        self.path_edit = QLineEdit()
        self.path_row = self._with_browse(self.path_edit, self._browse_source)
        form.addRow("Python to create it with", self._with_browse(self.python_edit, self._browse_python))
        form.addRow("Packages from", self.source_combo)
        self.path_label = QLabel("Folder")
        form.addRow(self.path_label, self.path_row)
        self.gpu_label = QLabel("looking for an NVIDIA GPU…")
        self.gpu_label.setWordWrap(True)
        form.addRow("GPU", self.gpu_label)
        target = QLabel(str(self.venv))
        target.setWordWrap(True)
        form.addRow("Environment", target)
        self.step_label = QLabel("")
        self.step_label.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.output = QPlainTextEdit()
        self.output.setReadOnly(True)
        self.output.setMaximumBlockCount(500)
        self.output.setMinimumHeight(120)
        self.error_label = QLabel("")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.error_label.setStyleSheet("color: #b00")
        self.start_btn = QPushButton("Set up")
        self.start_btn.clicked.connect(self.start)
        self.close_btn = QPushButton("Cancel")
        self.close_btn.clicked.connect(self.cancel_or_close)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.start_btn)
        buttons.addWidget(self.close_btn)
        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addLayout(form)
        lay.addWidget(self.step_label)
        lay.addWidget(self.bar)
        lay.addWidget(self.output, 1)
        lay.addWidget(self.error_label)
        lay.addLayout(buttons)
        self.source_combo.currentIndexChanged.connect(self._source_changed)
        self._source_changed()
        if not self.python_edit.text():
            self.error_label.setText(bs.no_python_message())
        self._gpu_timer = QTimer(self)
        self._gpu_timer.timeout.connect(self._gpu_detected)
        self._gpu_timer.start(100)

    def _gpu_detected(self) -> bool:
        if self.gpu is None and self._gpu_future.done():
            self.gpu = self._gpu_future.result()
            self.gpu_label.setText(self.gpu.describe())
            self._gpu_timer.stop()
        return self.gpu is not None

    @staticmethod
    def _with_browse(edit: QLineEdit, browse: Callable[[], None]) -> QWidget:
        box = QWidget()
        row = QHBoxLayout(box)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(edit, 1)
        btn = QPushButton("…")
        btn.setMaximumWidth(30)
        btn.clicked.connect(browse)
        row.addWidget(btn)
        return box

    def _browse_python(self) -> None:
        path = QFileDialog.getOpenFileName(self, "Choose a Python interpreter", self.python_edit.text())[0]
        if path:
            self.python_edit.setText(path)

    def _browse_source(self) -> None:
        if self.source_combo.currentData() == bs.WHEELS:
            path = QFileDialog.getExistingDirectory(self, "Choose the folder of wheels", self.path_edit.text())
        else:
            path = QFileDialog.getOpenFileName(self, "Choose that environment's python", self.path_edit.text())[0]
        if path:
            self.path_edit.setText(path)

    def _source_changed(self) -> None:
        kind = self.source_combo.currentData()
        self.path_label.setText({bs.WHEELS: "Wheel folder", bs.REUSE: "Its python"}.get(kind, ""))
        self.path_row.setVisible(kind != bs.PYPI)
        self.path_label.setVisible(kind != bs.PYPI)
        self.path_edit.setPlaceholderText({bs.WHEELS: "a folder of .whl files (pip --no-index --find-links)",
                                           bs.REUSE: "e.g. /opt/venv/bin/python (must have torch, open_clip …)"}
                                          .get(kind, ""))

    def source(self) -> bs.PackageSource:
        return bs.PackageSource(self.source_combo.currentData(), self.path_edit.text().strip())

    # -- running --------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.runner is not None and not self.runner.done

    def start(self) -> bool:
        """Begin the setup (returns at once); False when it cannot begin (the reason is shown)."""
        if self.running:
            return False
        self.error_label.setText("")
        if not self._gpu_detected():
            self.error_label.setText("Still looking for a GPU (nvidia-smi); try again in a moment.")
            return False
        python = self.python_edit.text().strip()
        source = self.source()
        try:
            if source.kind != bs.REUSE and not (python and bs.python_version(python)):
                raise bs.SetupError(bs.no_python_message() if not python else
                                    f"{python} is not a Python 3.10+ that can create virtualenvs")
            if not self.source_dir:
                raise bs.SetupError("the backend's source (backend/, pyproject.toml) is not in this plugin folder: "
                                    "reinstall the plugin from its zip")
            steps = bs.plan(python, self.venv, self.source_dir, source, self.gpu)
        except (bs.SetupError, OSError) as exc:
            self.error_label.setText(f"Cannot set up the backend: {exc}")
            return False
        self.output.clear()
        self.runner = StepRunner(steps, self.log, self)
        self.runner.stepStarted.connect(lambda i, n, title: self.step_label.setText(f"Step {i + 1} of {n}: {title}…"))
        self.runner.progress.connect(lambda f: self.bar.setValue(int(1000 * f)))
        self.runner.line.connect(self.output.appendPlainText)
        self.runner.finished.connect(self._finished)
        for w in (self.start_btn, self.python_edit, self.source_combo, self.path_edit):
            w.setEnabled(False)
        self.runner.start()
        return True

    def _finished(self, ok: bool, message: str) -> None:
        for w in (self.start_btn, self.python_edit, self.source_combo, self.path_edit):
            w.setEnabled(True)
        self.close_btn.setText("Close")
        if not ok:
            self.step_label.setText("The setup did not complete; nothing in the MapQuery settings was changed.")
            self.error_label.setText(message)
            return
        self.step_label.setText(f"Done: the backend's environment is ready ({self.venv}).")
        new = dataclasses.replace(self.base_settings, mode="start", backend_python=str(bs.venv_python(self.venv)),
                                  backend_dir=self.source_dir)
        if self.on_ready is not None:
            self.on_ready(new)
        self.accept()

    def cancel_or_close(self) -> None:
        if self.running:
            assert self.runner is not None
            self.runner.cancel()
        else:
            self.reject()

    def reject(self) -> None:  # Esc or the window's close button: a running step is killed, not orphaned
        if self.running:
            assert self.runner is not None
            self.runner.cancel()
        super().reject()


def first_run_box(parent: Optional[QWidget], on_choice: Callable[[str], None]) -> QMessageBox:
    """Non-modal question shown when Start finds no backend Python: 'setup', 'connect' or 'cancel'."""
    box = QMessageBox(parent)
    box.setWindowTitle("MapQuery RS: no backend yet")
    box.setIcon(QMessageBox.Question)
    box.setText("MapQuery's backend (torch and the models) is not set up on this computer.")
    box.setInformativeText("Set it up now in an environment of its own (outside QGIS's Python), or connect to a "
                           "backend that is already running (on this machine or another one).")
    setup = box.addButton("Set up the backend…", QMessageBox.AcceptRole)
    connect = box.addButton("Connect to a running backend…", QMessageBox.ActionRole)
    box.addButton(QMessageBox.Cancel)
    box.buttons_by_choice = {"setup": setup, "connect": connect}  # for scripts and tests

    def done(_result: int) -> None:
        clicked = box.clickedButton()
        on_choice("setup" if clicked is setup else "connect" if clicked is connect else "cancel")
    box.finished.connect(done)
    box.setModal(False)
    return box


def adopt_ready_environment(settings: Settings, profile_dir: str) -> bool:
    """Fill in an environment that an earlier setup completed (settings lost, plugin reinstalled)."""
    venv = bs.venv_dir(profile_dir)
    source = default_backend_dir()
    if not (bs.is_ready(venv) and source):
        return False
    settings.backend_python, settings.backend_dir = str(bs.venv_python(venv)), source
    return True


def backend_python_usable(settings: Settings) -> bool:
    """A backend Python is set and runnable (not checked: that it has the packages; Start will say)."""
    python = settings.backend_python
    return bool(python) and os.path.isfile(python) and os.access(python, os.X_OK)


class StepsDialog(QDialog):
    """Progress, output and outcome of a few commands (e.g. the weights download)."""

    def __init__(self, title: str, steps: List[bs.Step], log: Path, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.setWindowTitle(title)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.output = QPlainTextEdit()
        self.output.setReadOnly(True)
        self.output.setMaximumBlockCount(200)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.close_btn = QPushButton("Cancel")
        lay = QVBoxLayout(self)
        for w in (self.bar, self.output, self.result_label, self.close_btn):
            lay.addWidget(w)
        self.runner = StepRunner(steps, log, self)
        self.runner.progress.connect(lambda f: self.bar.setValue(int(1000 * f)))
        self.runner.line.connect(self.output.appendPlainText)
        self.runner.finished.connect(self._finished)
        self.close_btn.clicked.connect(lambda: self.runner.cancel() if not self.runner.done else self.accept())
        self.runner.start()

    def _finished(self, ok: bool, message: str) -> None:
        self.close_btn.setText("Close")
        last = self.runner.tail[-1] if self.runner.tail else ""
        self.result_label.setText(f"Done. {last}" if ok else message)
        self.result_label.setStyleSheet("" if ok else "color: #b00")


def weights_download_step(settings: Settings, model: str) -> bs.Step:
    """``python -m backend weights --model M --download`` in the backend's environment."""
    return bs.Step(f"Download the weights of {model}",
                   [settings.backend_python, "-m", "backend", "weights", "--model", model, "--download"],
                   env={"PYTHONPATH": settings.backend_dir} if settings.backend_dir else {})


class FirstRun:
    """What the dock does when Start finds no backend Python: pick up an environment set up earlier, or ask
    (set one up / connect to a running backend) and, once set up, save the settings and start the backend.
    ``dock`` needs ``manager``, ``message``, ``open_settings(proposed)`` and ``start_backend()``."""

    def __init__(self, dock: Any):
        self.dock = dock
        self.box: Optional[QMessageBox] = None  # the question, while shown
        self.dialog: Optional[SetupDialog] = None  # the setup, while shown

    def backend_ready(self) -> bool:
        """True when Start can go on; otherwise the question is shown (once)."""
        settings = self.dock.manager.settings
        if backend_python_usable(settings):
            return True
        if adopt_ready_environment(settings, QgsApplication.qgisSettingsDirPath()):
            settings.save()
            return True
        if self.box is None:
            self.box = first_run_box(self.dock, self._choice)
            self.box.open()
        return False

    def _choice(self, choice: str) -> None:
        self.box = None
        if choice == "setup":
            self.open_setup()
        elif choice == "connect":
            self.dock.open_settings(dataclasses.replace(self.dock.manager.settings, mode="connect"))

    def open_setup(self) -> SetupDialog:
        if self.dialog is None:
            self.dialog = SetupDialog(self.dock.manager.settings, QgsApplication.qgisSettingsDirPath(), self._ready,
                                      self.dock)
            self.dialog.finished.connect(lambda _result: setattr(self, "dialog", None))
        self.dialog.show()
        return self.dialog

    def _ready(self, settings: Settings) -> None:
        self.dock.manager.settings = settings
        settings.save()
        self.dock.message("The backend's environment is ready; starting the backend.", Qgis.Success)
        self.dock.start_backend()
