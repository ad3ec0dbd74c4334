"""``QgsTask`` wrapper: a processor runs in the background with progress and cancel; layers are added in
``finished()`` on the main thread."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional

from qgis.core import QgsApplication, QgsProject, QgsTask

from .connection import make_client
from .errors import plain_message
from .layers import add_group, classification_layer, heatmap_layer, ranking_layer, regions_layer, set_provenance
from .tools.base import Feedback, Outcome
from .settings import Settings


class MapQueryTask(QgsTask):
    """Runs one processor with its own client (one ZeroMQ socket per task/thread)."""

    def __init__(self, processor: Any, settings: Settings,
                 on_done: Optional[Callable[["MapQueryTask"], None]] = None,
                 client_factory: Optional[Callable[[], Any]] = None):
        super().__init__(f"MapQuery {processor.title}", QgsTask.CanCancel)
        self.processor = processor
        self.settings = settings
        self.on_done = on_done
        self.client_factory = client_factory or (lambda: make_client(settings))
        self.cancel_event = threading.Event()
        self.outcome: Optional[Outcome] = None
        self.error: Optional[BaseException] = None
        self.done = False

    def run(self) -> bool:  # worker thread: no widgets, no layers
        feedback = Feedback(lambda p, m: self.setProgress(100.0 * p), self.cancel_event)
        try:
            client = self.client_factory()
            try:
                self.outcome = self.processor.run(client, feedback)
            finally:
                client.close()
            return True
        except BaseException as exc:  # noqa: BLE001 - reported on the main thread
            self.error = exc
            return False

    def cancel(self) -> None:
        self.cancel_event.set()
        super().cancel()

    def finished(self, result: bool) -> None:  # main thread
        self.done = True
        if self.on_done is not None:
            self.on_done(self)

    def message(self) -> str:
        return plain_message(self.error, self.processor.title) if self.error else ""


def build_layers(outcome: Outcome, opacity: float = 0.6) -> List[Any]:
    """Styled map layers for an outcome's files, with their provenance as metadata (main thread)."""
    layers = []
    for spec in outcome.layers:
        if spec.kind == "heatmap":
            layer = heatmap_layer(spec.path, spec.name, opacity)
        elif spec.kind == "classification":
            layer = classification_layer(spec.path, spec.name, spec.classes)
        elif spec.kind == "ranking":
            layer = ranking_layer(spec.path, spec.name)
        elif spec.kind == "regions":
            layer = regions_layer(spec.path, spec.name)
        else:
            continue
        layers.append(set_provenance(layer, spec.provenance))
    return layers


def add_outcome(outcome: Outcome, project: Optional[QgsProject] = None, opacity: float = 0.6):
    """Load an outcome's files as styled layers grouped under its title; returns (group, layers)."""
    layers = build_layers(outcome, opacity)
    return add_group(outcome.group_name(), layers, project), layers


def run_and_wait(task: MapQueryTask, timeout: float = 300.0, cancel_after: Optional[float] = None) -> MapQueryTask:
    """Queue a task in QGIS's task manager and spin the event loop until it is finished (scripts, tests)."""
    QgsApplication.taskManager().addTask(task)
    start = time.monotonic()
    while not task.done:
        QgsApplication.processEvents()
        if cancel_after is not None and time.monotonic() - start > cancel_after and not task.cancel_event.is_set():
            task.cancel()
        if time.monotonic() - start > timeout:
            task.cancel()
            raise TimeoutError(f"task {task.description()} did not finish within {timeout:g} s")
        time.sleep(0.01)
    return task
