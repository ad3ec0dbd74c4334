"""localize with explicit windows: exactly those windows are encoded, their raw scores come back (NaN below
min_valid), cached per canvas and windows; the whole canvas's map from those scores (shared_protocol.selo) is the
heatmap the backend makes itself; bad windows are typed errors."""
import numpy as np
import pytest
import torch.nn.functional as F

from backend.models.preprocess import value_scale
from backend.server import Job
from backend.service import ModelService
from backend.tasks.localize import localize
from shared_protocol import ErrorCode, ProtocolError, Request
from shared_protocol.selo import cell_means, interval_counts, normalize_minmax, render, selo_windows


def _job(params, arrays):
    req = Request("localize", "w1", {"crop_size": 32, "smooth": 0, "normalize": True, "geotiff": False,
                                     "polygons": False, "threshold": 0.5, "transform": None, "crs": None,
                                     "value_range": None, "adapter": None, "canvas_id": None, "min_valid": 0.5,
                                     "selo_mode": "fast", **params}, arrays)
    return Job(req, b"peer", lambda peer, reply: None)


def _direct_scores(engine, canvas, boxes, queries):
    """Each window encoded on its own (batch 1) against the texts: cosine similarities, Q x N."""
    texts = engine.encode_texts(queries, None)
    scale = value_scale(canvas[None], None, None)
    feats = [engine.encode_windows(canvas, boxes[i:i + 1], 32, None, scale, lambda p, m: None)
             for i in range(len(boxes))]
    return np.stack([F.normalize(f.float(), dim=-1)[0].numpy() for f in feats]) @ F.normalize(
        texts.float(), dim=-1).numpy().T


def test_exactly_the_windows_asked_for_are_encoded_once(engine, rng, monkeypatch):
    canvas = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    mask = np.ones((90, 130), np.uint8)
    mask[:, :40] = 0
    boxes = np.array([[0, 0, 32, 32], [50, 10, 98, 58], [60, 30, 130, 90], [10, 50, 60, 90], [50, 10, 98, 58]],
                     np.int32)  # the second asked twice (encoded twice: as asked); the first and fourth mostly nodata
    calls = []
    original = engine.encode_windows
    monkeypatch.setattr(engine, "encode_windows",
                        lambda c, b, *a, **k: calls.append(len(b)) or original(c, b, *a, **k))
    service = ModelService(engine)
    reply = service.handle(_job({"queries": ["a river", "farmland"]},
                                {"canvas": canvas, "canvas_mask": mask, "windows": boxes}))
    scores = reply.arrays["scores"]
    assert "heatmaps" not in reply.arrays and scores.shape == (2, 5) and scores.dtype == np.float32
    assert calls == [3] and reply.result["windows"] == 3 and reply.result["skipped"] == 2
    assert np.isnan(scores[:, [0, 3]]).all()
    keep = [1, 2, 4]
    np.testing.assert_allclose(scores[:, keep], _direct_scores(engine, canvas, boxes[keep].astype(np.int64),
                                                               ["a river", "farmland"]).T, atol=2e-5)
    # a new query on the same canvas and windows, named by its id: text only
    calls.clear()
    again = service.handle(_job({"queries": ["forest"], "canvas_id": reply.result["canvas_id"]}, {"windows": boxes}))
    assert calls == [] and again.arrays["scores"].shape == (1, 5)


def test_the_map_from_window_scores_is_the_backends_heatmap(engine, rng):
    """What a client does with the scores of a whole canvas's SeLo windows (cells, min-max, smoothing) is the
    heatmap the backend makes for that canvas."""
    h, w = 150, 190
    canvas = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.ones((h, w), np.uint8)
    mask[100:, 120:] = 0
    sizes = [32, 64]
    boxes = np.concatenate([selo_windows(h, w, s) for s in sizes]).astype(np.int32)
    service = ModelService(engine)
    scores = service.handle(_job({"queries": ["a river"]}, {"canvas": canvas, "canvas_mask": mask,
                                                             "windows": boxes})).arrays["scores"]
    for smooth in (0, 7, 31):
        heat, _ = localize(engine, canvas, {"queries": ["a river"], "window_sizes": sizes, "crop_size": 32,
                                            "smooth": smooth, "normalize": True}, lambda p, m: None, mask)
        kept = np.isfinite(scores[0])
        cells, ys, xs = cell_means(boxes[kept], scores[:, kept].T, h, w)
        valid = mask.astype(bool)
        cells[:, interval_counts(valid, ys, xs) == 0] = np.nan
        cells = np.stack([normalize_minmax(c) for c in cells])
        np.testing.assert_allclose(render(cells, ys, xs, h, w, smooth, valid), heat, atol=2e-5)


@pytest.mark.parametrize("windows, params, code, what", [
    (np.array([[0, 0, 33, 20]], np.int32), {}, ErrorCode.BAD_ARRAY, "outside"),
    (np.array([[5, 5, 5, 10]], np.int32), {}, ErrorCode.BAD_ARRAY, "empty"),
    (np.array([[-1, 0, 10, 10]], np.int32), {}, ErrorCode.BAD_ARRAY, "outside"),
    (np.zeros((0, 4), np.int32), {}, ErrorCode.BAD_ARRAY, "N x 4"),
    (np.zeros((2, 3), np.int32), {}, ErrorCode.BAD_ARRAY, "N x 4"),
    (np.array([[0, 0, 10, 10]], np.int32), {"selo_mode": "reference"}, ErrorCode.BAD_PARAMS, "selo_mode"),
    (np.array([[0, 0, 10, 10]], np.int32), {"geotiff": True}, ErrorCode.BAD_PARAMS, "geotiff"),
    (np.array([[0, 0, 10, 10]], np.int32), {"polygons": True}, ErrorCode.BAD_PARAMS, "polygons"),
])
def test_bad_windows_are_typed_errors(engine, windows, params, code, what):
    with pytest.raises(ProtocolError) as e:
        ModelService(engine).handle(_job({"queries": ["x"], **params},
                                         {"canvas": np.zeros((20, 32, 3), np.uint8), "windows": windows}))
    assert e.value.code == code and what in e.value.message
