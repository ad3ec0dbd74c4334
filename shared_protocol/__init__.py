"""The message contract between the QGIS plugin and the backend (pure Python + numpy).

``framing`` turns headers and arrays into frames and back, ``schema``/``ops`` describe each operation (``crs``:
the CRS forms accepted), ``messages`` builds and checks requests and replies, ``errors`` holds the typed errors,
``curve`` reads CURVE key files and ``client`` (which needs pyzmq) is the reliable client used by the plugin
and scripts.
"""
from .errors import ErrorCode, ProtocolError
from .framing import ALLOWED_DTYPES, DEFAULT_LIMITS, Limits
from .messages import PROTOCOL_VERSION, Reply, Request, decode_reply, decode_request, new_request_id
from .ops import OPS

__all__ = [
    "ALLOWED_DTYPES", "DEFAULT_LIMITS", "ErrorCode", "Limits", "OPS", "PROTOCOL_VERSION", "ProtocolError",
    "Reply", "Request", "decode_reply", "decode_request", "new_request_id",
]
