"""Frames: arrays of every allowed dtype round-trip; every descriptor lie is caught before allocation."""
import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_protocol import ErrorCode, Limits, ProtocolError
from shared_protocol.framing import ALLOWED_DTYPES, decode, decode_header, encode
from strategies import array_of


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(ALLOWED_DTYPES)).flatmap(
    lambda dt: st.tuples(st.just(dt), st.integers(0, 4)).flatmap(lambda t: array_of(t[0], t[1]))))
def test_every_dtype_round_trips(arr):
    frames = encode({"op": "x"}, {"a": arr})
    out = decode([bytes(f) for f in frames]).arrays["a"]
    assert out.dtype == arr.dtype.newbyteorder("<")
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_big_endian_and_non_contiguous_arrays_are_sent_as_little_endian_c_order():
    arr = np.arange(24, dtype=">u2").reshape(4, 6)[:, ::2]
    out = decode(encode({}, {"a": arr})).arrays["a"]
    assert out.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(out, arr)


def test_unsupported_dtype_is_refused_on_encode():
    with pytest.raises(ProtocolError) as e:
        encode({}, {"a": np.array(["x"], dtype=object)})
    assert e.value.code == ErrorCode.BAD_ARRAY


def _frames(desc, payload=b""):
    return [json.dumps({"arrays": desc}).encode(), payload] if desc else [json.dumps({"arrays": []}).encode()]


@pytest.mark.parametrize("desc,payload,code", [
    ([{"name": "a", "dtype": "uint8", "shape": [2, 2], "nbytes": 4}], b"abc", ErrorCode.BAD_ARRAY),  # short
    ([{"name": "a", "dtype": "uint8", "shape": [2, 2], "nbytes": 5}], b"abcd", ErrorCode.BAD_ARRAY),  # nbytes lies
    ([{"name": "a", "dtype": "object", "shape": [1], "nbytes": 8}], b"12345678", ErrorCode.BAD_ARRAY),
    ([{"name": "a", "dtype": "uint8", "shape": [-1], "nbytes": 0}], b"", ErrorCode.BAD_ARRAY),
    ([{"name": "a", "dtype": "uint8", "shape": [1.5], "nbytes": 0}], b"", ErrorCode.BAD_ARRAY),
    ([{"name": "a", "dtype": "uint8", "shape": [True], "nbytes": 1}], b"a", ErrorCode.BAD_ARRAY),
    ([{"name": "a", "dtype": "float64", "shape": [2 ** 40, 2 ** 40], "nbytes": 1}], b"a", ErrorCode.TOO_LARGE),
    ([{"name": "", "dtype": "uint8", "shape": [1], "nbytes": 1}], b"a", ErrorCode.BAD_ARRAY),
    (["not an object"], b"a", ErrorCode.BAD_ARRAY),
])
def test_lying_descriptors_are_rejected(desc, payload, code):
    with pytest.raises(ProtocolError) as e:
        decode(_frames(desc, payload))
    assert e.value.code == code


def test_buffer_count_must_match_descriptors():
    frames = encode({}, {"a": np.zeros(3, np.uint8)})
    with pytest.raises(ProtocolError) as e:
        decode(frames[:1])
    assert e.value.code == ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError) as e:
        decode(frames + [b"extra"])
    assert e.value.code == ErrorCode.BAD_FRAME


def test_limits_are_configurable_and_checked_before_building_arrays():
    small = Limits(max_header_bytes=200, max_arrays=1, max_array_bytes=10, max_total_bytes=10)
    with pytest.raises(ProtocolError) as e:
        decode(encode({}, {"a": np.zeros(11, np.uint8)}), small)
    assert e.value.code == ErrorCode.TOO_LARGE and e.value.details["limit"] == "max_array_bytes"
    with pytest.raises(ProtocolError) as e:
        decode(encode({}, {"a": np.zeros(1, np.uint8), "b": np.zeros(1, np.uint8)}), small)
    assert e.value.details["limit"] == "max_arrays"
    with pytest.raises(ProtocolError) as e:
        decode_header(json.dumps({"pad": "x" * 300}).encode(), small)
    assert e.value.code == ErrorCode.TOO_LARGE


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"not json", b"[1, 2]", b'{"a": NaN}', b'{"a": Infinity}',
                                 pickle.dumps({"op": "ping"}), b"[" * 100000])
def test_bad_headers_are_typed_errors(raw):
    with pytest.raises(ProtocolError) as e:
        decode_header(raw)
    assert e.value.code in (ErrorCode.BAD_HEADER, ErrorCode.TOO_LARGE)


def test_nan_cannot_be_encoded():
    with pytest.raises(ValueError):
        encode({"x": float("nan")})
