"""The validation split by example: whole polygons (or points) go to one side, never single chips."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

VAL_FRACTION = 0.3


def split_by_group(labels: np.ndarray, groups: np.ndarray, val_fraction: float = VAL_FRACTION,
                   seed: int = 0) -> np.ndarray:
    """Held-out flags (bool, per chip): for each class, ``val_fraction`` of its groups (at least one when the
    class has two or more groups, none when it has one), drawn with ``seed``. All chips of a group share
    one side."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        ids = np.unique(groups[labels == c])
        if len(ids) < 2:
            continue
        n_val = min(len(ids) - 1, max(1, int(round(val_fraction * len(ids)))))
        held |= np.isin(groups, rng.choice(ids, n_val, replace=False))
    return held


def groups_on_both_sides(groups: np.ndarray, held_out: np.ndarray) -> List[int]:
    """Group ids with chips in training and in validation (must be empty)."""
    groups, held_out = np.asarray(groups), np.asarray(held_out).astype(bool)
    return sorted(int(g) for g in set(groups[held_out].tolist()) & set(groups[~held_out].tolist()))


def class_counts(labels: np.ndarray, classes: List[str], held_out: np.ndarray | None = None,
                 groups: np.ndarray | None = None) -> Dict[str, Dict[str, int]]:
    """Per class: chips in training and validation (and examples, when groups are given)."""
    labels = np.asarray(labels)
    held = np.zeros(len(labels), bool) if held_out is None else np.asarray(held_out).astype(bool)
    out: Dict[str, Dict[str, int]] = {}
    for k, c in enumerate(classes):
        sel = labels == k
        row = {"train": int((sel & ~held).sum()), "held_out": int((sel & held).sum())}
        if groups is not None:
            row["examples"] = int(len(np.unique(np.asarray(groups)[sel])))
        out[c] = row
    return out
