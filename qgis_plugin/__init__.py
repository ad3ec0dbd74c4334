"""MapQuery RS: ask the map with remote-sensing CLIP models served by a local ZeroMQ backend.

In the repository ``shared_protocol`` is a sibling of this folder; in the installable zip it is vendored
inside it, under ``_vendor/``. This module appends that folder to ``sys.path`` only when the vendored copy
is there and ``shared_protocol`` is not importable already. (Only ``_vendor`` goes on the path, never the
plugin folder itself, whose module names - ``processing``, ``settings``, ... - would shadow others.)
"""
from __future__ import annotations

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = "_vendor"


def _ensure_shared_protocol() -> None:
    if importlib.util.find_spec("shared_protocol") is not None:
        return
    vendor = os.path.join(_HERE, VENDOR)
    if os.path.isdir(os.path.join(vendor, "shared_protocol")) and vendor not in sys.path:
        sys.path.append(vendor)


_ensure_shared_protocol()


def classFactory(iface):  # noqa: N802 (QGIS's name)
    """QGIS entry point."""
    from .plugin import MapQueryPlugin
    return MapQueryPlugin(iface)
