"""The plugin's settings: how to reach (or start) the backend, timeouts and where outputs go.

Stored under ``mapquery_rs/`` in ``QgsSettings``; :class:`Settings` is a plain dataclass so that the
logic using it is testable without QGIS's settings store.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from shared_protocol.endpoints import DEFAULT_ADDRESS, launch_env, serve_command

from . import VENDOR

DEFAULT_MODEL = "georsclip-vit-b-32"
PREFIX = "mapquery_rs/"
_REPO_ROOT = Path(__file__).resolve().parents[1]
VENDORED_SOURCE = Path(__file__).resolve().parent / VENDOR  # in the zip: backend/, shared_protocol/, pyproject


def default_backend_dir() -> str:
    """The folder holding the ``backend`` package: the checkout of the project the plugin runs from, or the
    backend's source vendored in the installed zip; empty when neither is there."""
    for root in (_REPO_ROOT, VENDORED_SOURCE):
        if (root / "backend" / "__init__.py").is_file():
            return str(root)
    return ""


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
    checkpoint: str = ""  # a weights file for the model (serve --checkpoint FILE); empty: the weights folder
    extra_args: str = ""  # more 'serve' arguments, e.g. "--device cpu --adapter mine=/path/a.pt"
    offline: bool = True
    output_dir: str = ""  # empty: <project folder>/mapquery_outputs
    heatmap_opacity: float = 0.6

    # -- derived ----------------------------------------------------------------------------------
    def serve_command(self, bind: Optional[str] = None) -> List[str]:
        """The command line that starts a backend serving ``self.model`` on ``bind``."""
        args = ["--model", self.model]
        if self.checkpoint:
            args += ["--checkpoint", self.checkpoint]
        if self.offline:
            args.append("--offline")
        return serve_command(self.backend_python or sys.executable, bind or self.address,
                             args + shlex.split(self.extra_args))

    def backend_env(self) -> Dict[str, str]:
        return launch_env(source_dir=self.backend_dir, token=self.token)

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
