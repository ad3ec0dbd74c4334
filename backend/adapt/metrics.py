"""Held-out accuracy, per class, and the confusion matrix (numpy only)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np


def accuracy_report(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Dict[str, Any]:
    """``{"top1", "n", "per_class": {class: % or None}, "confusion": rows = truth, columns = prediction}``
    (percentages; ``None`` where there is nothing to count)."""
    pred, labels = np.asarray(pred, int), np.asarray(labels, int)
    c = len(classes)
    confusion = np.zeros((c, c), int)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {name: (100.0 * confusion[k, k] / confusion[k].sum() if confusion[k].sum() else None)
                 for k, name in enumerate(classes)}
    return {"top1": 100.0 * float((pred == labels).mean()) if len(labels) else None, "n": int(len(labels)),
            "per_class": per_class, "confusion": confusion.tolist()}


def format_report(classes: Sequence[str], zero_shot: Dict[str, Any], adapted: Dict[str, Any]) -> List[str]:
    """A readable table: accuracies per class (zero-shot vs adapted), then the adapted confusion matrix."""
    def pct(v):
        return "   -  " if v is None else f"{v:6.1f}"
    width = max(8, *(len(c) for c in classes))
    lines = [f"held-out accuracy on {adapted['n']} chips (%)", f"{'class':{width}}  zero-shot  adapted"]
    for c in classes:
        lines.append(f"{c:{width}}    {pct(zero_shot['per_class'].get(c))}   {pct(adapted['per_class'].get(c))}")
    lines.append(f"{'all':{width}}    {pct(zero_shot['top1'])}   {pct(adapted['top1'])}")
    lines.append("confusion (rows: truth, columns: adapted prediction)")
    lines.append(" " * (width + 1) + " ".join(f"{c[:6]:>6}" for c in classes))
    for c, row in zip(classes, adapted["confusion"], strict=True):
        lines.append(f"{c:{width}} " + " ".join(f"{v:6d}" for v in row))
    return lines
