"""Typed errors shared by the backend and its clients.

Every failure that crosses the wire is an :class:`ProtocolError` with a stable ``code`` (one of
:class:`ErrorCode`), a human-readable ``message`` and a JSON-safe ``details`` mapping.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional


class ErrorCode:
    """Stable error codes. Clients branch on these, never on message text."""

    BAD_FRAME = "bad_frame"  # wrong number of frames, empty message
    BAD_HEADER = "bad_header"  # header is not valid UTF-8 JSON object or misses fields
    UNSUPPORTED_VERSION = "unsupported_version"  # protocol major version differs
    UNKNOWN_OP = "unknown_op"
    BAD_PARAMS = "bad_params"  # params fail the operation's schema
    BAD_ARRAY = "bad_array"  # descriptor invalid, dtype not allowed, shape/bytes lie
    TOO_LARGE = "too_large"  # a size limit was exceeded
    UNAUTHORIZED = "unauthorized"  # missing or wrong token
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"  # client side: no reply within the timeout after all retries
    UNAVAILABLE = "unavailable"  # client side: backend not reachable / heartbeat lost
    BUSY = "busy"  # server queue is full
    NOT_FOUND = "not_found"  # unknown adapter, preset, file ...
    MODEL_ERROR = "model_error"  # model could not be loaded or failed
    INTERNAL = "internal"  # a bug: the server caught an unexpected exception

    ALL = frozenset(
        {
            BAD_FRAME, BAD_HEADER, UNSUPPORTED_VERSION, UNKNOWN_OP, BAD_PARAMS, BAD_ARRAY,
            TOO_LARGE, UNAUTHORIZED, CANCELLED, TIMEOUT, UNAVAILABLE, BUSY, NOT_FOUND,
            MODEL_ERROR, INTERNAL,
        }
    )


class ProtocolError(Exception):
    """An error with a stable code, sendable over the wire."""

    def __init__(self, code: str, message: str, details: Optional[Mapping[str, Any]] = None, **more: Any):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.details: Dict[str, Any] = {**(details or {}), **more}

    def to_dict(self) -> Dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_dict(cls, data: Any) -> "ProtocolError":
        if not isinstance(data, Mapping):
            return cls(ErrorCode.BAD_HEADER, f"malformed error object: {data!r}")
        code = data.get("code") if isinstance(data.get("code"), str) else ErrorCode.INTERNAL
        message = data.get("message") if isinstance(data.get("message"), str) else "unknown error"
        details = data.get("details") if isinstance(data.get("details"), Mapping) else {}
        return cls(code, message, details)

    def __reduce__(self):  # keep exceptions copyable / picklable inside one process
        return (self.__class__, (self.code, self.message, self.details))


def bad_params(message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PARAMS, message, details)


def bad_array(message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_ARRAY, message, details)


def too_large(message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_LARGE, message, details)
