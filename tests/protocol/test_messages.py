"""Requests and replies of every operation round-trip; schema and version errors are typed."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_protocol import (OPS, PROTOCOL_VERSION, ErrorCode, ProtocolError, Reply, Request, decode_reply,
                             decode_request)
from shared_protocol.ops import IMAGE_DTYPES
from strategies import arrays_for, params_for


@pytest.mark.parametrize("op", sorted(OPS))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_request_round_trips(op, data):
    spec = OPS[op]
    params = data.draw(params_for(spec))
    arrays = data.draw(arrays_for(spec))
    req = Request(op, "rid-1", params, arrays, token="t")
    got = decode_request(req.encode())
    assert (got.op, got.id, got.token, got.version) == (op, "rid-1", "t", PROTOCOL_VERSION)
    for key, value in params.items():
        assert got.params[key] == (float(value) if isinstance(value, int) and not isinstance(value, bool)
                                   and any(p.name == key and p.kind == "float" for p in spec.params) else value)
    assert set(got.params) == {p.name for p in spec.params}  # defaults filled in
    assert set(got.arrays) == set(arrays)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(got.arrays[name], arr)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(OPS)), st.dictionaries(st.text(min_size=1, max_size=8),
                                                      st.integers() | st.text(max_size=10) | st.booleans(),
                                                      max_size=4),
       st.sampled_from(sorted(IMAGE_DTYPES + ("float32", "int64"))))
def test_every_reply_round_trips(op, result, dtype):
    arrays = {"out": np.arange(6, dtype=dtype).reshape(2, 3)}
    got = decode_reply(Reply.ok("r", op, result, arrays).encode())
    assert (got.status, got.id, got.op, got.result) == ("ok", "r", op, result)
    np.testing.assert_array_equal(got.arrays["out"], arrays["out"])
    err = decode_reply(Reply.failure("r", op, ProtocolError(ErrorCode.BAD_PARAMS, "m", {"k": 1})).encode())
    assert err.status == "error" and err.error.code == ErrorCode.BAD_PARAMS and err.error.details == {"k": 1}
    prog = decode_reply(Reply.progress_update("r", op, 0.25, "half-way").encode())
    assert (prog.status, prog.progress, prog.message) == ("progress", 0.25, "half-way")


def _err(frames, **kw):
    with pytest.raises(ProtocolError) as e:
        decode_request(frames, **kw)
    return e.value


def test_incompatible_client_is_told_at_hello():
    e = _err(Request("hello", "a", {"protocol": PROTOCOL_VERSION + 1}).encode())
    assert e.code == ErrorCode.UNSUPPORTED_VERSION and e.details["server"] == PROTOCOL_VERSION
    assert "update" in e.message
    e = _err(Request("hello", "a", {"protocol": 1}, version=99).encode())
    assert e.code == ErrorCode.UNSUPPORTED_VERSION and e.details["request_id"] == "a"


@pytest.mark.parametrize("op,params,code", [
    ("nope", {}, ErrorCode.UNKNOWN_OP),
    ("classify", {}, ErrorCode.BAD_PARAMS),  # classes required
    ("classify", {"classes": []}, ErrorCode.BAD_PARAMS),
    ("classify", {"classes": ["a"], "top_k": 0}, ErrorCode.BAD_PARAMS),
    ("classify", {"classes": ["a"], "top_k": True}, ErrorCode.BAD_PARAMS),
    ("classify", {"classes": ["a"], "typo": 1}, ErrorCode.BAD_PARAMS),
    ("classify", {"classes": [""]}, ErrorCode.BAD_PARAMS),
    ("classify", {"classes": ["a"], "ensemble": "x"}, ErrorCode.BAD_PARAMS),
    ("classify", {"classes": ["a"], "custom_templates": ["no placeholder"]}, ErrorCode.BAD_PARAMS),
    ("localize", {"queries": ["q"], "transform": [1, 0, 0, 0, 0, 0]}, ErrorCode.BAD_PARAMS),  # singular
    ("localize", {"queries": ["q"], "smooth": 4}, ErrorCode.BAD_PARAMS),
    ("localize", {"queries": ["q"], "threshold": 2.0}, ErrorCode.BAD_PARAMS),
    ("rank", {"value_range": [5, 1]}, ErrorCode.BAD_PARAMS),
    ("cancel", {}, ErrorCode.BAD_PARAMS),
])
def test_bad_params_are_typed(op, params, code):
    frames = Request(op, "rid", params).encode() if op in OPS else Request("ping", "rid").encode()
    if op not in OPS:
        frames[0] = frames[0].replace(b'"ping"', b'"nope"')
    e = _err(frames)
    assert e.code == code and e.details["request_id"] == "rid"


def test_arrays_must_fit_the_operation():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    assert _err(Request("rank", "r", {"texts": ["x"]}, {}).encode()).code == ErrorCode.BAD_ARRAY  # missing
    e = _err(Request("rank", "r", {"texts": ["x"]}, {"images": img.astype(np.float32)}).encode())
    assert e.code == ErrorCode.BAD_ARRAY and "uint8 or uint16" in e.message
    assert _err(Request("rank", "r", {}, {"images": img[0]}).encode()).code == ErrorCode.BAD_ARRAY  # rank 3
    assert _err(Request("rank", "r", {}, {"images": img, "x": img}).encode()).code == ErrorCode.BAD_ARRAY


def test_token_is_checked_before_anything_else():
    frames = Request("nope-op-is-not-checked-first", "r", {}, token="wrong").encode()
    assert _err(frames, expected_token="right").code == ErrorCode.UNAUTHORIZED
    assert _err(Request("ping", "r").encode(), expected_token="right").code == ErrorCode.UNAUTHORIZED
    assert decode_request(Request("ping", "r", token="right").encode(), expected_token="right").op == "ping"


def test_missing_or_bad_ids_and_versions():
    assert _err([b'{"v": 1, "op": "ping"}']).code == ErrorCode.BAD_HEADER
    assert _err([b'{"v": "1", "op": "ping", "id": "x"}']).code == ErrorCode.BAD_HEADER
    assert _err([b'{"v": 1, "op": "ping", "id": "' + b"x" * 65 + b'"}']).code == ErrorCode.BAD_HEADER
    assert _err([]).code == ErrorCode.BAD_FRAME
