"""Zero-shot classification, written once: the class features and the logits that classify (the served
path), ``eval zeroshot`` and ``reproduce`` all use (as open_clip keeps one ``zero_shot_classifier``).

The one rule, :class:`Classifier`, for the logits a model gives L2-normalised image features over classes:

- a model with its own head on the image features (``classify_features``: the instant adapters) answers with
  that head, over the requested classes (a subset of its own, in any order);
- a prompt learner whose ``class_embeddings(classnames, images)`` answers (CoOp: C x D; GDPL: N x C x D, one
  set per image, ``image_conditioned``) is classified with its learned class features;
- any other model (the base CLIP, LoRA, MRS-Adapter) with prompt ensembling over hand-written templates
  (REFERENCE section 3); either way 100 x cosine.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks.templates import expand, normalize_classname

LOGIT_SCALE = 100.0
ENSEMBLES = ("georsclip", "openclip")
TextEncoder = Callable[[List[str]], Tensor]  # prompts -> raw (unnormalised) float embeddings
Progress = Callable[[float, str], None]


def feature_head(model) -> Optional[Callable[[Tensor, Sequence[str]], Tensor]]:
    """The model's own head on image features (``classify_features(feats, classes) -> logits``), if any."""
    return getattr(model, "classify_features", None)


def is_image_conditioned(model) -> bool:
    """Whether the model's class features depend on the image (GDPL): classify batch by batch."""
    return feature_head(model) is None and bool(getattr(model, "image_conditioned", False))


def image_features(model, images: Tensor) -> Tensor:
    """(N, D) L2-normalised float image features of a model-ready batch (an instant adapter's are the base's)."""
    return F.normalize(model.encode_image(images).float(), dim=-1)


def learned_class_features(model, classnames: Sequence[str], images: Optional[Tensor] = None) -> Optional[Tensor]:
    """A prompt learner's own L2-normalised class features, or ``None`` when the model has none."""
    learned = getattr(model, "class_embeddings", None)
    if learned is None:
        return None
    feats = learned(list(classnames), images if is_image_conditioned(model) else None)
    return None if feats is None else F.normalize(feats.float(), dim=-1)


def template_class_features(encode_text: TextEncoder, classnames: Sequence[str], templates: Sequence[str],
                            ensemble: str = "georsclip", progress: Optional[Progress] = None) -> Tensor:
    """(C, D) L2-normalised class vectors by prompt ensembling.

    ``georsclip`` (GeoRSCLIP's protocol, the default): mean of the raw text embeddings over the templates,
    then L2-normalise. ``openclip`` (open_clip's classifier): L2-normalise each embedding before the mean.
    ``progress`` is called between classes (so a pending cancel stops a long class list).
    """
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    rows = []
    for i, name in enumerate(classnames):
        if progress is not None:
            progress(i / max(len(classnames), 1), f"class prompts {i}/{len(classnames)}")
        embs = encode_text(expand(templates, normalize_classname(name))).float()
        if ensemble == "openclip":
            embs = F.normalize(embs, dim=-1)
        rows.append(F.normalize(embs.mean(dim=0), dim=-1))
    return torch.stack(rows)


def class_features(model, classnames: Sequence[str], encode_text: TextEncoder, templates: Sequence[str],
                   ensemble: str = "georsclip", images: Optional[Tensor] = None,
                   progress: Optional[Progress] = None) -> Tensor:
    """The class features zero-shot uses for ``model``: learned ones when it has them, else templates."""
    learned = learned_class_features(model, classnames, images)
    if learned is not None:
        return learned
    return template_class_features(encode_text, classnames, templates, ensemble, progress)


def model_text_encoder(model, tokenizer, device=None, batch_size: int = 256) -> TextEncoder:
    """``encode_text`` of a model (base CLIP or adapter) as a :data:`TextEncoder`, in batches."""
    device = device or next(model.parameters()).device

    def encode(prompts: List[str]) -> Tensor:
        return torch.cat([model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float()
                          for i in range(0, len(prompts), batch_size)])
    return encode


def logits(image_features: Tensor, class_feats: Tensor) -> Tensor:
    """100 x cosine: (N, D) normalised image features against (C, D) or per-image (N, C, D) class features."""
    if class_feats.ndim == 3:
        return LOGIT_SCALE * torch.einsum("nd,ncd->nc", image_features, class_feats)
    return LOGIT_SCALE * image_features @ class_feats.T


class Classifier:
    """Zero-shot logits of one model over one class list: THE rule of this module (see its docstring).

    ``class_feats`` gives :func:`class_features` of the model and classes (a callable, so that a caller can
    cache them and a model that does not need them never encodes a prompt); it is called once, when first
    needed. An image-conditioned model needs the batch's ``images`` (model-ready) with its features.
    Classes a feature head does not know raise its typed error here, before any image is encoded.
    """

    def __init__(self, model, classnames: Sequence[str], class_feats: Callable[[], Tensor]):
        self.model, self.classnames = model, list(classnames)
        self.head = feature_head(model)
        self.image_conditioned = is_image_conditioned(model)
        self._class_feats, self._fixed = class_feats, None
        columns = getattr(model, "class_columns", None)
        if self.head is not None and columns is not None:
            columns(self.classnames)

    def logits(self, image_feats: Tensor, images: Optional[Tensor] = None) -> Tensor:
        """(N, C) logits of (N, D) L2-normalised image features."""
        if self.head is not None:
            return self.head(image_feats, self.classnames).float()
        if self.image_conditioned:
            if images is None:
                raise ValueError("an image-conditioned model needs the images with their features")
            return logits(image_feats, learned_class_features(self.model, self.classnames, images))
        if self._fixed is None:
            self._fixed = self._class_feats()
        return logits(image_feats, self._fixed.to(image_feats.device))

    def probabilities(self, image_feats: Tensor, images: Optional[Tensor] = None) -> Tensor:
        """softmax of :meth:`logits` over the classes."""
        return self.logits(image_feats, images).softmax(dim=-1)
