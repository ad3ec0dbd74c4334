"""The instant methods as adapted models: the base encoders unchanged, a closed-set head on image embeddings.

The engine serves them like any adapter (``encode_image`` / ``encode_text`` are the base model's); zero-shot
(``backend.zeroshot.Classifier``: classify, ``eval zeroshot``, the trainer's evaluation) asks
:meth:`FeatureHead.classify_features` for the logits of the requested classes (a subset of the adapter's
classes, in any order).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backend.errors import DataError

from ..base import AdaptedModel, MethodSpec, register
from ..towers import AdapterError
from .config import InstantCacheConfig, LinearProbeConfig

LOGIT_SCALE = 100.0


class FeatureHead(AdaptedModel):
    """An adapted model whose adaptation is a head on the frozen model's L2-normalised image embeddings."""

    instant = True
    base_features = True  # the engine encodes images and texts with the base model (see Engine.feature_source)

    def __init__(self, loaded, config):
        super().__init__(loaded, config)
        if len(config.classes) < 2:
            raise AdapterError(f"{self.method} needs at least 2 classes, got {config.classes}")
        self.classes: List[str] = list(config.classes)
        self.adapter = nn.Module()

    def encode_image(self, images: Tensor, normalize: bool = False, **_: object) -> Tensor:
        dtype = self.clip.logit_scale.dtype  # the base may be a bf16 copy on a CPU with native bf16
        return self.clip.encode_image(images.to(dtype), normalize=normalize).float()

    def encode_text(self, tokens: Tensor, normalize: bool = False, **_: object) -> Tensor:
        return self.clip.encode_text(tokens, normalize=normalize).float()

    def head_logits(self, feats: Tensor) -> Tensor:
        """(N, D) L2-normalised image embeddings -> (N, C) logits over the adapter's classes."""
        raise NotImplementedError

    def class_columns(self, classes: Sequence[str]) -> List[int]:
        """Where each requested class is among the adapter's (names compared as the model normalises them)."""
        from backend.tasks.templates import normalize_classname
        own = {normalize_classname(c): i for i, c in enumerate(self.classes)}
        missing = [c for c in classes if normalize_classname(c) not in own]
        if missing:
            raise DataError(f"the {self.method} adapter knows the classes {self.classes}, not {missing}",
                            reason="unknown_class", classes=self.classes)
        return [own[normalize_classname(c)] for c in classes]

    def classify_features(self, feats: Tensor, classes: Sequence[str]) -> Tensor:
        """Logits for ``classes`` (a subset of the adapter's) from L2-normalised image embeddings."""
        cols = self.class_columns(classes)
        with torch.no_grad():
            return self.head_logits(feats.float())[:, cols]

    def class_logits(self, images: Tensor, classnames: List[str]) -> Tensor:
        return self.classify_features(F.normalize(self.encode_image(images), dim=-1), classnames)

    def header_extra(self):
        return {"classes": list(self.classes)}


def centred(feats: Tensor, mean: Tensor) -> Tensor:
    """L2-normalise after subtracting the examples' mean (SimpleShot's CL2N): the cache compares what differs
    between places, not the direction all of a model's embeddings share."""
    return F.normalize(feats - mean, dim=-1)


class InstantCacheModel(FeatureHead):
    method = "instant-cache"

    def __init__(self, loaded, config: InstantCacheConfig):
        super().__init__(loaded, config)
        c, n, d = len(config.classes), int(config.n_cache), int(loaded.embed_dim)
        self.adapter.text = nn.Parameter(torch.zeros(c, d))  # zero-shot class vectors W (C x D)
        self.adapter.keys = nn.Parameter(torch.zeros(n, d))  # cached example embeddings K (N x D)
        self.adapter.values = nn.Parameter(torch.zeros(n, c))  # their one-hot labels L (N x C)
        self.adapter.mean = nn.Parameter(torch.zeros(d))  # the examples' mean embedding (centring, CL2N)

    def head_logits(self, feats: Tensor) -> Tensor:
        a = self.adapter
        zero_shot = LOGIT_SCALE * feats @ a.text.T
        affinity = torch.exp(-self.config.beta * (1.0 - centred(feats, a.mean) @ a.keys.T))
        return zero_shot + self.config.alpha * affinity @ a.values


class LinearProbeModel(FeatureHead):
    method = "linear-probe"

    def __init__(self, loaded, config: LinearProbeConfig):
        super().__init__(loaded, config)
        c, d = len(config.classes), int(loaded.embed_dim)
        self.adapter.weight = nn.Parameter(torch.zeros(c, d))
        self.adapter.bias = nn.Parameter(torch.zeros(c))

    def head_logits(self, feats: Tensor) -> Tensor:
        return feats @ self.adapter.weight.T + self.adapter.bias


register(MethodSpec(
    name="instant-cache", config_cls=InstantCacheConfig, model_cls=InstantCacheModel, prompt_learner=False,
    description="Tip-Adapter-style cache of example embeddings blended with the zero-shot classifier (no "
                "gradient; alpha, beta tuned on the validation split)",
    defaults={"instant": True}, aliases=("tip-adapter", "cache")))
register(MethodSpec(
    name="linear-probe", config_cls=LinearProbeConfig, model_cls=LinearProbeModel, prompt_learner=False,
    description="linear probe on the image embeddings, initialised from the class text embeddings (L-BFGS)",
    defaults={"instant": True}, aliases=("probe",)))
