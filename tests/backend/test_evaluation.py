"""Metrics against hand-worked values: retrieval recall, top-1, SeLo Rsu/Ras/Rda/Rmi; heatmap readers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from backend.evaluation import selo
from backend.evaluation.retrieval import recall_metrics
from backend.evaluation.zeroshot import top1_accuracy
from backend.zeroshot import model_text_encoder, template_class_features


def test_recall_hand_worked():
    # texts 0 and 1 describe image 0, text 2 describes image 1
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    r = recall_metrics(sim, [0, 0, 1])
    # image 0: best text t0 is its own -> hit@1; image 1: t1 (not its own) then t2 -> hit@5
    assert r["i2t_r1"] == pytest.approx(50.0) and r["i2t_r5"] == r["i2t_r10"] == pytest.approx(100.0)
    # t0 -> image 0 first (hit); t1 -> image 1 first (miss@1); t2 -> image 0 first (miss@1)
    assert r["t2i_r1"] == pytest.approx(100 / 3) and r["t2i_r5"] == pytest.approx(100.0)
    assert r["mr"] == pytest.approx((50 + 100 + 100 + 100 / 3 + 100 + 100) / 6)


def test_recall_ranks_beyond_ten():
    n = 12
    sim = -torch.eye(n)  # every correct pair scores lowest: rank 11 of 12
    r = recall_metrics(sim, list(range(n)))
    assert r["i2t_r10"] == 0.0 and r["t2i_r10"] == 0.0
    r = recall_metrics(torch.eye(n), list(range(n)))
    assert r["mr"] == 100.0


def test_top1_and_georsclip_ensemble(tiny):
    assert (top1_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 0, 0]))
            == pytest.approx(200 / 3))
    templates = ["a {}.", "an image of {}."]
    encode = model_text_encoder(tiny.model, tiny.tokenizer)
    with torch.no_grad():
        feats = template_class_features(encode, ["Dense_Residential"], templates)
    with torch.no_grad():
        raw = tiny.model.encode_text(tiny.tokenizer(["a dense residential.", "an image of dense residential."]))
    expected = torch.nn.functional.normalize(raw.mean(0), dim=-1)  # mean of raw embeddings, then normalise
    assert torch.allclose(feats[0], expected, atol=1e-6)
    with torch.no_grad():
        oc = template_class_features(encode, ["Dense_Residential"], templates, ensemble="openclip")
    assert torch.allclose(oc[0], torch.nn.functional.normalize(
        torch.nn.functional.normalize(raw, dim=-1).mean(0), dim=-1), atol=1e-6)


# -- SeLo ---------------------------------------------------------------------------------------------------------
SQUARE = [[0, 0], [4, 0], [4, 4], [0, 4]]  # centre (2, 2), mean vertex distance sqrt(8): r = int(1.5 sqrt(8))
R = 4


def test_region_geometry_and_mask():
    assert selo.region_geometry(SQUARE) == (2, 2, R)
    # the centre is truncated first, the radius is measured from it and truncated too (the reference's ints)
    assert selo.region_geometry([[0, 0], [5, 0], [5, 5], [0, 5]]) == (2, 2, int(1.5 * np.mean(
        [math.hypot(2, 2), math.hypot(3, 2), math.hypot(3, 3), math.hypot(2, 3)])))
    with pytest.raises(ValueError, match="too small"):
        selo.region_geometry([[0, 0], [0.4, 0], [0.4, 0.4]])
    m = selo.polygon_mask((10, 10), [[[2, 2], [3.9, 2], [3.9, 3.9], [2, 3.9]]])  # truncated to 2..3
    assert m.sum() == 4 and m[2:4, 2:4].all()


def test_rsu_hand_worked():
    prob = np.full((10, 10), 0.5)
    mask = np.zeros((10, 10))
    mask[2:4, 2:4] = 1
    # sum(PM) = 2, sum(P) = 50: left = 2 / 48; right = (100 - 4) / 4 = 24; product = 1
    assert selo.rsu(prob, mask) == pytest.approx(1 - math.exp(-0.707 * (2 / (48 + 1e-7)) * 24), rel=1e-9)
    assert selo.rsu(prob, mask) == pytest.approx(0.506879, abs=1e-6)
    perfect = mask * 1.0
    assert selo.rsu(perfect, mask) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        selo.rsu(prob, np.zeros((10, 10)))


def test_ras_rda_rmi_hand_worked():
    centres = [(2, 2), (5, 2), (10, 10)]  # distances 0, 3 (inside r = 4) and 11.3 (outside)
    ras = selo.ras([SQUARE], centres)
    assert ras == pytest.approx((math.exp(3 * 1.5 / R) - 1) / (math.exp(3) - 1), rel=1e-9)
    rda = selo.rda([SQUARE], centres)
    # two centres inside: their mean (3.5, 2), both 1.5 away -> 0.5 (1 - 1.5 / r) + exp(-0.5 * 4)
    assert rda == pytest.approx(0.5 * (1 - 1.5 / R) + math.exp(-2), rel=1e-9)
    assert selo.rmi(0.8, ras, rda) == pytest.approx(0.4 * 0.8 + 0.35 * (1 - ras) + 0.25 * rda)
    # no centre: Ras = 1, Rda = 0; one centre inside: Rda = 1, offset 0 -> Ras = 0
    assert selo.ras([SQUARE], []) == 1.0 and selo.rda([SQUARE], []) == 0.0
    assert selo.rda([SQUARE], [(2, 2)]) == 1.0 and selo.ras([SQUARE], [(2, 2)]) == 0.0
    # two regions: mean of per-region ratios; the far region has no centre -> ratio 1
    far = [[100, 100], [104, 100], [104, 104], [100, 104]]
    assert selo.ras([SQUARE, far], [(2, 2)]) == pytest.approx((math.exp(1.5) - 1) / (math.exp(3) - 1))
    assert selo.rda([SQUARE, far], [(2, 2)]) == pytest.approx(0.5)


def test_box_smooth_is_a_mean_filter_with_opencvs_window_and_border():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (9, 11)).astype(np.uint8)
    out = selo.box_smooth(g, times=1, size=4)
    padded = np.pad(g.astype(np.float64), 2, mode="reflect")  # numpy 'reflect' = BORDER_REFLECT_101
    exact = np.zeros(out.shape)
    for y in range(9):
        for x in range(11):  # window [x-2, x+1] as OpenCV's anchor ksize/2 for even sizes
            exact[y, x] = padded[y:y + 4, x:x + 4].mean()
    # OpenCV's 8-bit box filter rounds in fixed point (not always to nearest): within one level of the mean
    assert np.abs(out - exact).max() < 1.0


def _blob(h, w, cx, cy, peak, sigma=40.0):
    yy, xx = np.mgrid[0:h, 0:w]
    return peak * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))


def test_attention_centres_found_sorted_and_filtered():
    prob = _blob(300, 2400, 200, 150, 0.7) + _blob(300, 2400, 1300, 140, 0.9) + _blob(300, 2400, 2300, 150, 0.4)
    centres = selo.attention_centres(prob)
    assert len(centres) == 2  # the 0.4 blob is below 0.5
    (x1, y1), (x2, y2) = centres  # highest P first
    assert abs(x1 - 1300) <= 4 and abs(y1 - 140) <= 4 and abs(x2 - 200) <= 4 and abs(y2 - 150) <= 4
    assert selo.attention_centres(np.zeros((50, 50))) == []


def test_selo_metrics_end_to_end():
    prob = _blob(400, 400, 200, 200, 1.0, sigma=30)
    region = [[170, 170], [230, 170], [230, 230], [170, 230]]
    res = selo.selo_metrics(prob, [region])
    assert res["centres"] and abs(res["centres"][0][0] - 200) <= 4
    assert res["rda"] == 1.0 and res["ras"] < 0.05 and res["rsu"] > 0.9
    assert res["rmi"] == pytest.approx(0.4 * res["rsu"] + 0.35 * (1 - res["ras"]) + 0.25 * res["rda"])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_heatmap_readers(tmp_path):
    from PIL import Image
    import rasterio
    p = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    np.save(tmp_path / "h.npy", p)
    np.testing.assert_allclose(selo.read_heatmap(tmp_path / "h.npy"), p)
    g = (p * 255).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / "h.png")
    np.testing.assert_allclose(selo.read_heatmap(tmp_path / "h.png"), g / 255.0)
    with rasterio.open(tmp_path / "h.tif", "w", driver="GTiff", width=64, height=48, count=1, dtype="float32") as ds:
        ds.write(p.astype(np.float32), 1)
    np.testing.assert_allclose(selo.read_heatmap(tmp_path / "h.tif"), p, atol=1e-6)
    np.save(tmp_path / "scores.npy", p * 2 - 0.5)  # not probabilities: min-max normalised
    np.testing.assert_allclose(selo.read_heatmap(tmp_path / "scores.npy"), p, atol=1e-12)
    with pytest.raises(ValueError, match="must be"):
        selo.read_heatmap(_write(tmp_path / "h.txt", "x"))


def _write(path, text):
    path.write_text(text)
    return path


def test_air_slt_annotations(tmp_path):
    anno = [
        {"caption": "a ship in the harbour", "jpg_name": "12.jpg", "points": [[[1, 2], [3, 2], [3, 4], [1, 4]]]},
        {"caption": "white storage tanks", "jpg_name": "12.jpg",
         "points": [[[5, 5], [6, 5], [6, 6]], [[7, 7], [8, 7], [8, 8]]]},
        {"caption": "a bridge", "jpg_name": "13.jpg", "points": [[[0, 0], [1, 0], [1, 1]]]},
    ]
    path = _write(tmp_path / "anno.json", json.dumps(anno))
    cap, regions = selo.read_annotations(path, "13.jpg")
    assert cap == "a bridge" and regions == [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]]
    cap, regions = selo.read_annotations(path, "12", "white storage tanks")
    assert len(regions) == 2
    assert selo.read_annotations(path, "12.jpg", "0")[0] == "a ship in the harbour"
    with pytest.raises(ValueError, match="several|2 queries"):
        selo.read_annotations(path, "12.jpg")
    with pytest.raises(ValueError, match="no annotation"):
        selo.read_annotations(path, "99.jpg")
