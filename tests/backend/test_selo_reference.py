"""SeLo reference mode against a small independent reimplementation of the original pipeline (RS5M
``inference/inference_tool.py``: ``split_image`` writing JPEG crops with OpenCV, PIL reading them, the model's
PIL preprocessing, per-window scores, the per-pixel mean, min-max, uint8, ``cv2.medianBlur``), on the tiny
random model: the two 8-bit maps agree within one grey level."""
import os

import cv2
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms

from backend.evaluation import selo
from backend.tasks.localize import localize
from backend.tasks.selo_reference import reference_windows


def _no_progress(fraction, message=""):
    pass


def original_pipeline(model, image_path, text, steps, cache, image_size, mean, std, smooth):
    """The original, transcribed: files on disk, as ``AIR_SLT.split_image`` and the evaluation loop do."""
    subimages_dir = os.path.join(cache, "subimages")
    os.makedirs(subimages_dir)
    source_img = cv2.imread(image_path)
    img_weight, img_height = np.shape(source_img)[0], np.shape(source_img)[1]
    for step in steps:
        for gap in [step, 0.5 * step]:
            gap = int(gap)
            for h in range(0 + (step - gap), img_height, step):
                h_start, h_end = h, h + step
                if h_end >= img_height:
                    h_start, h_end = img_height - step, img_height
                for w in range(0 + (step - gap), img_weight, step):
                    w_start, w_end = w, w + step
                    if w_end >= img_weight:
                        w_start, w_end = img_weight - step, img_weight
                    name = f"{w_start}_{w_end}_{h_start}_{h_end}.jpg"
                    cut_img = cv2.resize(source_img[w_start:w_end, h_start:h_end], (256, 256),
                                         interpolation=cv2.INTER_CUBIC)
                    cv2.imwrite(os.path.join(subimages_dir, name), cut_img)
    preprocess = transforms.Compose([
        transforms.Resize(size=image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size), lambda im: im.convert("RGB"), transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std)])
    names = os.listdir(subimages_dir)
    with torch.no_grad():
        text_features = model.encode_text(open_clip.tokenize([text]))
        text_features /= text_features.norm(dim=-1, keepdim=True)
        sims = []
        for name in names:
            sub = preprocess(Image.open(os.path.join(subimages_dir, name))).unsqueeze(0)
            feat = model.encode_image(sub)
            feat /= feat.norm(dim=-1, keepdim=True)
            sims.append((feat * text_features).sum().numpy())
    heat_map = np.zeros(source_img.shape[:2], dtype=float)
    heat_num = np.zeros(source_img.shape[:2], dtype=float)
    for idx, name in enumerate(names):
        r_start, r_end, c_start, c_end = name.replace(".jpg", "").split("_")
        heat_map[int(r_start):int(r_end), int(c_start):int(c_end)] += sims[idx]
        heat_num[int(r_start):int(r_end), int(c_start):int(c_end)] += 1
    heat_map = heat_map / heat_num
    adaptive = heat_map - np.min(heat_map)
    probmap = np.uint8(255 * (adaptive / np.max(adaptive)))
    return cv2.medianBlur(probmap, smooth), len(names)


def _canvas(h, w, seed):
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.random((h, w, 3)), (0, 0), 12)
    base = (base - base.min()) / (base.max() - base.min())
    noise = rng.normal(0, 0.05, (h, w, 3))
    return np.uint8(np.clip(base + noise, 0, 1) * 255)


@pytest.mark.parametrize("h,w,steps,smooth", [(300, 380, [64, 96, 128], 31), (600, 700, [256, 512], 251)])
def test_reference_mode_equals_the_original_pipeline(engine, tiny, tmp_path, h, w, steps, smooth):
    canvas = _canvas(h, w, seed=h)
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, canvas[:, :, ::-1])  # lossless: the original reads it with cv2.imread (BGR)
    query = "a river next to a green forest.\n"
    theirs, n_windows = original_pipeline(tiny.model, path, query, steps, str(tmp_path), tiny.image_size[0],
                                          list(tiny.mean), list(tiny.std), smooth)
    heat, result = localize(engine, canvas, {"queries": [query], "window_sizes": steps, "crop_size": 256,
                                             "smooth": smooth, "selo_mode": "reference"}, _no_progress)
    assert result["windows"] == n_windows and result["selo_mode"] == "reference"
    ours = np.rint(heat[0] * 255).astype(int)
    assert np.abs(ours - theirs.astype(int)).max() <= 1
    assert theirs.max() > theirs.min()  # a real map, not a constant


