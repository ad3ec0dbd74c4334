"""Batched torch preprocessing matches open_clip's own PIL transform; value scaling is as documented."""
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import rasterio
import torch
from PIL import Image

from backend.models.preprocess import preprocess_batch, value_scale

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def _cfg(size):
    return SimpleNamespace(device=torch.device("cpu"), image_size=(size, size), mean=MEAN, std=STD)


def _unit(x):  # back to [0, 1] pixel units
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


@pytest.mark.parametrize("size", [32, 224])
def test_matches_open_clip_on_real_and_random_images(data_dir, size, rng):
    with rasterio.open(data_dir / "RGB.byte.tif") as ds:
        scene = ds.read().transpose(1, 2, 0)
    crops = [scene[100:400, 200:500], scene[0:300, 0:500], scene[50:114, 300:364], scene[:500, 100:180],
             rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)]
    reference = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD)
    for crop in crops:
        ref = _unit(reference(Image.fromarray(np.ascontiguousarray(crop))))
        ours = _unit(preprocess_batch(np.ascontiguousarray(crop)[None], _cfg(size))[0])
        diff = (ref - ours).abs()
        assert ours.shape == ref.shape == (3, size, size)
        assert diff.max() <= 2.5 / 255, (crop.shape, float(diff.max()))  # at most ~2 of 255 levels
        assert diff.mean() <= 0.35 / 255  # PIL works in fixed point: rare one-level differences


def test_batched_equals_one_by_one(rng):
    batch = rng.integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
    together = preprocess_batch(batch, _cfg(32))
    alone = torch.cat([preprocess_batch(b[None], _cfg(32)) for b in batch])
    torch.testing.assert_close(together, alone)


def test_channels_grey_and_rgba():
    grey = np.full((1, 32, 32, 1), 128, np.uint8)
    rgba = np.concatenate([np.full((1, 32, 32, 3), 128, np.uint8), np.zeros((1, 32, 32, 1), np.uint8)], axis=3)
    rgb = np.full((1, 32, 32, 3), 128, np.uint8)
    torch.testing.assert_close(preprocess_batch(grey, _cfg(32)), preprocess_batch(rgb, _cfg(32)))
    torch.testing.assert_close(preprocess_batch(rgba, _cfg(32)), preprocess_batch(rgb, _cfg(32)))


def test_uint16_scaling():
    ramp = np.linspace(0, 10000, 32 * 32 * 3).astype(np.uint16).reshape(1, 32, 32, 3)
    lo, hi = value_scale(ramp)
    assert lo == pytest.approx(np.percentile(ramp, 2)) and hi == pytest.approx(np.percentile(ramp, 98))
    assert value_scale(ramp, [0, 10000]) == (0.0, 10000.0)
    flat = np.full((1, 8, 8, 3), 10000, np.uint16)  # RGBA.uint16.tif is like this
    assert value_scale(flat) == (0.0, 65535.0)
    x = _unit(preprocess_batch(flat, _cfg(8), value_range=None)[0])
    assert torch.allclose(x, torch.full_like(x, 10000 / 65535), atol=1e-5)
    as8 = (np.clip((ramp.astype(float) - 0) / 10000, 0, 1) * 255).round().astype(np.uint8)
    a = _unit(preprocess_batch(ramp, _cfg(32), value_range=[0, 10000]))
    b = _unit(preprocess_batch(as8, _cfg(32)))
    assert (a - b).abs().max() <= 0.6 / 255
