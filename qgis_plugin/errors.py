"""Plain-words messages for the errors a user can meet (branching on ``ProtocolError.code`` only)."""
from __future__ import annotations

from typing import Optional

from shared_protocol import ErrorCode, ProtocolError

_PLAIN = {
    ErrorCode.TIMEOUT: "The backend did not answer in time. It may be busy with a large request: try a smaller "
                       "area or a coarser resolution, or raise the timeout in the MapQuery settings.",
    ErrorCode.UNAVAILABLE: "The backend is not reachable. Start it (MapQuery settings > start the backend) or "
                           "check the address.",
    ErrorCode.CANCELLED: "Cancelled.",
    ErrorCode.UNAUTHORIZED: "The backend refused the access token. Check the token in the MapQuery settings.",
    ErrorCode.UNSUPPORTED_VERSION: "The backend speaks another protocol version: update the plugin or the "
                                   "backend so that they match.",
    ErrorCode.TOO_LARGE: "The request is too large for the backend. Use a smaller area or a coarser "
                         "resolution.",
    ErrorCode.BUSY: "The backend is busy with other requests. Try again in a moment.",
    ErrorCode.NOT_FOUND: "The backend does not know this item",
    ErrorCode.MODEL_ERROR: "The model failed",
    ErrorCode.BAD_PARAMS: "The backend rejected the request",
    ErrorCode.BAD_ARRAY: "The backend rejected the image data",
    ErrorCode.UNKNOWN_OP: "The backend does not support this operation; it may be an older version.",
    ErrorCode.INTERNAL: "The backend hit an internal error",
}
_WITH_DETAIL = {ErrorCode.NOT_FOUND, ErrorCode.MODEL_ERROR, ErrorCode.BAD_PARAMS, ErrorCode.BAD_ARRAY,
                ErrorCode.INTERNAL, ErrorCode.TOO_LARGE}


_CURVE_REASONS = {  # the client's reasons for a failed CURVE handshake
    "curve_key_refused": "The backend refused this client's CURVE key: add its public key to the backend's "
                         "allow-list (python -m backend keys allow), or choose the right client key in the settings.",
    "handshake_failed": "The secure handshake with the backend failed: check the server's public key in the "
                        "MapQuery settings (the backend may also not use CURVE, or use it when no key is set).",
}


class PluginError(Exception):
    """A failure on the plugin side (capture, file writing) with a message meant for the user."""


def plain_message(exc: BaseException, action: Optional[str] = None) -> str:
    """A one-line message for the message bar: what went wrong and what to do."""
    prefix = f"{action}: " if action else ""
    if isinstance(exc, ProtocolError):
        text = _PLAIN.get(exc.code, f"Backend error ({exc.code})")
        if exc.code in _WITH_DETAIL and exc.message:
            text = f"{text.rstrip('.')}: {exc.message}"
        elif exc.code == ErrorCode.UNAUTHORIZED and exc.details.get("reason") in _CURVE_REASONS:
            text = _CURVE_REASONS[exc.details["reason"]]
        return prefix + text
    if isinstance(exc, PluginError):
        return prefix + str(exc)
    if isinstance(exc, OSError):
        return prefix + f"Cannot read or write a file: {exc.strerror or exc}" + (
            f" ({exc.filename})" if getattr(exc, "filename", None) else "")
    return prefix + f"Unexpected error: {type(exc).__name__}: {exc}"


def is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, ProtocolError) and exc.code == ErrorCode.CANCELLED
