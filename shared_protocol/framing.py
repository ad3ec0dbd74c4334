"""Wire framing: one JSON header frame followed by one raw buffer frame per array.

Header (UTF-8 JSON object)::

    {"v": 1, "op": "classify", "id": "4f1c...", "params": {...}, "token": "...",
     "arrays": [{"name": "tiles", "dtype": "uint8", "shape": [8, 224, 224, 3], "nbytes": 1204224}]}

Replies carry ``"status": "ok" | "error" | "progress"`` instead of ``params`` and put their payload
under ``"result"`` (or ``"error"``). Arrays are little-endian and C-contiguous. Every descriptor is
checked (name, dtype whitelist, shape, byte count, size limits) before any array is built from a
buffer, and arrays are built with ``np.frombuffer`` (zero copy): nothing is ever unpickled or evaluated.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import ErrorCode, ProtocolError, bad_array, too_large

# dtype names allowed on the wire -> little-endian numpy dtype.
ALLOWED_DTYPES: Dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16",
                 "float32", "float64")
}
NAME_MAX_LEN = 64


@dataclass(frozen=True)
class Limits:
    """Size limits, checked before anything is allocated. All configurable on both sides."""

    max_header_bytes: int = 1 << 20  # 1 MiB of JSON
    max_arrays: int = 16
    max_ndim: int = 6
    max_array_bytes: int = 1 << 30  # 1 GiB per array (an 16384^2 RGB canvas is 768 MiB)
    max_total_bytes: int = (1 << 30) + (1 << 29)  # 1.5 GiB per message

    @property
    def max_frame_bytes(self) -> int:
        """The hard cap for one frame at the socket (ZMQ_MAXMSGSIZE), above which ZeroMQ drops the peer.

        Twice the array limit, so that a moderately oversized array still reaches the decoder and is
        answered with a typed ``too_large`` error instead of silence.
        """
        return 2 * max(self.max_header_bytes, self.max_array_bytes)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Limits":
        known = {k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__ and type(v) is int}
        return cls(**known)

    def check_frames(self, frames: Sequence[Any]) -> None:
        """Raise ``too_large`` if encoded frames would break these limits (checked before sending)."""
        sizes = [_frame_len(f) for f in frames]
        if sizes and sizes[0] > self.max_header_bytes:
            raise too_large(f"header of {sizes[0]} bytes exceeds {self.max_header_bytes}", limit="max_header_bytes")
        if len(sizes) - 1 > self.max_arrays:
            raise too_large(f"{len(sizes) - 1} arrays exceed the limit of {self.max_arrays}", limit="max_arrays")
        for size in sizes[1:]:
            if size > self.max_array_bytes:
                raise too_large(f"an array of {size} bytes exceeds the backend's limit of {self.max_array_bytes}",
                                limit="max_array_bytes")
        if sum(sizes[1:]) > self.max_total_bytes:
            raise too_large(f"arrays of {sum(sizes[1:])} bytes exceed the backend's limit of "
                            f"{self.max_total_bytes}", limit="max_total_bytes")

    def to_dict(self) -> Dict[str, int]:
        return {
            "max_header_bytes": self.max_header_bytes,
            "max_arrays": self.max_arrays,
            "max_ndim": self.max_ndim,
            "max_array_bytes": self.max_array_bytes,
            "max_total_bytes": self.max_total_bytes,
        }


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message: the JSON header and the named arrays."""

    header: Dict[str, Any]
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)


def _as_wire_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    key = arr.dtype.name
    if key not in ALLOWED_DTYPES:
        raise bad_array(f"array {name!r}: dtype {arr.dtype} cannot be sent", name=name, dtype=str(arr.dtype))
    wire = ALLOWED_DTYPES[key]
    if arr.dtype != wire:
        arr = arr.astype(wire)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray turns 0-d into 1-d)


