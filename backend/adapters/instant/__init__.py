"""Instant methods (no gradient through the model): a Tip-Adapter-style cache and a linear probe on the frozen
model's image embeddings, fitted in seconds on a CPU (see :mod:`.fit`)."""
from .config import InstantCacheConfig, LinearProbeConfig
from .model import InstantCacheModel, LinearProbeModel

__all__ = ["InstantCacheConfig", "InstantCacheModel", "LinearProbeConfig", "LinearProbeModel"]
