"""A tiny declarative schema for operation parameters and arrays (no dependencies).

Each operation (see :mod:`shared_protocol.ops`) lists its :class:`Param` and :class:`ArraySpec`
entries; :func:`validate_params` and :func:`validate_arrays` turn a wire header into checked,
defaulted values or raise a ``bad_params`` / ``bad_array`` :class:`ProtocolError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import bad_array, bad_params

Check = Callable[[Any], Optional[str]]  # returns an error text, or None when the value is fine


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "str", "int", "float", "bool", "str_list", "float_list", "int_list", "dict", "any"
    required: bool = False
    default: Any = None
    choices: Optional[Tuple[Any, ...]] = None
    min: Optional[float] = None
    max: Optional[float] = None
    max_len: Optional[int] = None  # strings: characters; lists: items
    min_len: Optional[int] = None  # lists: items
    nullable: bool = False
    check: Optional[Check] = None
    doc: str = ""


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtypes: Tuple[str, ...]
    ndim: Tuple[int, ...]
    required: bool = True
    doc: str = ""
    mask_of: Optional[str] = None  # a mask: the image array whose pixels it marks valid (its shape minus channels)


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is not an int here


def _is_num(v: Any) -> bool:
    return (type(v) in (int, float)) and math.isfinite(v)


def _check_scalar(p: Param, value: Any, where: str) -> Any:
    k = p.kind
    if k == "str":
        if not isinstance(value, str):
            raise bad_params(f"{where} must be a string", param=p.name)
        if p.max_len is not None and len(value) > p.max_len:
            raise bad_params(f"{where} is longer than {p.max_len} characters", param=p.name)
    elif k == "int":
        if not _is_int(value):
            raise bad_params(f"{where} must be an integer", param=p.name)
    elif k == "float":
        if not _is_num(value):
            raise bad_params(f"{where} must be a finite number", param=p.name)
        value = float(value)
    elif k == "bool":
        if type(value) is not bool:
            raise bad_params(f"{where} must be true or false", param=p.name)
    if k in ("int", "float"):
        if p.min is not None and value < p.min:
            raise bad_params(f"{where} must be >= {p.min}", param=p.name)
        if p.max is not None and value > p.max:
            raise bad_params(f"{where} must be <= {p.max}", param=p.name)
    return value


_LIST_ITEM = {"str_list": "str", "float_list": "float", "int_list": "int"}


def validate_params(specs: Sequence[Param], params: Any, op: str) -> Dict[str, Any]:
    """Check ``params`` against ``specs``; unknown keys are errors (typos must not pass silently)."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise bad_params(f"{op}: params must be an object")
    known = {p.name for p in specs}
    unknown = sorted(str(k) for k in params if k not in known)
    if unknown:
        raise bad_params(f"{op}: unknown parameter(s) {', '.join(unknown)}", unknown=unknown,
                         known=sorted(known))
    out: Dict[str, Any] = {}
    for p in specs:
        where = f"{op}: '{p.name}'"
        if p.name not in params or (params[p.name] is None and not p.nullable):
            if p.required:
                raise bad_params(f"{where} is required", param=p.name)
            out[p.name] = p.default() if callable(p.default) else p.default
            continue
        value = params[p.name]
        if value is None:
            out[p.name] = None
            continue
        if p.kind in _LIST_ITEM:
            if not isinstance(value, list):
                raise bad_params(f"{where} must be a list", param=p.name)
            if p.min_len is not None and len(value) < p.min_len:
                raise bad_params(f"{where} needs at least {p.min_len} item(s)", param=p.name)
            if p.max_len is not None and len(value) > p.max_len:
                raise bad_params(f"{where} holds more than {p.max_len} items", param=p.name)
            item = Param(p.name, _LIST_ITEM[p.kind], min=p.min, max=p.max)
            value = [_check_scalar(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        elif p.kind == "dict":
            if not isinstance(value, Mapping):
                raise bad_params(f"{where} must be an object", param=p.name)
            value = dict(value)
        elif p.kind != "any":
            value = _check_scalar(p, value, where)
        if p.choices is not None and value not in p.choices:
            raise bad_params(f"{where} must be one of {', '.join(map(str, p.choices))}", param=p.name,
                             choices=list(p.choices))
        if p.check is not None:
            problem = p.check(value)
            if problem:
                raise bad_params(f"{where} {problem}", param=p.name)
        out[p.name] = value
    return out


def validate_arrays(specs: Sequence[ArraySpec], arrays: Mapping[str, np.ndarray], op: str) -> Dict[str, np.ndarray]:
    """Check array names, dtypes and ranks against the operation's specs."""
    by_name = {s.name: s for s in specs}
    unknown = sorted(n for n in arrays if n not in by_name)
    if unknown:
        raise bad_array(f"{op}: unexpected array(s) {', '.join(unknown)}", unknown=unknown,
                        expected=sorted(by_name))
    for s in specs:
        if s.name not in arrays:
            if s.required:
                raise bad_array(f"{op}: array '{s.name}' is required", name=s.name)
            continue
        a = arrays[s.name]
        if a.dtype.name not in s.dtypes:
            raise bad_array(f"{op}: array '{s.name}' must be {' or '.join(s.dtypes)}, got {a.dtype.name}",
                            name=s.name)
        if a.ndim not in s.ndim:
            raise bad_array(f"{op}: array '{s.name}' must have {' or '.join(map(str, s.ndim))} dimensions, "
                            f"got shape {list(a.shape)}", name=s.name)
        if s.mask_of is not None:
            image = arrays.get(s.mask_of)
            if image is None:
                raise bad_array(f"{op}: array '{s.name}' comes without the '{s.mask_of}' it masks", name=s.name)
            if a.shape != image.shape[:-1]:
                raise bad_array(f"{op}: array '{s.name}' must have the shape of '{s.mask_of}' without its channels, "
                                f"{list(image.shape[:-1])}; got {list(a.shape)}", name=s.name)
    return dict(arrays)


@dataclass(frozen=True)
class OpSpec:
    """One operation of the protocol."""

    name: str
    doc: str
    params: Tuple[Param, ...] = ()
    arrays: Tuple[ArraySpec, ...] = ()
    idempotent: bool = True  # safe for the client to resend after a timeout
    long_running: bool = False  # runs on the worker (may report progress, may be cancelled)
    result_keys: Tuple[str, ...] = field(default=())
