"""The plugin's settings: how to reach (or start) the backend, timeouts and where outputs go.

Stored under ``mapquery_rs/`` in ``QgsSettings``; :class:`Settings` is a plain dataclass so that the
logic using it is testable without QGIS's settings store.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_MODEL = "georsclip-vit-b-32"
PREFIX = "mapquery_rs/"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def default_backend_dir() -> str:
    """The folder holding the ``backend`` package, when the plugin runs from a checkout of the project."""
    return str(_REPO_ROOT) if (_REPO_ROOT / "backend" / "__init__.py").is_file() else ""


def default_backend_python() -> str:
    venv = _REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else ""


@dataclass
class Settings:
    """Everything the plugin needs to know to talk to a backend."""

    mode: str = "start"  # "start": the plugin starts its own backend; "connect": use a running one
    address: str = DEFAULT_ADDRESS
    token: str = ""
    server_key: str = ""  # CURVE: the backend's public key (its server.key file, or 40 Z85 characters)
    client_key: str = ""  # CURVE: this client's NAME.key_secret file (allowed by the backend)
    timeout_s: float = 300.0
    retries: int = 1
    backend_python: str = field(default_factory=default_backend_python)
    backend_dir: str = field(default_factory=default_backend_dir)  # added to PYTHONPATH of the backend
    model: str = DEFAULT_MODEL
    extra_args: str = ""  # more 'serve' arguments, e.g. "--device cpu --adapter mine=/path/a.pt"
    offline: bool = True
    output_dir: str = ""  # empty: <project folder>/mapquery_outputs
    heatmap_opacity: float = 0.6

    # -- derived ----------------------------------------------------------------------------------
    def serve_command(self, bind: Optional[str] = None) -> List[str]:
        """The command line that starts a backend serving ``self.model`` on ``bind``."""
        python = self.backend_python or sys.executable
        cmd = [python, "-m", "backend", "serve", "--bind", bind or self.address, "--model", self.model]
        if self.offline:
            cmd.append("--offline")
        cmd += shlex.split(self.extra_args)
        return cmd

    def backend_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.token:
            env["MAPQUERY_TOKEN"] = self.token
        if self.backend_dir:
            env["PYTHONPATH"] = self.backend_dir + os.pathsep + env.get("PYTHONPATH", "")
        return env

    # -- storage ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, store: Any = None) -> "Settings":
        """Read from ``QgsSettings`` (or any object with ``value(key, default)``)."""
        if store is None:
            from qgis.core import QgsSettings
            store = QgsSettings()
        base = cls()
        values: Dict[str, Any] = {}
        for f in fields(cls):
            default = getattr(base, f.name)
            raw = store.value(PREFIX + f.name, default)
            values[f.name] = _coerce(raw, default)
        return cls(**values)

    def save(self, store: Any = None) -> None:
        if store is None:
            from qgis.core import QgsSettings
            store = QgsSettings()
        for key, value in asdict(self).items():
            store.setValue(PREFIX + key, value)


def _coerce(raw: Any, default: Any) -> Any:
    if raw is None:
        return default
    try:
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        return default
