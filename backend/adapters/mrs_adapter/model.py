"""Attach one shared MRS-Adapter to every residual block of both open_clip encoders.

Each block computes ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) + adapter(x)``: the adapter runs parallel
to the MLP on the residual stream after attention. The blocks are walked by :mod:`..towers`; the base
model's modules are not patched, so the base keeps serving unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor

from .. import towers
from ..base import AdaptedModel, MethodSpec, register
from .config import MRSAdapterConfig
from .layers import MRSAdapter


class MRSAdaptedModel(AdaptedModel):
    method = "mrs-adapter"

    def __init__(self, loaded, config: MRSAdapterConfig):
        super().__init__(loaded, config)
        towers.check_vit_clip(self.clip, self.method)
        wt, wv, _, _ = towers.widths(self.clip)
        config.resolve(wt, wv)
        self.adapter = MRSAdapter(wt, wv, config.bottleneck, config.shared_dim, config.dropout)

    def _block_fn(self, modality: str) -> towers.BlockFn:
        layers = self.config.layers

        def block(i: int, blk: ResidualAttentionBlock, x: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
            if layers is not None and i not in layers:
                return blk(x, attn_mask=attn_mask)
            x = x + blk.ls_1(blk.attention(q_x=blk.ln_1(x), attn_mask=attn_mask))
            return x + blk.ls_2(blk.mlp(blk.ln_2(x))) + self.adapter(x, modality)
        return block

    def encode_image(self, images: Tensor, normalize: bool = False, embed_dropout: float = 0.0) -> Tensor:
        x = towers.encode_image(self.clip.visual, images, self._block_fn("vision"), embed_dropout=embed_dropout)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = False, embed_dropout: float = 0.0) -> Tensor:
        x = towers.encode_text(self.clip, tokens, self._block_fn("text"), embed_dropout=embed_dropout)
        return F.normalize(x, dim=-1) if normalize else x


register(MethodSpec(
    name="mrs-adapter", config_cls=MRSAdapterConfig, model_cls=MRSAdaptedModel, prompt_learner=False,
    aliases=("mrs", "mrs-adapter", "pe-rsitr"),
    description="PE-RSITR's multimodal remote sensing adapter (0.16M parameters on ViT-B/32), HMMC loss",
    defaults={"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.01, "epochs": 20, "batch_size": 64,
              "loss": "hmmc", "shots": 16},
))