def test_reference_windows_are_split_images():
    # 600 x 700, steps 256: offsets 0 and 128, stride 256; windows reaching the edge move to [dim - 256, dim]
    boxes = reference_windows(600, 700, [256])
    xs = sorted({int(b[0]) for b in boxes})
    ys = sorted({int(b[1]) for b in boxes})
    assert xs == [0, 128, 256, 384, 444] and ys == [0, 128, 256, 344]
    assert len(boxes) == len({tuple(b) for b in boxes.tolist()})
    assert ((boxes[:, 2] - boxes[:, 0]) == 256).all() and ((boxes[:, 3] - boxes[:, 1]) == 256).all()


def test_reference_mode_refuses_unnormalised_maps(engine):
    from shared_protocol import ProtocolError
    with pytest.raises(ProtocolError, match="normalise"):
        localize(engine, np.zeros((64, 64, 3), np.uint8), {"queries": ["x"], "window_sizes": [32], "smooth": 0,
                                                          "selo_mode": "reference", "normalize": False}, _no_progress)


def test_reference_metrics_read_the_map_after_a_jpeg_round_trip(engine):
    canvas = _canvas(300, 380, seed=3)
    heat, _ = localize(engine, canvas, {"queries": ["a road"], "window_sizes": [64, 128], "smooth": 31,
                                        "selo_mode": "reference"}, _no_progress)
    ok, buf = cv2.imencode(".jpg", np.uint8(np.rint(heat[0] * 255)))
    np.testing.assert_array_equal(selo.jpeg_round_trip(heat[0]), cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) / 255.0)


def test_selo_mode_is_a_localize_parameter():
    from shared_protocol import ProtocolError
    from shared_protocol.ops import OPS
    from shared_protocol.schema import validate_params
    spec = OPS["localize"]
    assert validate_params(spec.params, {"queries": ["x"]}, "localize")["selo_mode"] == "fast"
    assert validate_params(spec.params, {"queries": ["x"], "selo_mode": "reference"}, "localize")["selo_mode"] \
        == "reference"
    with pytest.raises(ProtocolError):
        validate_params(spec.params, {"queries": ["x"], "selo_mode": "exact"}, "localize")


def test_reference_mode_through_the_service(engine):
    """The op as served: a uint16 canvas, its canvas_id again (window scores cached), polygons, capabilities."""
    from backend.server import Job
    from backend.service import ModelService
    from shared_protocol import Request
    service = ModelService(engine)
    assert service.info()["capabilities"]["selo_modes"] == ["fast", "reference"]
    rng = np.random.default_rng(2)
    canvas = (cv2.GaussianBlur(rng.random((160, 200, 3)), (0, 0), 6) * 4000).astype(np.uint16)
    base = {"queries": ["a lake"], "window_sizes": [64, 96], "crop_size": 256, "smooth": 31, "normalize": True,
            "selo_mode": "reference", "geotiff": False, "polygons": True, "threshold": 0.5, "transform": None,
            "crs": None, "value_range": None, "adapter": None, "canvas_id": None}

    def job(params, arrays):
        return Job(Request("localize", "r", {**base, **params}, arrays), b"peer", lambda peer, reply: None)
    first = service.handle(job({}, {"canvas": canvas}))
    heat = first.arrays["heatmaps"][0]
    assert heat.shape == (160, 200) and first.result["selo_mode"] == "reference"
    assert np.allclose(heat * 255, np.rint(heat * 255), atol=1e-3)  # an 8-bit map / 255
    again = service.handle(job({"canvas_id": first.result["canvas_id"]}, {}))
    np.testing.assert_array_equal(again.arrays["heatmaps"], first.arrays["heatmaps"])
    assert first.result["polygons"][0]["type"] == "FeatureCollection"


def test_reference_mode_with_a_mask_blanks_the_original_map(engine):
    """The original pipeline has no notion of nodata: it scores every window, and the mask only blanks the map
    (NaN there, the unmasked reference map elsewhere), with a warning."""
    canvas = _canvas(200, 200, seed=3)
    mask = np.ones((200, 200), np.uint8)
    mask[:, :50] = 0
    params = {"queries": ["q"], "window_sizes": [64], "smooth": 31, "selo_mode": "reference"}
    plain, _ = localize(engine, canvas, dict(params), _no_progress)
    masked, result = localize(engine, canvas, dict(params), _no_progress, mask=mask)
    assert np.isnan(masked[0][:, :50]).all()
    assert np.array_equal(masked[0][:, 50:], plain[0][:, 50:])
    assert any("reference" in w for w in result["warnings"])
