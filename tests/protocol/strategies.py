"""Hypothesis strategies derived from the operation schemas (valid params and arrays for every op)."""
from __future__ import annotations

import string

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared_protocol.framing import ALLOWED_DTYPES
from shared_protocol.schema import OpSpec, Param

TEXT = st.text(alphabet=string.ascii_letters + " _/-éß日", min_size=1, max_size=20).filter(lambda s: s.strip())


def _scalar(kind: str, p: Param):
    if kind == "str":
        return TEXT
    if kind == "int":
        lo = int(p.min) if p.min is not None else -1000
        hi = int(p.max) if p.max is not None else 1000
        return st.integers(lo, min(hi, lo + 5000))
    if kind == "float":
        lo = p.min if p.min is not None else -1e6
        hi = p.max if p.max is not None else 1e6
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if kind == "bool":
        return st.booleans()
    raise AssertionError(kind)


# values known to pass each parameter's extra check
SPECIAL = {
    "classes": st.lists(TEXT, min_size=1, max_size=5),
    "custom_templates": st.lists(TEXT.map(lambda s: s + " {}"), min_size=1, max_size=3),
    "value_range": st.tuples(st.floats(0, 100), st.floats(101, 65535)).map(list),
    "transform": st.tuples(st.floats(0.1, 100), st.floats(-1, 1), st.floats(-1e6, 1e6), st.floats(-1, 1),
                           st.floats(-100, -0.1), st.floats(-1e6, 1e6)).map(list)
    .filter(lambda t: t[0] * t[4] - t[1] * t[3] != 0),
    "smooth": st.sampled_from([0, 1, 3, 251]),
    "queries": st.lists(TEXT, min_size=1, max_size=4),
    "target": st.text(alphabet=string.hexdigits, min_size=1, max_size=32),
    "canvas_id": st.text(alphabet="0123456789abcdef", min_size=1, max_size=64),
    "protocol": st.just(1),
    "crs": st.sampled_from(["EPSG:32618", "EPSG:4326", "OGC:CRS84",
                            'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
                            'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]]']),
    "examples": st.just({"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]}),
    "negatives": st.just({"type": "FeatureCollection", "features": []}),
    "extent": st.tuples(st.floats(-180, 0), st.floats(-90, 0), st.floats(0, 180), st.floats(0, 90)).map(list),
}


# values known to pass the checks of one operation's parameter (they win over SPECIAL)
ASCII_TEXT = st.text(alphabet=string.ascii_letters + " _-", min_size=1, max_size=20).filter(lambda s: s.strip())
SPECIAL_BY_OP = {
    ("train", "classes"): st.lists(ASCII_TEXT, min_size=2, max_size=5),
    ("train", "name"): st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=64)
    .filter(lambda s: s[0].isalnum()),
    ("train", "provenance"): st.dictionaries(ASCII_TEXT, st.one_of(ASCII_TEXT, st.integers(-5, 5)), max_size=3),
}


def param_value(p: Param, op: str = ""):
    if (op, p.name) in SPECIAL_BY_OP:
        return SPECIAL_BY_OP[(op, p.name)]
    if p.name in SPECIAL:
        return SPECIAL[p.name]
    if p.choices is not None:
        return st.sampled_from(p.choices)
    if p.kind.endswith("_list"):
        item = Param(p.name, p.kind[:-5], min=p.min, max=p.max)
        return st.lists(_scalar(item.kind, item), min_size=p.min_len or 0, max_size=min(p.max_len or 4, 4))
    return _scalar(p.kind, p)


@st.composite
def params_for(draw, spec: OpSpec):
    out = {}
    for p in spec.params:
        if p.required or draw(st.booleans()):
            out[p.name] = draw(param_value(p, spec.name))
    return out


def array_of(dtype: str, ndim: int):
    dt = ALLOWED_DTYPES[dtype]
    shapes = st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)
    if dt.kind == "b":
        values = st.booleans()
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        values = st.integers(int(info.min), int(info.max))
    else:
        values = st.floats(allow_nan=False, allow_infinity=False, width=dt.itemsize * 8)
    # hnp.arrays fills most elements from one drawn value: the same value space without one draw per element, so
    # an op with four arrays (rank: images, query images and their masks) stays within hypothesis's example size
    return shapes.flatmap(lambda shape: hnp.arrays(dt, tuple(shape), elements=values))


def mask_like(image: np.ndarray):
    """A valid mask for ``image``: uint8 of its shape without the channels, any values."""
    return hnp.arrays(np.uint8, image.shape[:-1], elements=st.integers(0, 255))


@st.composite
def arrays_for(draw, spec: OpSpec):
    out = {}
    for a in spec.arrays:
        if a.mask_of is not None:  # a mask goes only with its image, in the image's shape
            if a.mask_of in out and draw(st.booleans()):
                out[a.name] = draw(mask_like(out[a.mask_of]))
        elif a.required or draw(st.booleans()):
            out[a.name] = draw(array_of(draw(st.sampled_from(a.dtypes)), draw(st.sampled_from(a.ndim))))
    return out
