"""Zero-shot classification top-1 (GeoRSCLIP protocol, REFERENCE section 3), for a base CLIP or an adapter."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.tasks.templates import expand, get_templates, normalize_classname

LOGIT_SCALE = 100.0


@torch.no_grad()
def template_class_features(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                            ensemble: str = "georsclip", device=None, batch_size: int = 256) -> Tensor:
    """(C, D) L2-normalised class vectors. ``georsclip``: mean of raw text embeddings over templates, then
    normalise; ``openclip``: normalise each embedding before the mean."""
    if ensemble not in ("georsclip", "openclip"):
        raise ValueError(f"ensemble must be 'georsclip' or 'openclip', got {ensemble!r}")
    device = device or next(model.parameters()).device
    rows = []
    for name in classnames:
        prompts = expand(templates, normalize_classname(name))
        embs = torch.cat([model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float()
                          for i in range(0, len(prompts), batch_size)])
        if ensemble == "openclip":
            embs = F.normalize(embs, dim=-1)
        rows.append(F.normalize(embs.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def class_logits(model, images: Tensor, classnames: Sequence[str], text_features: Optional[Tensor]) -> Tensor:
    """100 x cosine(image, class) for a batch: learned class features (prompt learners) when the model has
    them, else ``text_features`` (C, D)."""
    img = F.normalize(model.encode_image(images).float(), dim=-1)
    learned = model.class_embeddings(list(classnames), images) if hasattr(model, "class_embeddings") else None
    if learned is not None:
        learned = F.normalize(learned.float(), dim=-1)
        if learned.ndim == 3:
            return LOGIT_SCALE * torch.einsum("bd,bcd->bc", img, learned)
        return LOGIT_SCALE * img @ learned.T
    return LOGIT_SCALE * img @ text_features.T


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Percentage of rows whose arg-max is the label."""
    if labels.numel() == 0:
        return float("nan")
    return 100.0 * float((logits.argmax(dim=-1) == labels).float().mean())


@torch.no_grad()
def evaluate_zeroshot(model, tokenizer, samples: Sequence[Tuple[object, int]], classnames: Sequence[str], loader,
                      templates: Sequence[str] | str = "georsclip", ensemble: str = "georsclip",
                      batch_size: int = 64, device=None) -> Dict[str, object]:
    """Top-1 (percent) over ``samples`` = (path, label) pairs; ``loader(paths)`` gives a model-ready batch."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        learned_only = hasattr(model, "class_embeddings") and getattr(model, "method", "") in ("coop", "gdpl")
        if isinstance(templates, str):
            templates = get_templates(templates)
        text = None if learned_only else template_class_features(model, tokenizer, classnames, templates,
                                                                  ensemble, device)
        preds: List[Tensor] = []
        labels = torch.tensor([lab for _, lab in samples], dtype=torch.long)
        for i in range(0, len(samples), batch_size):
            x = loader([p for p, _ in samples[i:i + batch_size]]).to(device)
            preds.append(class_logits(model, x, classnames, text).argmax(dim=-1).cpu())
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    finally:
        model.train(was_training)
    per_class = {c: 100.0 * float((pred[labels == k] == k).float().mean()) for k, c in enumerate(classnames)
                 if (labels == k).any()}
    acc = 100.0 * float((pred == labels).float().mean()) if len(labels) else float("nan")
    return {"top1": acc, "n": int(len(labels)), "classes": len(classnames), "per_class": per_class}
