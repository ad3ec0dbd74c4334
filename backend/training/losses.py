"""Losses: CLIP InfoNCE, PE-RSITR's HMMC, and cross-entropy for prompt learners.

All contrastive terms take L2-normalised features and CLIP's temperature as ``scale = logit_scale.exp()``.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_SCALE = 100.0


def temperature(logit_scale: Tensor) -> Tensor:
    """CLIP's learned temperature as a multiplier, clamped at 100 like CLIP training."""
    return logit_scale.exp().clamp(max=MAX_SCALE)


def info_nce(a: Tensor, b: Tensor, scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE between matched rows of ``a`` and ``b`` (CLIP's loss)."""
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def hmmc_loss(img: Tensor, img_aug: Tensor, txt: Tensor, txt_aug: Tensor, scale: Tensor | float,
              weights: Sequence[float] = (1.0, 1.0, 1.0)) -> Tuple[Tensor, Dict[str, float]]:
    """Hybrid multi-modal contrastive loss: image vs augmented image, image vs text, text vs augmented text.

    The weights are not published (REFERENCE section 6): equal by default, normalised to sum 1.
    """
    w = torch.tensor([float(x) for x in weights])
    if w.numel() != 3 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"HMMC weights must be three non-negative numbers, got {list(weights)}")
    w = w / w.sum()
    parts = {"ii": info_nce(img, img_aug, scale), "it": info_nce(img, txt, scale), "tt": info_nce(txt, txt_aug, scale)}
    total = w[0] * parts["ii"] + w[1] * parts["it"] + w[2] * parts["tt"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def prompt_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over class logits (``scale * cosine(image, class text features)``)."""
    return F.cross_entropy(logits, labels)
