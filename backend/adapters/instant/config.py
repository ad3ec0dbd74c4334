"""Settings of the instant methods. The shapes of their tensors (cache size, classes) are part of the config,
so an adapter file rebuilds the right shapes before its tensors are copied in."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ..base import ConfigMixin


@dataclass
class InstantCacheConfig(ConfigMixin):
    """Tip-Adapter (Zhang et al. 2022), training-free: logits = 100 f W^T + alpha exp(-beta (1 - g K^T)) L with
    g = normalise(f - m), K the cached examples' embeddings centred the same way (CL2N, as SimpleShot)."""
    classes: List[str] = field(default_factory=list)
    n_cache: int = 0  # cached example embeddings (K: n_cache x D, L: n_cache x C one-hot)
    alpha: float = 1.0  # weight of the cache against the zero-shot classifier
    beta: float = 5.5  # sharpness of the cache affinity


@dataclass
class LinearProbeConfig(ConfigMixin):
    """A linear classifier on the image embeddings, initialised from the class text embeddings (100 W_text):
    logits = f W^T + b, fitted with L-BFGS on cross-entropy + reg ||W - W_init||^2."""
    classes: List[str] = field(default_factory=list)
    reg: float = 1e-2
