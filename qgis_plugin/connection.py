"""Clients built from the settings, and a quick status probe."""
from __future__ import annotations

from typing import Any, Dict, Optional

from shared_protocol import PROTOCOL_VERSION
from shared_protocol.client import Client

from .settings import Settings


def make_client(settings: Settings, *, timeout: Optional[float] = None, retries: Optional[int] = None) -> Client:
    """One client per task or thread (ZeroMQ sockets are not thread-safe)."""
    return Client(settings.address, token=settings.token or None,
                  server_public_key=settings.server_key or None, client_secret_file=settings.client_key or None,
                  timeout=settings.timeout_s if timeout is None else timeout,
                  retries=settings.retries if retries is None else retries,
                  name=f"mapquery-qgis-plugin/{PROTOCOL_VERSION}")


def probe(settings: Settings, timeout: float = 3.0) -> Dict[str, Any]:
    """``hello`` with a short timeout and no retries; raises ``ProtocolError`` when the backend is down."""
    with make_client(settings, timeout=timeout, retries=0) as client:
        return client.hello()


def describe(info: Dict[str, Any]) -> Dict[str, str]:
    """The status fields shown in the dock, from a ``hello``/``info`` reply."""
    model = info.get("model") or {}
    device = info.get("device") or {}
    adapters = [a.get("name", "?") for a in info.get("adapters") or []]
    weights = "random weights (answers are meaningless)" if model.get("random_weights") else str(
        model.get("weights", ""))
    return {
        "model": f"{model.get('name', '?')} ({model.get('arch', '?')})",
        "weights": weights,
        "adapters": ", ".join(adapters) if adapters else "none",
        "device": " ".join(str(v) for v in (device.get("type"), device.get("name"), device.get("precision")) if v)
        + (" (GPU in use)" if device.get("type") == "cuda" else
           f" (GPU not used: {device['reason']})" if device.get("reason") else ""),
        "protocol": str(info.get("protocol", "?")),
        "backend_version": str(info.get("backend_version", "?")),
    }
