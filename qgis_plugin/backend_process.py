"""Start and stop a backend server process owned by the plugin (or the demo and the tests).

The process is started with ``python -m backend serve ...``; a reader thread collects its output and
flags readiness ("ready on ...") or failure ("cannot start: ..."). Starting never blocks the caller:
poll :meth:`BackendProcess.state` or block in :meth:`wait_ready` where blocking is fine.
"""
from __future__ import annotations

import atexit
import subprocess
import threading
import time
from typing import Dict, List, Optional, Sequence

from shared_protocol.endpoints import CANNOT_START, free_port, is_ready_line

__all__ = ["BackendProcess", "CANNOT_START", "FAILED", "READY", "STARTING", "STOPPED", "free_port", "start_and_wait"]
STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"
_LIVE: "set[BackendProcess]" = set()


class BackendProcess:
    """One backend server subprocess."""

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 max_lines: int = 500):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.max_lines = max_lines
        self.output: List[str] = []
        self.proc: Optional[subprocess.Popen] = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._state = STOPPED

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "BackendProcess":
        """Launch the process (returns at once)."""
        if self.running:
            return self
        self.output = []
        self._ready.clear()
        self._done.clear()
        self._state = STARTING
        try:
            self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, text=True, env=self.env, cwd=self.cwd,
                                         bufsize=1, start_new_session=True)
        except OSError as exc:
            self._state = FAILED
            self.output.append(f"backend: cannot start (not_found): {exc.strerror or exc}: {self.command[0]}")
            self._done.set()
            return self
        _LIVE.add(self)
        threading.Thread(target=self._pump, name="mapquery-backend-output", daemon=True).start()
        return self

    def _pump(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line.rstrip("\n"))
            del self.output[:-self.max_lines]
            if is_ready_line(line) and self._state == STARTING:
                self._state = READY
                self._ready.set()
        proc.wait()
        if self._state != STOPPED:
            self._state = FAILED if self._state == STARTING else STOPPED
        self._ready.set()
        self._done.set()

    def wait_ready(self, timeout: float = 180.0) -> bool:
        """Block until ready (True) or failed/exited/timed out (False)."""
        self._ready.wait(timeout)
        return self._state == READY and self.running

    def stop(self, timeout: float = 10.0, wait: bool = True) -> Optional[int]:
        """Terminate (then, after ``timeout``, kill) the process; returns its exit code.

        ``wait=False`` returns at once (the exit code is then None while it winds down): a thread waits
        and kills it if needed, so that a caller on QGIS's main thread never freezes.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._state = STOPPED
            proc.terminate()
            if not wait:  # stays in _LIVE (killed at exit) until the thread has reaped it
                threading.Thread(target=self._reap, args=(timeout,), name="mapquery-backend-stop",
                                 daemon=True).start()
                return proc.poll()
            self._reap(timeout)
        _LIVE.discard(self)
        self._state = STOPPED
        self._done.wait(2.0)
        return proc.returncode

    def _reap(self, timeout: float) -> None:
        proc = self.proc
        assert proc is not None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _LIVE.discard(self)

    # -- state ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def state(self) -> str:
        if self._state == READY and not self.running:
            return STOPPED if self._done.is_set() else READY
        return self._state

    def failure_reason(self) -> str:
        """The backend's own 'cannot start' line, or the last lines of its output."""
        for line in reversed(self.output):
            match = CANNOT_START.search(line)
            if match:
                return match.group(2).strip()
        tail = [line for line in self.output[-5:] if line.strip()]
        code = self.proc.returncode if self.proc is not None else None
        return "; ".join(tail) or f"the backend exited with code {code}"

    def weights_missing(self) -> bool:
        """True when the backend said ``cannot start (weights_missing): ...``."""
        return any((m := CANNOT_START.search(line)) is not None and m.group(1) == "weights_missing"
                   for line in self.output)

    def __enter__(self) -> "BackendProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_and_wait(command: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 180.0,
                   cwd: Optional[str] = None) -> BackendProcess:
    """Start a backend and wait until it is ready; on failure the process is stopped and returned as is."""
    proc = BackendProcess(command, env=env, cwd=cwd).start()
    deadline = time.monotonic() + timeout
    while not proc.wait_ready(0.2):
        if proc.state() == FAILED or time.monotonic() > deadline:
            proc.stop()
            break
    return proc


@atexit.register
def _stop_all() -> None:  # never leave a backend behind when the interpreter exits
    for proc in list(_LIVE):
        try:
            proc.stop(timeout=3.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
