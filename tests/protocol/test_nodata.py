"""The multi-band valid-pixel rule (``shared_protocol.nodata``), under QGIS's numpy 1.24 and the venv's numpy 2."""
from __future__ import annotations

import numpy as np
import pytest

from shared_protocol.nodata import valid_pixels


def test_a_pixel_is_valid_only_when_every_band_and_the_alpha_say_so():
    rng = np.random.default_rng(0)
    masks = [rng.random((20, 30)) > 0.2 for _ in range(3)]
    alpha = rng.integers(0, 3, (20, 30)).astype(np.uint16) * 120  # 0, 120, 240: raw values, 0 is transparent
    want = masks[0] & masks[1] & masks[2] & (alpha != 0)
    got = valid_pixels([(m * 255).astype(np.uint8) for m in masks], alpha=[alpha])
    assert got.dtype == bool and np.array_equal(got, want)
    one_band = [np.ones((20, 30), bool), masks[1], None]  # nodata in one band of three is enough
    assert np.array_equal(valid_pixels(one_band), masks[1])
    assert valid_pixels([None], alpha=[np.full((2, 2), 1, np.uint16)]).all()


def test_non_finite_float_values_are_invalid():
    values = np.ones((3, 3, 4), np.float32)
    values[0, 1, 2] = np.nan
    values[2, 0, 0] = -np.inf
    ints = np.zeros((3, 4), np.uint8)  # integer values never invalidate by themselves
    got = valid_pixels([None, None, None], values=list(values) + [ints])
    want = np.ones((3, 4), bool)
    want[1, 2] = want[0, 0] = False
    assert np.array_equal(got, want)
    assert np.array_equal(valid_pixels([None, None, None], values=values), want)  # a C x H x W array too


@pytest.mark.parametrize("bands, alpha", [([], []), ([np.ones((2, 2))], [np.ones((3, 2))]), ([np.ones(4)], [])])
def test_shapes_are_checked(bands, alpha):
    with pytest.raises(ValueError):
        valid_pixels(bands, alpha=alpha)
