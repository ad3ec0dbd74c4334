"""Prompt construction shared by the prompt learners (CoOp, GDPL)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from backend.tasks.templates import normalize_classname


def count_tokens(tokenizer, text: str) -> int:
    """Number of BPE tokens of ``text`` without start/end tokens."""
    ids = tokenizer([text])[0]
    return int((ids != 0).sum()) - 2


def context_from_words(clip: nn.Module, tokenizer, words: str) -> Tensor:
    """Token embeddings of ``words`` (n x width), the usual prompt-learner initialisation."""
    n = count_tokens(tokenizer, words)
    tokens = tokenizer([words]).to(clip.token_embedding.weight.device)
    with torch.no_grad():
        return clip.token_embedding(tokens)[0, 1:1 + n].detach().clone().float()


def prompt_tokens(tokenizer, prefix: str, classnames: Sequence[str], device) -> Tensor:
    """Tokens of ``"{prefix} {class}."`` for each (normalised) class name."""
    return tokenizer([f"{prefix} {normalize_classname(c)}." for c in classnames]).to(device)


def insert_context(clip: nn.Module, tokens: Tensor, ctx: Tensor) -> Tensor:
    """Token embeddings of ``tokens`` with positions 1..n replaced by ``ctx``.

    ``ctx``: (n, W) shared, or (B, n, W) per image, which gives (B * C, L, W) ordered image-major.
    """
    emb = clip.token_embedding(tokens)  # C x L x W
    n = ctx.shape[-2]
    if ctx.ndim == 2:
        ctx = ctx.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + n:]], dim=1)
    b, c = ctx.shape[0], tokens.shape[0]
    emb = emb.unsqueeze(0).expand(b, -1, -1, -1)
    ctx = ctx.unsqueeze(1).expand(-1, c, -1, -1).to(emb.dtype)
    out = torch.cat([emb[:, :, :1], ctx, emb[:, :, 1 + n:]], dim=2)
    return out.reshape(b * c, *out.shape[2:])
