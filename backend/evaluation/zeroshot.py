"""Zero-shot top-1 over a labelled image set (GeoRSCLIP protocol, REFERENCE section 3), for a base CLIP or
an adapter. The class features and logits are ``backend.zeroshot``'s: the same as the served classify."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from backend import zeroshot
from backend.tasks.templates import get_templates


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Percentage of rows whose arg-max is the label."""
    if labels.numel() == 0:
        return float("nan")
    return 100.0 * float((logits.argmax(dim=-1) == labels).float().mean())


@torch.no_grad()
def evaluate_zeroshot(model, tokenizer, samples: Sequence[Tuple[object, int]], classnames: Sequence[str], loader,
                      templates: Sequence[str] | str = "georsclip", ensemble: str = "georsclip",
                      batch_size: int = 64, device=None) -> Dict[str, object]:
    """Top-1 (percent) over ``samples`` = (path, label) pairs; ``loader(paths)`` gives a model-ready batch.
    ``predictions``: the predicted class index of each sample, in order."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if isinstance(templates, str):
            templates = get_templates(templates)
        encode_text = zeroshot.model_text_encoder(model, tokenizer, device)
        classifier = zeroshot.Classifier(model, classnames, lambda: zeroshot.class_features(
            model, classnames, encode_text, templates, ensemble))
        preds: List[Tensor] = []
        labels = torch.tensor([lab for _, lab in samples], dtype=torch.long)
        for i in range(0, len(samples), batch_size):
            x = loader([p for p, _ in samples[i:i + batch_size]]).to(device)
            preds.append(classifier.logits(zeroshot.image_features(model, x), x).argmax(dim=-1).cpu())
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    finally:
        model.train(was_training)
    per_class = {c: 100.0 * float((pred[labels == k] == k).float().mean()) for k, c in enumerate(classnames)
                 if (labels == k).any()}
    acc = 100.0 * float((pred == labels).float().mean()) if len(labels) else float("nan")
    return {"top1": acc, "n": int(len(labels)), "classes": len(classnames), "per_class": per_class,
            "predictions": pred.tolist()}
