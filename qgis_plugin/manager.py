"""The backend the plugin talks to: started by the plugin (and stopped when QGIS quits) or a running one."""
from __future__ import annotations

from typing import List, Optional

from shared_protocol.endpoints import access_refusal, curve_keys_arg, is_loopback

from .backend_process import STOPPED, BackendProcess
from .settings import Settings

__all__ = ["BackendManager", "is_loopback"]


class BackendManager:
    """Owns at most one backend process; everything else just reads the settings."""

    def __init__(self, settings: Optional[Settings] = None):
        self.settings = settings or Settings()
        self.process: Optional[BackendProcess] = None
        self._stopping: Optional[BackendProcess] = None  # stopped without waiting, maybe still winding down

    @property
    def managed(self) -> bool:
        return self.settings.mode == "start"

    def start(self) -> BackendProcess:
        """Start (or restart) the backend with the current settings; returns at once."""
        self.stop()
        if self._stopping is not None:  # its port must be free before the next backend binds it
            self._stopping.stop()
            self._stopping = None
        command = self.settings.serve_command()
        refusal = access_refusal(self.settings.address, self.settings.token, curve_keys_arg(command))
        if refusal:  # the backend's own rule, said before starting it
            raise ValueError(refusal)
        self.process = BackendProcess(command, env=self.settings.backend_env(),
                                      cwd=self.settings.backend_dir or None).start()
        return self.process

    def stop(self, wait: bool = True) -> None:
        """Stop the plugin's backend; ``wait=False`` returns at once (for QGIS's main thread)."""
        if self.process is not None:
            self.process.stop(wait=wait)
            if not wait:
                self._stopping = self.process
            self.process = None

    def process_state(self) -> str:
        """starting / ready / failed / stopped, or 'external' for a backend the plugin does not own."""
        if not self.managed:
            return "external"
        return self.process.state() if self.process is not None else STOPPED

    def failure(self) -> str:
        return self.process.failure_reason() if self.process is not None else ""

    def output(self) -> List[str]:
        return list(self.process.output) if self.process is not None else []
