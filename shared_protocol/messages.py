"""Requests and replies: building, encoding and checked decoding."""
from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from . import framing
from .errors import ErrorCode, ProtocolError
from .framing import DEFAULT_LIMITS, Limits
from .ops import OPS
from .schema import validate_arrays, validate_params

PROTOCOL_VERSION = 1
STATUSES = ("ok", "error", "progress")


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Request:
    op: str
    id: str
    params: Dict[str, Any] = field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    token: Optional[str] = None
    version: int = PROTOCOL_VERSION

    def encode(self) -> List[Any]:
        header: Dict[str, Any] = {"v": self.version, "op": self.op, "id": self.id, "params": self.params}
        if self.token is not None:
            header["token"] = self.token
        return framing.encode(header, self.arrays)


@dataclass
class Reply:
    id: Optional[str]
    op: Optional[str]
    status: str = "ok"
    result: Dict[str, Any] = field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    error: Optional[ProtocolError] = None
    progress: Optional[float] = None
    message: Optional[str] = None  # progress text
    version: int = PROTOCOL_VERSION

    @classmethod
    def ok(cls, request_id: Optional[str], op: Optional[str], result: Optional[Mapping[str, Any]] = None,
           arrays: Optional[Mapping[str, Any]] = None) -> "Reply":
        return cls(request_id, op, "ok", dict(result or {}), dict(arrays or {}))

    @classmethod
    def failure(cls, request_id: Optional[str], op: Optional[str], error: ProtocolError) -> "Reply":
        return cls(request_id, op, "error", error=error)

    @classmethod
    def progress_update(cls, request_id: str, op: str, fraction: float, message: str = "") -> "Reply":
        return cls(request_id, op, "progress", progress=float(min(max(fraction, 0.0), 1.0)), message=message)

    def encode(self) -> List[Any]:
        header: Dict[str, Any] = {"v": self.version, "id": self.id, "op": self.op, "status": self.status}
        if self.status == "ok":
            header["result"] = self.result
        elif self.status == "error":
            assert self.error is not None
            header["error"] = self.error.to_dict()
        else:
            header["progress"] = self.progress
            header["message"] = self.message or ""
        return framing.encode(header, self.arrays if self.status == "ok" else None)


def _request_id_of(header: Mapping[str, Any]) -> Optional[str]:
    rid = header.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 else None


def decode_request(frames: List[Any], limits: Limits = DEFAULT_LIMITS, *,
                   expected_token: Optional[str] = None) -> Request:
    """Decode and fully validate a request. Errors carry ``details['request_id']`` when it was readable.

    With ``expected_token`` set, the token is checked (in constant time) before the parameters and arrays.
    """
    header = framing.decode_header(frames[0], limits) if frames else None
    if header is None:
        raise ProtocolError(ErrorCode.BAD_FRAME, "empty message")
    rid = _request_id_of(header)
    try:
        if rid is None:
            raise ProtocolError(ErrorCode.BAD_HEADER, "header needs an 'id' string of 1-64 characters")
        version = header.get("v")
        if type(version) is not int:
            raise ProtocolError(ErrorCode.BAD_HEADER, "header needs an integer protocol version 'v'")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                f"client speaks protocol {version}, this server speaks {PROTOCOL_VERSION}",
                                client=version, server=PROTOCOL_VERSION)
        token = header.get("token")
        if token is not None and not isinstance(token, str):
            raise ProtocolError(ErrorCode.BAD_HEADER, "'token' must be a string")
        if expected_token is not None and not hmac.compare_digest(
                (token or "").encode("utf-8"), expected_token.encode("utf-8")):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or wrong access token")
        op = header.get("op")
        if not isinstance(op, str) or op not in OPS:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown operation {str(op)[:64]!r}",
                                known=sorted(OPS))
        spec = OPS[op]
        params = validate_params(spec.params, header.get("params"), op)
        if op == "hello" and params["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                f"client speaks protocol {params['protocol']}, this server speaks "
                                f"{PROTOCOL_VERSION}: update the plugin or the backend so they match",
                                client=params["protocol"], server=PROTOCOL_VERSION)
        # descriptors are checked against the buffers and the limits before any array is built
        arrays = validate_arrays(spec.arrays, framing.decode_arrays(header, frames[1:], limits), op)
        return Request(op=op, id=rid, params=params, arrays=arrays, token=token, version=version)
    except ProtocolError as exc:
        exc.details.setdefault("request_id", rid)
        exc.details.setdefault("op", header.get("op") if isinstance(header.get("op"), str) else None)
        raise


def decode_reply(frames: List[Any], limits: Limits = DEFAULT_LIMITS) -> Reply:
    """Decode a reply; a malformed one raises ``bad_header``/``bad_array``."""
    message = framing.decode(frames, limits)
    h = message.header
    status = h.get("status")
    if status not in STATUSES:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"reply has an unknown status {status!r}")
    rid = h.get("id") if isinstance(h.get("id"), str) else None
    op = h.get("op") if isinstance(h.get("op"), str) else None
    version = h.get("v") if type(h.get("v")) is int else PROTOCOL_VERSION
    if status == "ok":
        result = h.get("result", {})
        if not isinstance(result, dict):
            raise ProtocolError(ErrorCode.BAD_HEADER, "reply 'result' must be an object")
        return Reply(rid, op, "ok", result, message.arrays, version=version)
    if status == "error":
        return Reply(rid, op, "error", error=ProtocolError.from_dict(h.get("error")), version=version)
    progress = h.get("progress")
    fraction = float(progress) if type(progress) in (int, float) else 0.0
    text = h.get("message") if isinstance(h.get("message"), str) else ""
    return Reply(rid, op, "progress", progress=fraction, message=text, version=version)