def encode(header: Mapping[str, Any], arrays: Optional[Mapping[str, Any]] = None) -> List[Any]:
    """Build the frames of a message. Array frames are zero-copy memoryviews where possible."""
    head = dict(header)
    descriptors: List[Dict[str, Any]] = []
    buffers: List[Any] = []
    for name, value in (arrays or {}).items():
        arr = _as_wire_array(name, value)
        descriptors.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                            "nbytes": int(arr.nbytes)})
        buffers.append(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
    head["arrays"] = descriptors
    text = json.dumps(head, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    try:
        return [text.encode("utf-8"), *buffers]
    except UnicodeEncodeError:
        where = unencodable_string(head) or "?"
        raise ProtocolError(ErrorCode.BAD_PARAMS if where.startswith("params") else ErrorCode.BAD_HEADER,
                            f"string at {where[:200]} is not valid Unicode (a lone surrogate)",
                            where=where[:200]) from None


def _frame_len(frame: Any) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    if isinstance(frame, memoryview):
        return frame.nbytes
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is not None:
        return memoryview(buf).nbytes
    return len(frame)


def _frame_buffer(frame: Any) -> Any:
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else frame


def decode_header(frame: Any, limits: Limits = DEFAULT_LIMITS) -> Dict[str, Any]:
    """Parse and size-check the JSON header frame."""
    size = _frame_len(frame)
    if size > limits.max_header_bytes:
        raise too_large(f"header of {size} bytes exceeds {limits.max_header_bytes}", limit="max_header_bytes")
    raw = bytes(_frame_buffer(frame))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header is not UTF-8: {exc.reason}") from None
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_HEADER, "header must be a JSON object")
    where = unencodable_string(header)
    if where is not None:
        code = ErrorCode.BAD_PARAMS if where.startswith("params") else ErrorCode.BAD_HEADER
        rid, op = header.get("id"), header.get("op")  # still answered to the right request when readable
        raise ProtocolError(code, f"header string at {where[:200]} is not valid Unicode (a lone surrogate escape "
                            "such as \\ud800)", where=where[:200],
                            request_id=rid if isinstance(rid, str) and _encodable(rid) and len(rid) <= 64 else None,
                            op=op if isinstance(op, str) and _encodable(op) and len(op) <= 64 else None)
    return header


def unencodable_string(value: Any) -> Optional[str]:
    """Where the first string that cannot be encoded as UTF-8 (a lone surrogate: legal JSON escapes, yet not
    Unicode text) sits in a parsed JSON value, as a path such as ``params.classes[3]``; None when all are fine.

    Iterative (a deep value cannot exhaust the stack); JSON keys are checked like values.
    """
    stack: List[Tuple[Any, Any]] = [((), value)]  # (path as a linked (parent, segment) pair, value)
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return _render(path)
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not _encodable(key):
                    return _render((path, "<key>"))
                stack.append(((path, key), sub))
        elif isinstance(item, list):
            stack.extend(((path, i), sub) for i, sub in enumerate(item))
    return None


def _render(path: Any) -> str:
    parts: List[str] = []
    while path:
        path, segment = path
        parts.append(f"[{segment}]" if isinstance(segment, int) else f".{segment}")
    return "".join(reversed(parts)).lstrip(".") or "."


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def validate_descriptors(descriptors: Any, frame_sizes: Sequence[int],
                         limits: Limits = DEFAULT_LIMITS) -> List[Tuple[str, np.dtype, Tuple[int, ...]]]:
    """Check every descriptor against its buffer and the limits; return (name, dtype, shape)."""
    if not isinstance(descriptors, list):
        raise ProtocolError(ErrorCode.BAD_HEADER, "'arrays' must be a list of descriptors")
    if len(descriptors) > limits.max_arrays:
        raise too_large(f"{len(descriptors)} arrays exceed the limit of {limits.max_arrays}", limit="max_arrays")
    if len(descriptors) != len(frame_sizes):
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"header describes {len(descriptors)} arrays but {len(frame_sizes)} buffers arrived",
                            described=len(descriptors), received=len(frame_sizes))
    out = []
    seen = set()
    total = 0
    for index, (desc, size) in enumerate(zip(descriptors, frame_sizes)):
        if not isinstance(desc, dict):
            raise bad_array(f"array descriptor {index} is not an object", index=index)
        name = desc.get("name")
        if not isinstance(name, str) or not name or len(name) > NAME_MAX_LEN:
            raise bad_array(f"array descriptor {index} needs a name of 1-{NAME_MAX_LEN} characters", index=index)
        if name in seen:
            raise bad_array(f"array {name!r} appears twice", name=name)
        seen.add(name)
        dtype_name = desc.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
            raise bad_array(f"array {name!r}: dtype {dtype_name!r} is not allowed", name=name,
                            allowed=sorted(ALLOWED_DTYPES))
        dtype = ALLOWED_DTYPES[dtype_name]
        shape = desc.get("shape")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise bad_array(f"array {name!r}: shape must be a list of at most {limits.max_ndim} dimensions",
                            name=name)
        if not all(type(d) is int and d >= 0 for d in shape):
            raise bad_array(f"array {name!r}: shape entries must be non-negative integers", name=name,
                            shape=str(shape)[:200])
        # math.prod on Python ints cannot overflow, so huge lying shapes are caught here.
        expected = math.prod(shape) * dtype.itemsize
        if expected > limits.max_array_bytes:
            raise too_large(f"array {name!r} of shape {shape} needs {expected} bytes, over the limit of "
                            f"{limits.max_array_bytes}", name=name, limit="max_array_bytes")
        nbytes = desc.get("nbytes", expected)
        if type(nbytes) is not int or nbytes != expected:
            raise bad_array(f"array {name!r}: nbytes {nbytes!r} does not match shape {shape} x {dtype_name}",
                            name=name)
        if size != expected:
            raise bad_array(f"array {name!r}: buffer has {size} bytes, descriptor says {expected}", name=name,
                            expected=expected, received=size)
        total += expected
        if total > limits.max_total_bytes:
            raise too_large(f"message arrays exceed {limits.max_total_bytes} bytes", limit="max_total_bytes")
        out.append((name, dtype, tuple(shape)))
    return out


def decode_arrays(header: Mapping[str, Any], buffers: Sequence[Any],
                  limits: Limits = DEFAULT_LIMITS) -> Dict[str, np.ndarray]:
    """Validate the header's descriptors against the buffer frames, then view each buffer as an array."""
    specs = validate_descriptors(header.get("arrays", []), [_frame_len(f) for f in buffers], limits)
    arrays = {}
    for (name, dtype, shape), frame in zip(specs, buffers):
        arr = np.frombuffer(_frame_buffer(frame), dtype=dtype) if math.prod(shape) else np.zeros(0, dtype)
        arrays[name] = arr.reshape(shape)
    return arrays


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode frames (header + buffers) into a :class:`Message`, validating everything first."""
    if not frames:
        raise ProtocolError(ErrorCode.BAD_FRAME, "empty message")
    header = decode_header(frames[0], limits)
    return Message(header=header, arrays=decode_arrays(header, frames[1:], limits))
