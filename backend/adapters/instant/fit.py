"""Fitting the instant methods from embeddings: closed-form cache, grid-tuned blend, L-BFGS probe.

Inputs are float tensors of L2-normalised image embeddings (N x D), labels (N,) and the zero-shot class
vectors (C x D). Hyper-parameters are chosen on the validation examples (best accuracy, then lowest
cross-entropy); without validation examples, on the training examples left out one group at a time.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LOGIT_SCALE = 100.0
ALPHAS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0, 1000.0)
RELATIVE_BETAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
REGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _score(logits: Tensor, labels: Tensor) -> Tuple[float, float]:
    """(accuracy, -cross-entropy): larger is better, compared as a tuple."""
    acc = float((logits.argmax(dim=1) == labels).float().mean())
    return acc, -float(F.cross_entropy(logits, labels))


def cache_keys(train: Tensor, centre: bool = True) -> Tuple[Tensor, Tensor]:
    """(keys: the training embeddings, centred on their mean when ``centre``, L2-normalised; that mean or 0)."""
    mean = train.mean(dim=0) if centre else torch.zeros(train.shape[1], dtype=train.dtype)
    return F.normalize(train - mean, dim=-1), mean


def cache_terms(feats: Tensor, keys: Tensor, mean: Tensor, text: Tensor) -> Tuple[Tensor, Tensor]:
    """(zero-shot logits N x C, cosine of the (centred) embeddings to the cache N x K)."""
    return LOGIT_SCALE * feats @ text.T, F.normalize(feats - mean, dim=-1) @ keys.T


def _np_score(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, float]:
    """(accuracy, -cross-entropy) in numpy: larger is better, compared as a tuple."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float((logits.argmax(axis=1) == labels).mean()), float(logp[np.arange(len(labels)), labels].mean())


def tune_cache(train: Tensor, train_labels: Tensor, text: Tensor, val: Optional[Tensor] = None,
               val_labels: Optional[Tensor] = None, train_groups: Optional[Tensor] = None) -> Dict[str, Any]:
    """Centring, alpha and beta of the Tip-Adapter blend, on the validation examples (or leave-one-group-out).

    beta is searched relative to the typical cosine distance d between cached examples (beta = b / d): the
    embeddings of one model may all lie within a few degrees of each other (a random model's do), where a
    fixed grid would never reach the sharpness of a nearest-neighbour vote. numpy, not torch: a few hundred
    tiny products, where torch's threading costs more than the arithmetic.
    """
    c = text.shape[0]
    values = F.one_hot(train_labels, c).double().numpy()
    best: Tuple[Tuple[float, float], float, float, bool] = ((-1.0, float("-inf")), 1.0, 5.5, False)
    for centre in (False, True):
        keys_t, mean_t = cache_keys(train, centre)
        keys = keys_t.double().numpy()
        spread = float(np.clip(1.0 - keys @ keys.T, 0, None).mean()) or 1.0
        if val is not None and len(val):
            zs_t, cos_t = cache_terms(val, keys_t, mean_t, text)
            labels, exclude = val_labels.numpy(), None
        else:  # every training example scored by the cache without the examples of its own group
            zs_t, cos_t = cache_terms(train, keys_t, mean_t, text)
            labels = train_labels.numpy()
            groups = (train_groups if train_groups is not None else torch.arange(len(train))).numpy()
            exclude = groups[:, None] == groups[None, :]
        zs, cos = zs_t.double().numpy(), cos_t.double().numpy()
        for b in RELATIVE_BETAS:
            beta = b / spread
            affinity = np.exp(-beta * (1.0 - cos))
            if exclude is not None:
                affinity[exclude] = 0.0
            cache = affinity @ values
            for alpha in ALPHAS:
                score = _np_score(zs + alpha * cache, labels)
                if score > best[0]:
                    best = (score, alpha, beta, centre)
    return {"alpha": best[1], "beta": best[2], "centre": best[3], "tuning_accuracy": 100.0 * best[0][0]}


def fit_probe(train: Tensor, labels: Tensor, text: Tensor, reg: float, steps: int = 200) -> Tuple[Tensor, Tensor]:
    """(W, b) minimising CE(f W^T + b) + reg * ||V - V_init||^2 / N with L-BFGS (scipy), in standardised
    coordinates.

    The embeddings are standardised per dimension (z = (f - mu) / sigma) so that L-BFGS works on a well
    conditioned problem; the result is mapped back exactly: W = V / sigma, b = c - (mu / sigma) V^T.
    ``V_init`` is the zero-shot classifier (100 x text vectors) in those coordinates. numpy, not torch:
    thousands of tiny operations, where torch's threading costs more than the arithmetic.
    """
    from scipy.optimize import minimize
    f, t = train.double().cpu().numpy(), text.double().cpu().numpy()
    y = labels.cpu().numpy()
    n, (c, d) = max(len(f), 1), t.shape
    mu, sigma = f.mean(axis=0), np.maximum(f.std(axis=0), 1e-6)
    z = (f - mu) / sigma
    v_init, c_init = LOGIT_SCALE * t * sigma, LOGIT_SCALE * t @ mu
    onehot = np.eye(c)[y]

    def loss_grad(x: np.ndarray):
        v, b = x[:c * d].reshape(c, d), x[c * d:]
        logits = z @ v.T + b
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        g = (np.exp(logp) - onehot) / n
        diff = v - v_init
        loss = -(onehot * logp).sum() / n + reg * (diff ** 2).sum() / n
        return loss, np.concatenate([(g.T @ z + 2 * reg * diff / n).ravel(), g.sum(axis=0)])

    x0 = np.concatenate([v_init.ravel(), c_init])
    x = minimize(loss_grad, x0, jac=True, method="L-BFGS-B", options={"maxiter": steps}).x
    v, b = x[:c * d].reshape(c, d), x[c * d:]
    weight, bias = v / sigma, b - (mu / sigma) @ v.T
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


def tune_probe(train: Tensor, labels: Tensor, text: Tensor, val: Optional[Tensor] = None,
               val_labels: Optional[Tensor] = None, regs: Sequence[float] = REGS) -> Dict[str, object]:
    """The probe with the regularisation that scores best on the validation examples (the middle one without)."""
    if val is None or not len(val):
        reg = regs[len(regs) // 2]
        w, b = fit_probe(train, labels, text, reg)
        return {"reg": reg, "weight": w, "bias": b, "tuning_accuracy": None}
    best = None
    for reg in regs:
        w, b = fit_probe(train, labels, text, reg)
        score = _score(val @ w.T + b, val_labels)
        if best is None or score > best[0]:
            best = (score, reg, w, b)
    assert best is not None
    return {"reg": best[1], "weight": best[2], "bias": best[3], "tuning_accuracy": 100.0 * best[0][0]}
