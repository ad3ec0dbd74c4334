"""``QgsTask`` wrapper: a processor runs in the background with progress and cancel; layers are added in
``finished()`` on the main thread."""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, List, Optional

from qgis.core import QgsApplication, QgsProject, QgsTask

from shared_protocol import ErrorCode, ProtocolError

from .connection import make_client
from .errors import plain_message
from .layers import (add_group, classification_layer, heatmap_layer, ranking_layer, regions_layer, set_provenance,
                     surface_layer)
from .tools.base import Feedback, Outcome
from .settings import Settings

CANCEL_GRACE_S = 1.0  # after a cancel, how long the task waits for the backend to confirm before it ends anyway


class Workers:
    """Daemon threads that live as long as QGIS, for the requests' work (network waits, then outputs written with
    QGIS's API: CRSs, GeoPackage writers). A thread that used PROJ must not end while QGIS runs: on QGIS 3.22 a
    PROJ-using thread ending inside a task's thread leaves QGIS's CRS caches broken, and later transforms on the
    main thread silently do nothing (ellipsoidal areas become NaN). A new thread is started only when none is
    idle."""

    def __init__(self, name: str = "mapquery-request"):
        self.name = name
        self._jobs: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self._lock = threading.Lock()
        self._idle = 0
        self.threads: List[threading.Thread] = []

    def submit(self, job: Callable[[], None]) -> threading.Event:
        """Run ``job`` on a worker; the event is set when it has returned (or raised)."""
        done = threading.Event()

        def run() -> None:
            try:
                job()
            finally:
                done.set()
        with self._lock:
            self._jobs.put(run)
            if self._idle > 0:
                self._idle -= 1
            else:
                thread = threading.Thread(target=self._loop, name=f"{self.name}-{len(self.threads)}", daemon=True)
                self.threads.append(thread)
                thread.start()
        return done

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job reports its own errors; the worker lives on
                pass
            with self._lock:
                self._idle += 1


WORKERS = Workers()


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
        """Run the processor on one of the :data:`WORKERS`, so that a cancel ends the task within
        ``CANCEL_GRACE_S`` even when the backend never answers (stopped, killed, stuck in a batch)."""
        feedback = Feedback(lambda p, m: self.setProgress(100.0 * p), self.cancel_event)
        box: dict = {}

        def work() -> None:
            try:
                client = self.client_factory()
                try:
                    box["outcome"] = self.processor.run(client, feedback)
                finally:
                    client.close()
            except BaseException as exc:  # noqa: BLE001 - reported on the main thread
                box["error"] = exc

        finished = WORKERS.submit(work)  # a thread that lives on (see Workers)
        cancelled_at: Optional[float] = None
        while not finished.wait(0.05):
            if self.isCanceled():
                self.cancel_event.set()
            if self.cancel_event.is_set():
                cancelled_at = cancelled_at or time.monotonic()
                if time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                    break  # the request's worker finishes on its own (its client gives up after a cancel)
        if self.cancel_event.is_set():  # whatever the request ended with (a dead backend ...): cancelled
            self.error = ProtocolError(ErrorCode.CANCELLED, f"{self.processor.title} cancelled")
            return False
        self.outcome, self.error = box.get("outcome"), box.get("error")
        return self.error is None

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
        elif spec.kind == "surface":
            layer = surface_layer(spec.path, spec.name, opacity)
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
