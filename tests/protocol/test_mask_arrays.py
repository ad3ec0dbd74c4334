"""Valid-pixel masks on the wire: every image array has an optional uint8 NAME_mask in its shape minus channels,
checked before any work; min_valid is a share in [0, 1]; the grid / SeLo defaults are written once."""
import numpy as np
import pytest

from shared_protocol import OPS, ErrorCode, ProtocolError, Request, decode_request
from shared_protocol import defaults
from shared_protocol.ops import MASK_DTYPES

IMAGES = {"classify": ("tiles", "canvas"), "rank": ("images", "query_images"), "localize": ("canvas",),
          "embed": ("images",)}
BASE = {"classify": {"classes": ["a"]}, "rank": {"texts": ["a"]}, "localize": {"queries": ["a"]},
        "embed": {"texts": ["a"]}}


def _image(name, n=2, h=5, w=7, c=3, dtype=np.uint8):
    return np.zeros((h, w, c) if name == "canvas" else (n, h, w, c), dtype)


def _decode(op, arrays, params=None):
    return decode_request(Request(op, "rid", {**BASE[op], **(params or {})}, arrays).encode())


def _err(op, arrays, params=None):
    with pytest.raises(ProtocolError) as e:
        _decode(op, arrays, params)
    assert e.value.details["request_id"] == "rid"
    return e.value


@pytest.mark.parametrize("op,name", [(op, n) for op, names in IMAGES.items() for n in names])
def test_each_image_array_takes_a_mask_of_its_shape(op, name):
    spec = {a.name: a for a in OPS[op].arrays}[f"{name}_mask"]
    assert spec.mask_of == name and spec.dtypes == MASK_DTYPES == ("uint8",) and not spec.required
    image = _image(name, dtype=np.uint16)
    arrays = {name: image}
    if name == "query_images":
        arrays["images"] = _image("images")
    mask = (np.arange(image[..., 0].size).reshape(image.shape[:-1]) % 3).astype(np.uint8)
    got = _decode(op, {**arrays, f"{name}_mask": mask})
    np.testing.assert_array_equal(got.arrays[f"{name}_mask"], mask)
    assert got.params["min_valid"] == defaults.MIN_VALID_SHARE  # the default is filled in


@pytest.mark.parametrize("op,name", [(op, n) for op, names in IMAGES.items() for n in names])
def test_a_mask_that_does_not_fit_its_image_is_bad_array(op, name):
    image = _image(name)
    arrays = {name: image}
    if name == "query_images":
        arrays["images"] = _image("images")
    shape = image.shape[:-1]
    wrong = [shape[:-1] + (shape[-1] + 1,),  # one column more
             shape[1:] if len(shape) == 3 else (1,) + shape,  # another rank
             image.shape]  # with the channels
    for bad in wrong:
        e = _err(op, {**arrays, f"{name}_mask": np.ones(bad, np.uint8)})
        assert e.code == ErrorCode.BAD_ARRAY and e.details["name"] == f"{name}_mask"
    for dtype in (np.uint16, bool):  # only uint8
        e = _err(op, {**arrays, f"{name}_mask": np.ones(shape, dtype)})
        assert e.code == ErrorCode.BAD_ARRAY and "uint8" in e.message


def test_a_mask_without_its_image_is_bad_array():
    e = _err("localize", {"canvas_mask": np.ones((5, 7), np.uint8)}, {"canvas_id": "abc"})  # the id covers it
    assert e.code == ErrorCode.BAD_ARRAY and "without the 'canvas'" in e.message
    e = _err("rank", {"images": _image("images"), "query_images_mask": np.ones((2, 5, 7), np.uint8)})
    assert e.code == ErrorCode.BAD_ARRAY and e.details["name"] == "query_images_mask"


@pytest.mark.parametrize("value", [-0.01, 1.01, "half", None, True])
def test_min_valid_is_a_share(value):
    params = {"min_valid": value}
    if value is None:  # null: the default
        assert _decode("classify", {"tiles": _image("tiles")}, params).params["min_valid"] == 0.5
        return
    e = _err("classify", {"tiles": _image("tiles")}, params)
    assert e.code == ErrorCode.BAD_PARAMS and e.details["param"] == "min_valid"


@pytest.mark.parametrize("value", [0, 0.25, 1])
def test_min_valid_bounds_are_accepted(value):
    for op, name in (("rank", "images"), ("localize", "canvas"), ("embed", "images")):
        assert _decode(op, {name: _image(name)}, {"min_valid": value}).params["min_valid"] == float(value)


def test_the_defaults_are_the_protocols():
    assert defaults.MIN_VALID_SHARE == 0.5 and defaults.DEFAULT_TILE_SIZE == 224
    loc = {p.name: p for p in OPS["localize"].params}
    assert loc["window_sizes"].default() == list(defaults.DEFAULT_WINDOW_SIZES) == [256, 512, 768]
    assert loc["crop_size"].default == defaults.DEFAULT_CROP_SIZE == 256
    assert loc["smooth"].default == defaults.DEFAULT_SMOOTH == 251
    for op in IMAGES:
        assert {p.name: p for p in OPS[op].params}["min_valid"].default == defaults.MIN_VALID_SHARE
