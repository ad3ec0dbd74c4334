"""Batched image preprocessing in torch, on the model's device.

Numerically follows open_clip's inference transform (PIL ``Resize(shortest side, bicubic)``, ``CenterCrop``,
``ToTensor``, ``Normalize``) without going through PIL tile by tile: the resize is torch's antialiased
bicubic, and for 8-bit input the result is rounded to 8-bit levels as PIL does.

Input values: ``uint8`` maps [0, 255] to [0, 1]. ``uint16`` maps ``value_range`` when given, else the 2nd
to 98th percentile of the request's valid pixels (a flat image, where both are equal, falls back to
``x / 65535``). Channels: 1 (grey, repeated to RGB), 3 (RGB) or 4 (RGBA: alpha marks valid pixels, see
``tasks.masks``; it is not part of the image).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImageInputError

UINT16_PERCENTILES = (2.0, 98.0)


def value_scale(images: np.ndarray, value_range: Optional[Sequence[float]] = None,
                valid: Optional[np.ndarray] = None) -> Tuple[float, float]:
    """(low, high) input values that map to 0 and 1; uint16 percentiles from the ``valid`` pixels only (a bool
    array of ``images.shape[:-1]``; None: all)."""
    if value_range is not None:
        return float(value_range[0]), float(value_range[1])
    if images.dtype == np.uint8:
        return 0.0, 255.0
    if images.dtype == np.uint16:
        if images.size == 0:
            return 0.0, 65535.0
        sample = (images[..., :3] if valid is None else images[valid][:, :3]).reshape(-1)
        if sample.size == 0:
            return 0.0, 65535.0
        if sample.size > 4_000_000:  # a strided sample is plenty for percentiles
            sample = sample[:: sample.size // 4_000_000]
        lo, hi = np.percentile(sample, UINT16_PERCENTILES)
        return (float(lo), float(hi)) if hi > lo else (0.0, 65535.0)
    raise ImageInputError(f"images must be uint8 or uint16, got {images.dtype}")


def check_images(images: np.ndarray, name: str = "images") -> None:
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ImageInputError(f"'{name}' must be N x H x W x C with C in 1, 3, 4; got shape "
                              f"{list(images.shape)}", name=name)
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ImageInputError(f"'{name}' has an empty image ({list(images.shape)})", name=name)


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """An integer image array as a tensor on ``device``: uint8 stays uint8, other types become float32."""
    if images.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    return torch.from_numpy(images.astype(np.float32)).to(device, non_blocking=True)


def unit_rgb(t: torch.Tensor, scale: Tuple[float, float]) -> torch.Tensor:
    """N x H x W x C tensor (from :func:`to_device`) -> N x 3 x H x W float32 in [0, 1]."""
    lo, hi = scale
    t = t.permute(0, 3, 1, 2)
    t = t[:, :3] if t.shape[1] >= 3 else t[:, :1].expand(-1, 3, -1, -1)
    t = t.float()
    if (lo, hi) != (0.0, 1.0):
        t = (t - lo) / (hi - lo)
    return t.clamp_(0.0, 1.0)


def to_unit_tensor(images: np.ndarray, device: torch.device, scale: Tuple[float, float]) -> torch.Tensor:
    """N x H x W x C integer array -> N x 3 x H x W float32 tensor in [0, 1] on ``device``."""
    return unit_rgb(to_device(images, device), scale)


def resize_shortest_and_crop(x: torch.Tensor, size: Tuple[int, int], quantize: bool) -> torch.Tensor:
    """torchvision ``Resize(min(size))`` on the shorter side + ``CenterCrop(size)``, batched."""
    h, w = x.shape[-2:]
    th, tw = size
    short = min(th, tw)
    if (h, w) != (th, tw):
        if h <= w:
            nh, nw = short, int(short * w / h)
        else:
            nh, nw = int(short * h / w), short
        x = resize_exact(x, (nh, nw), quantize)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        x = x[..., top:top + th, left:left + tw]
    return x


def _to_levels(x: torch.Tensor, quantize: bool) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.round(x * 255.0) / 255.0 if quantize else x


def resize_exact(x: torch.Tensor, size: Tuple[int, int], quantize: bool) -> torch.Tensor:
    """Resize to exactly ``size`` as PIL's bicubic ``resize`` does: horizontal pass, then vertical, each
    clamped (and, for 8-bit input, rounded to 8-bit levels, as PIL stores the intermediate image)."""
    h, w = x.shape[-2:]
    th, tw = size
    if tw != w:
        x = _to_levels(F.interpolate(x, size=(h, tw), mode="bicubic", align_corners=False, antialias=True),
                       quantize)
    if th != h:
        x = _to_levels(F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False, antialias=True),
                       quantize)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def preprocess_batch(images: np.ndarray, loaded, value_range: Optional[Sequence[float]] = None,
                     scale: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """N x H x W x C uint8/uint16 -> normalised N x 3 x S x S model input on ``loaded.device``."""
    check_images(images)
    scale = scale or value_scale(images, value_range)
    x = to_unit_tensor(images, loaded.device, scale)
    x = resize_shortest_and_crop(x, loaded.image_size, quantize=images.dtype == np.uint8)
    return normalize(x, loaded.mean, loaded.std)
