"""Malformed-message generator for fuzzing a live server (used by tests and ``make reliability``)."""
from __future__ import annotations

import json
import random
from typing import List

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
