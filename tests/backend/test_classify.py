"""classify equals an independent computation with open_clip on the same weights (GeoRSCLIP protocol)."""
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backend.tasks.classify import classify
from backend.tasks.classnames import CLASS_PRESETS, EXPECTED_SIZES
from backend.tasks.templates import TEMPLATE_SETS, normalize_classname
from shared_protocol import ErrorCode, ProtocolError

CLASSES = ["Dense_Residential", "river", "bare/land", "Forest"]


def _no_progress(p, m=""):
    pass


def _reference_probs(tiny, tiles, classes, templates, ensemble="georsclip"):
    """Straight open_clip: its PIL transform, encode_image, encode_text, GeoRSCLIP prompt ensembling."""
    model, tok = tiny.model, tiny.tokenizer
    pre = open_clip.image_transform(tiny.image_size, is_train=False, mean=tiny.mean, std=tiny.std)
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([pre(Image.fromarray(t)) for t in tiles])), dim=-1)
        rows = []
        for c in classes:
            name = c.lower().replace("_", " ").replace("/", " ")
            emb = model.encode_text(tok([t.format(name) for t in templates]))
            if ensemble == "openclip":
                emb = F.normalize(emb, dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
        return (100 * img @ torch.stack(rows).T).softmax(-1).numpy()


def test_georsclip_protocol_matches_open_clip(engine, tiny, rng):
    tiles = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)  # model size: no resampling involved
    result, arrays = classify(engine, {"classes": CLASSES, "top_k": 3, "templates": "georsclip"},
                              {"tiles": tiles}, _no_progress)
    ref = _reference_probs(tiny, tiles, CLASSES, TEMPLATE_SETS["georsclip"])
    np.testing.assert_allclose(arrays["probs"], ref, atol=1e-5)
    for i, tile in enumerate(result["tiles"]):
        order = np.argsort(-ref[i])[:3]
        assert [t["label"] for t in tile["top"]] == [CLASSES[j] for j in order]
        assert tile["label"] == CLASSES[order[0]]


def test_openclip_ensemble_matches_open_clips_own_classifier(engine, tiny, rng):
    tiles = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    templates = TEMPLATE_SETS["georsclip"][:10]
    _, arrays = classify(engine, {"classes": CLASSES, "custom_templates": templates, "ensemble": "openclip"},
                         {"tiles": tiles}, _no_progress)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            tiny.model, tiny.tokenizer, [normalize_classname(c) for c in CLASSES], templates, device="cpu")
        pre = open_clip.image_transform(tiny.image_size, is_train=False, mean=tiny.mean, std=tiny.std)
        img = F.normalize(tiny.model.encode_image(torch.stack([pre(Image.fromarray(t)) for t in tiles])), dim=-1)
        ref = (100 * img @ weights).softmax(-1).numpy()
    np.testing.assert_allclose(arrays["probs"], ref, atol=1e-5)
    # and the two protocols really differ (the default is GeoRSCLIP's)
    _, geors = classify(engine, {"classes": CLASSES, "custom_templates": templates, "ensemble": "georsclip"},
                        {"tiles": tiles}, _no_progress)
    assert not np.allclose(geors["probs"], arrays["probs"], atol=1e-7)


def test_canvas_grid_cells_and_windows(engine, rng):
    canvas = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
    result, arrays = classify(engine, {"classes": CLASSES, "tile_size": 32}, {"canvas": canvas}, _no_progress)
    boxes = arrays["boxes"]
    assert boxes.dtype == np.int32 and len(boxes) == 3 * 4 == len(result["tiles"])
    assert boxes[-1].tolist() == [96, 64, 100, 70]  # edge cells are clipped
    # the edge cell is classified from the full-size window that ends at the canvas edge
    _, alone = classify(engine, {"classes": CLASSES}, {"tiles": canvas[None, 38:70, 68:100]}, _no_progress)
    np.testing.assert_allclose(arrays["probs"][-1], alone["probs"][0], atol=1e-6)


def test_class_embeddings_are_cached(engine, rng, monkeypatch):
    tiles = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    classify(engine, {"classes": CLASSES}, {"tiles": tiles}, _no_progress)
    calls = []
    original = engine.loaded.model.encode_text
    monkeypatch.setattr(engine.loaded.model, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
    classify(engine, {"classes": CLASSES}, {"tiles": tiles}, _no_progress)
    assert calls == []


@pytest.mark.parametrize("params,arrays,code", [
    ({"classes": ["River", "river"]}, "tiles", ErrorCode.BAD_PARAMS),  # same once normalised
    ({"classes": ["a"]}, None, ErrorCode.BAD_PARAMS),  # nothing to classify
    ({"classes": ["a"]}, "canvas", ErrorCode.BAD_PARAMS),  # canvas without tile_size
    ({"classes": ["a"], "templates": "nope"}, "tiles", ErrorCode.BAD_PARAMS),
])
def test_bad_requests(engine, params, arrays, code):
    a = {"tiles": np.zeros((1, 8, 8, 3), np.uint8)} if arrays == "tiles" else \
        {"canvas": np.zeros((8, 8, 3), np.uint8)} if arrays == "canvas" else {}
    with pytest.raises(ProtocolError) as e:
        classify(engine, {"top_k": 1, **params}, a, _no_progress)
    assert e.value.code == code


def test_class_presets_have_the_standard_sizes():
    assert {k: len(v) for k, v in CLASS_PRESETS.items()} == EXPECTED_SIZES
    assert len(TEMPLATE_SETS["georsclip"]) == 105 == len(set(TEMPLATE_SETS["georsclip"]))
    assert normalize_classname("Dense_Residential/Area") == "dense residential area"


def test_tile_and_grid_embeddings_are_cached_by_content(engine, rng, monkeypatch):
    tiles = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    canvas = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    first, _ = classify(engine, {"classes": CLASSES}, {"tiles": tiles}, _no_progress)
    classify(engine, {"classes": CLASSES, "tile_size": 32}, {"canvas": canvas}, _no_progress)
    calls = []
    original = engine.loaded.model.encode_image
    monkeypatch.setattr(engine.loaded.model, "encode_image", lambda x: calls.append(len(x)) or original(x))
    again, _ = classify(engine, {"classes": ["airport", "beach"]}, {"tiles": tiles[[2, 0]].copy()}, _no_progress)
    classify(engine, {"classes": ["airport"], "tile_size": 32}, {"canvas": canvas.copy()}, _no_progress)
    assert calls == []  # new classes, same pixels: only text is encoded
    mixed = np.concatenate([tiles[:1], rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)])
    classify(engine, {"classes": CLASSES}, {"tiles": mixed}, _no_progress)
    assert calls == [1]  # only the new tile
