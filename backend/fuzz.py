"""Malformed-message generator for fuzzing a live server (used by tests and ``make reliability``), and the
attacks of issue 11 as messages (:data:`ATTACKS`) and as raw ZMTP (a peer that speaks ZeroMQ's wire protocol by
hand, which libzmq itself never would: an unfinished multipart message, frames over the size limit)."""
from __future__ import annotations

import json
import random
import socket
import struct
from typing import Dict, List, Tuple

import numpy as np

from shared_protocol import Request

KINDS = ("random_bytes", "wrong_frame_count", "lying_shape", "huge_dims", "bad_json", "bad_utf8", "wrong_version",
         "unknown_op", "bad_params", "bad_dtype", "empty_header", "not_object", "deep_json", "bad_types")


def malformed(rng: random.Random, kind: str) -> List[bytes]:
    """One malformed request (header + buffers) of the given kind."""
    rid = f"fz-{rng.getrandbits(48):x}"
    img = np.zeros((1, 4, 4, 3), np.uint8)
    good = Request("classify", rid, {"classes": ["a"]}, {"tiles": img}).encode()
    good = [bytes(f) for f in good]
    if kind == "random_bytes":
        return [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 4))]
    if kind == "wrong_frame_count":
        return good[:1] if rng.random() < 0.5 else good + [rng.randbytes(rng.randint(0, 50))]
    header = json.loads(good[0])
    if kind == "lying_shape":
        shape = [1, 4, 4, 3]
        while int(np.prod(shape)) == len(good[1]):  # a lie: the shape never matches the buffer
            shape = [rng.randint(1, 9) for _ in range(4)]
        header["arrays"][0]["shape"] = shape
        header["arrays"][0]["nbytes"] = int(np.prod(shape))
        return [json.dumps(header).encode(), good[1]]
    if kind == "huge_dims":
        header["arrays"][0]["shape"] = [2 ** rng.randint(20, 62) for _ in range(4)]
        header["arrays"][0]["nbytes"] = rng.choice([48, 2 ** 62, -1])
        return [json.dumps(header).encode(), good[1]]
    if kind == "bad_json":
        text = good[0].decode()
        cut = rng.randint(0, len(text) - 1)
        return [text[:cut].encode() + rng.choice([b"", b"]]", b",,", b"{"]), good[1]]  # never valid JSON
    if kind == "bad_utf8":
        return [good[0][:10] + b"\xff\xfe\xc3" + good[0][10:], good[1]]
    if kind == "wrong_version":
        header["v"] = rng.choice([0, 2, 99, -1, "1", None, 1.5])
        return [json.dumps(header).encode(), good[1]]
    if kind == "unknown_op":
        header["op"] = rng.choice(["", "classifyy", "__import__", "eval", 42, None, "x" * 1000])
        return [json.dumps(header).encode(), good[1]]
    if kind == "bad_params":
        header["params"] = rng.choice([{"classes": "notalist"}, {"classes": [1, 2]}, {"classes": ["a"], "top_k": -5},
                                       {"classes": ["a"], "extra": 1}, [], "x", {"classes": ["a"] * 5000}])
        return [json.dumps(header).encode(), good[1]]
    if kind == "bad_dtype":
        header["arrays"][0]["dtype"] = rng.choice(["object", "O", "<U4", "complex64", "float128", "", 5])
        return [json.dumps(header).encode(), good[1]]
    if kind == "empty_header":
        return [b""]
    if kind == "not_object":
        return [json.dumps(rng.choice([[], 1, "s", None, [header]])).encode()]
    if kind == "deep_json":
        return [b'{"v":1,"id":"d","op":"ping","params":' + b"[" * 5000 + b"]" * 5000 + b"}"]
    if kind == "bad_types":
        header["id"] = rng.choice([None, 5, "", "y" * 100, ["a"]])
        return [json.dumps(header).encode(), good[1]]
    raise ValueError(kind)


# -- issue 11: one request each, with the error code the server must answer -------------------------------------
def _header(op: str, rid: str, params: dict, arrays: list = ()) -> bytes:
    return json.dumps({"v": 1, "op": op, "id": rid, "params": params, "arrays": list(arrays)}).encode()


def _canvas(side: int, rid: str, params: dict) -> List[bytes]:
    desc = [{"name": "canvas", "dtype": "uint8", "shape": [side, side, 3], "nbytes": side * side * 3}]
    return [_header("localize", rid, params, desc), bytes(side * side * 3)]


ATTACKS: Dict[str, Tuple[List[bytes], str]] = {
    "crs +init=/proc/self/fd/1 (PROJ blocks on a pipe)": (
        _canvas(32, "a-crs1", {"queries": ["q"], "crs": "+init=/proc/self/fd/1:x", "smooth": 0}), "bad_params"),
    "crs +init=/proc/self/fd/0": (
        _canvas(32, "a-crs0", {"queries": ["q"], "crs": "+init=/proc/self/fd/0:x", "smooth": 0}), "bad_params"),
    "crs naming a file": (_canvas(32, "a-crsf", {"queries": ["q"], "crs": "/etc/passwd", "smooth": 0}), "bad_params"),
    "crs with grids": (_canvas(32, "a-crsg", {"queries": ["q"], "smooth": 0,
                                              "crs": "+proj=longlat +nadgrids=@/proc/self/fd/0"}), "bad_params"),
    "request id with a lone surrogate": ([b'{"v":1,"op":"ping","id":"\\ud800","params":{}}'], "bad_header"),
    "class name with a lone surrogate": (
        [b'{"v":1,"op":"embed","id":"a-sur","params":{"texts":["\\udc00"]},"arrays":[]}'], "bad_params"),
    "crop_size 4096 (13 GB at its peak)": (
        _canvas(512, "a-crop", {"queries": ["q"], "crop_size": 4096, "smooth": 0}), "too_large"),
    "value_range [0, 1e-300]": (
        [_header("embed", "a-vr1", {"texts": ["a"], "value_range": [0, 1e-300]})], "bad_params"),
    "value_range [-1e308, 1e308]": (
        [_header("embed", "a-vr2", {"texts": ["a"], "value_range": [-1e308, 1e308]})], "bad_params"),
    "huge transform with polygons": (
        _canvas(32, "a-tf", {"queries": ["q"], "polygons": True, "smooth": 0,
                             "transform": [1e300, 0, 0, 0, -1e300, 0]}), "bad_params"),
}


# -- raw ZMTP 3.0 (NULL mechanism) ------------------------------------------------------------------------------
def zmtp_connect(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection that has done ZMTP's greeting and READY as a DEALER: frames can be sent by hand."""
    sock = socket.create_connection((host, port), timeout=timeout)
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
    sock.sendall(greeting)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    sock.sendall(b"\x04" + bytes([len(body)]) + body)
    return sock


def zmtp_frame(data: bytes, more: bool) -> bytes:
    """One ZMTP message frame (long form)."""
    return bytes([0x02 | (0x01 if more else 0)]) + struct.pack(">Q", len(data)) + data


def zmtp_frame_header(size: int, more: bool) -> bytes:
    """The header of a frame of ``size`` bytes, whose body the caller streams (a frame may be 1 GB)."""
    return bytes([0x02 | (0x01 if more else 0)]) + struct.pack(">Q", size)
