"""open_clip CLIP encoders re-implemented block by block, so adapters can change what happens in each block.

With the default block function both encoders give exactly ``CLIP.encode_image`` / ``CLIP.encode_text``
(a test checks it). Supported: ``open_clip.CLIP`` with a ``VisionTransformer`` image tower and
``ResidualAttentionBlock`` blocks run batch-first (every ViT CLIP in open_clip 3.x).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer, text_global_pool
from torch import Tensor, nn

from ..errors import AdapterError

BlockFn = Callable[[int, ResidualAttentionBlock, Tensor, Optional[Tensor]], Tensor]
PreBlockFn = Callable[[int, Tensor], Tensor]


def check_vit_clip(model: nn.Module, method: str) -> None:
    """Refuse models whose encoders these adapters cannot walk through."""
    ok = isinstance(model, CLIP) and isinstance(model.visual, VisionTransformer)
    ok = ok and all(isinstance(b, ResidualAttentionBlock) for b in model.transformer.resblocks)
    ok = ok and all(isinstance(b, ResidualAttentionBlock) for b in model.visual.transformer.resblocks)
    ok = ok and model.transformer.batch_first and model.visual.transformer.batch_first
    if not ok:
        raise AdapterError(f"{method} needs an open_clip ViT CLIP (CLIP + VisionTransformer with standard "
                           f"residual attention blocks); got {type(model).__name__} / "
                           f"{type(getattr(model, 'visual', None)).__name__}", method=method)


def widths(model: CLIP) -> Tuple[int, int, int, int]:
    """(text width, vision width, text layers, vision layers)."""
    return (model.transformer.width, model.visual.transformer.width, len(model.transformer.resblocks),
            len(model.visual.transformer.resblocks))


def default_block(i: int, blk: ResidualAttentionBlock, x: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
    return blk(x, attn_mask=attn_mask)


def run_blocks(transformer: nn.Module, x: Tensor, attn_mask: Optional[Tensor], block_fn: BlockFn,
               pre_block: Optional[PreBlockFn] = None) -> Tensor:
    for i, blk in enumerate(transformer.resblocks):
        if pre_block is not None:
            x = pre_block(i, x)
        x = block_fn(i, blk, x, attn_mask)
    return x


def encode_text(model: CLIP, tokens: Tensor, block_fn: BlockFn = default_block, embeds: Optional[Tensor] = None,
                pre_block: Optional[PreBlockFn] = None, embed_dropout: float = 0.0) -> Tensor:
    """CLIP text features; ``embeds`` replaces the token embeddings (prompt learners), ``tokens`` still
    decides where the end-of-text token is pooled."""
    cast = model.transformer.get_cast_dtype()
    x = (model.token_embedding(tokens) if embeds is None else embeds).to(cast)
    x = x + model.positional_embedding.to(cast)
    if embed_dropout > 0:
        x = F.dropout(x, embed_dropout, training=True)
    x = run_blocks(model.transformer, x, model.attn_mask, block_fn, pre_block)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x


def encode_image(visual: VisionTransformer, images: Tensor, block_fn: BlockFn = default_block,
                 extra_tokens: Optional[Tensor] = None, pre_block: Optional[PreBlockFn] = None,
                 embed_dropout: float = 0.0) -> Tensor:
    """Pooled, projected image features. ``extra_tokens`` (N x P x W) are appended after the patch tokens
    before ``ln_pre`` (visual prompts) and dropped again before pooling."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    n_extra = 0 if extra_tokens is None else extra_tokens.shape[1]
    if n_extra:
        x = torch.cat([x, extra_tokens.to(x.dtype)], dim=1)
    x = visual.ln_pre(x)
    if embed_dropout > 0:
        x = F.dropout(x, embed_dropout, training=True)
    x = run_blocks(visual.transformer, x, None, block_fn, pre_block)
    if n_extra:
        x = x[:, :-n_extra]
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def attention_with_deltas(attn: nn.MultiheadAttention, x: Tensor, attn_mask: Optional[Tensor],
                          qkv_delta: Optional[Callable[[Tensor], Tensor]] = None,
                          out_delta: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``nn.MultiheadAttention`` (batch first, self-attention, no dropout) computed by hand, with optional
    additive updates of the QKV projection and of the output projection (low-rank adaptation)."""
    n, length, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    if qkv_delta is not None:
        qkv = qkv + qkv_delta(x)
    q, k, v = (t.reshape(n, length, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
    mask = attn_mask.to(q.dtype) if attn_mask is not None else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = o.transpose(1, 2).reshape(n, length, d)
    out = F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
    if out_delta is not None:
        out = out + out_delta(o)
    return out
