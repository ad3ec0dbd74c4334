"""GDPL on an open_clip ViT CLIP: domain-conditioned quaternion prompts, hierarchical vision prompts and a
coupled low-rank adaptation of both encoders (REFERENCE section 6, shapes derived from the model).

Per image: ``f_d`` from the frozen domain model; ``b = DomainBias(f_d)``; ``ctx' = ctx + b (+ noise while
training)``; text context ``= QLinear(2W_t -> W_t)(concat(0, ctx'))``. Layer 0 of the image encoder gets
``Linear(W_t -> W_v)(ctx)`` appended after the patch tokens; in layers ``l = 1..depth-1`` the text stream's
context slots are replaced by the deep prompt ``p_l`` and the image stream's prompt slots by
``QLinear_l(2W_t -> W_v)(concat(0, p_l + b))`` (zeros first, as the released ``trainer/maple.py``). Attention
layers ``0..lora_depth-1`` of both encoders get the coupled low-rank update. ``depth`` values are capped at
the encoders' depth (9 in the paper). ``variant="released"``: the released code's behaviours (config.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from .. import towers
from ..base import AdaptedModel, MethodSpec, register
from ..coop.layers import context_from_words, prompt_tokens, insert_context
from ..towers import AdapterError
from .config import GDPLConfig
from .domain import build_domain_encoder
from .layers import CoupledLoRA, DomainBias, QuaternionLinear


class GDPLPrompts(nn.Module):
    def __init__(self, ctx: Tensor, domain_dim: int, text_width: int, vision_width: int, depth: int,
                 hidden: int, deep_std: float, shared_deep_init: bool = False):
        super().__init__()
        n = ctx.shape[0]
        self.ctx = nn.Parameter(ctx)
        self.domain_bias = DomainBias(domain_dim, text_width, hidden)
        self.q_text = QuaternionLinear(2 * text_width, text_width)
        self.deep_text = nn.Parameter(torch.randn(depth - 1, n, text_width) * deep_std)
        self.q_vision = nn.ModuleList([QuaternionLinear(2 * text_width, vision_width) for _ in range(depth - 1)])
        if shared_deep_init:  # the released code deep-copies one initialised layer to every depth
            for q in self.q_vision[1:]:
                q.load_state_dict(self.q_vision[0].state_dict())
        self.shallow_vision = nn.Linear(text_width, vision_width)


class GDPLAdaptedModel(AdaptedModel):
    method = "gdpl"
    image_conditioned = True

    def __init__(self, loaded, config: GDPLConfig):
        super().__init__(loaded, config)
        towers.check_vit_clip(self.clip, self.method)
        wt, wv, lt, lv = towers.widths(self.clip)
        if wt % 4 or wv % 4:
            raise AdapterError(f"GDPL's quaternion layers need widths divisible by 4 (text {wt}, vision {wv})")
        config.prompt_depth = max(1, min(config.prompt_depth, lt, lv))
        config.lora_depth = max(0, min(config.lora_depth, lt, lv))
        words = config.ctx_init.split()
        if len(words) < config.n_ctx:
            raise AdapterError(f"ctx_init {config.ctx_init!r} has fewer than n_ctx={config.n_ctx} words")
        ctx = context_from_words(self.clip, self.tokenizer, " ".join(words[:config.n_ctx]))
        if ctx.shape[0] != config.n_ctx:  # a word of several BPE tokens
            raise AdapterError(f"the first {config.n_ctx} words of ctx_init must be one token each")
        self.prefix = config.ctx_init
        self.released = config.variant == "released"
        self.domain = build_domain_encoder(config, loaded)
        self.adapter = nn.ModuleDict({
            "prompts": GDPLPrompts(ctx, self.domain.dim, wt, wv, config.prompt_depth, config.domain_hidden,
                                   config.deep_prompt_std, shared_deep_init=self.released),
            "lora": CoupledLoRA(wt, wv, config.lora_depth, config.lora_rank, config.lora_alpha,
                                config.out_lora_scale, frozen_coupling=self.released),
        })

    # -- pieces -------------------------------------------------------------------------------------------
    def conditioning(self, images: Tensor) -> Dict[str, Tensor]:
        """Per-image text context (B, n, W_t) and vision prompts (B, n, W_v) for layers 0..depth-1."""
        p = self.adapter["prompts"]
        f_d = self.domain(images)
        b = p.domain_bias(f_d).unsqueeze(1)  # B x 1 x W_t
        ctx = p.ctx.unsqueeze(0) + b
        if self.config.noise and self.released:  # at test time too; one draw per image, the batch's mean
            ctx = ctx + torch.randn_like(b) * f_d.mean()
        elif self.config.noise and self.training:  # the paper: a training-time perturbation, per image
            ctx = ctx + torch.randn_like(ctx) * f_d.mean(dim=-1).view(-1, 1, 1)
        text_ctx = p.q_text(torch.cat([torch.zeros_like(ctx), ctx], dim=-1))
        vis = [p.shallow_vision(p.ctx).unsqueeze(0).expand(images.shape[0], -1, -1)]
        for layer, q in enumerate(p.q_vision, start=1):
            deep = p.deep_text[layer - 1].unsqueeze(0) + b
            vis.append(q(torch.cat([torch.zeros_like(deep), deep], dim=-1)))
        return {"text_ctx": text_ctx, "vision": vis}

    def _block_fn(self, tower: str, scales: Tensor) -> towers.BlockFn:
        lora: CoupledLoRA = self.adapter["lora"]
        col = 0 if tower == "vision" else 1
        layers = lora.vision if tower == "vision" else lora.text

        def block(i: int, blk: ResidualAttentionBlock, x: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
            if i >= lora.depth:
                return blk(x, attn_mask=attn_mask)
            lr, s = layers[i], scales[i, :, col]
            a = towers.attention_with_deltas(blk.attn, blk.ln_1(x), attn_mask, lambda h: lr.qkv_delta(h, s),
                                             lr.out_delta)
            x = x + blk.ls_1(a)
            return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return block

    def _image_features(self, images: Tensor, cond: Dict[str, Any]) -> Tensor:
        vis = cond["vision"]
        n = vis[0].shape[1]

        def pre_block(i: int, x: Tensor) -> Tensor:
            if 1 <= i < len(vis):
                return torch.cat([x[:, :-n], vis[i].to(x.dtype)], dim=1)
            return x
        return towers.encode_image(self.clip.visual, images, self._block_fn("vision", self.adapter["lora"].scales()),
                                   extra_tokens=vis[0], pre_block=pre_block)

    def _class_features(self, classnames: List[str], cond: Dict[str, Any]) -> Tensor:
        tokens = prompt_tokens(self.tokenizer, self.prefix, classnames, self.device)
        ctx = cond["text_ctx"]  # B x n x W_t
        b, c, n = ctx.shape[0], tokens.shape[0], ctx.shape[1]
        embeds = insert_context(self.clip, tokens, ctx)  # (B*C) x L x W_t
        deep = self.adapter["prompts"].deep_text

        def pre_block(i: int, x: Tensor) -> Tensor:
            if 1 <= i <= deep.shape[0]:
                p = deep[i - 1].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
                return torch.cat([x[:, :1], p, x[:, 1 + n:]], dim=1)
            return x
        feats = towers.encode_text(self.clip, tokens.repeat(b, 1),
                                   self._block_fn("text", self.adapter["lora"].scales()),
                                   embeds=embeds, pre_block=pre_block)
        return feats.view(b, c, -1)

    # -- the serving interface ----------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        x = self._image_features(images, self.conditioning(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Plain tokens through the low-rank-adapted text encoder (no prompts)."""
        x = towers.encode_text(self.clip, tokens, self._block_fn("text", self.adapter["lora"].scales()))
        return F.normalize(x, dim=-1) if normalize else x

    def class_embeddings(self, classnames: List[str], images: Optional[Tensor] = None) -> Optional[Tensor]:
        """(B, C, D) per-image class features; ``None`` without images (they depend on the image)."""
        if images is None:
            return None
        return self._class_features(classnames, self.conditioning(images))

    def class_logits(self, images: Tensor, classnames: List[str]) -> Tensor:
        cond = self.conditioning(images)
        img = F.normalize(self._image_features(images, cond), dim=-1)
        txt = F.normalize(self._class_features(classnames, cond), dim=-1)
        return self.logit_scale.exp() * torch.einsum("bd,bcd->bc", img, txt)

    def header_extra(self) -> Dict[str, Any]:
        return {"domain_dim": self.domain.dim}


register(MethodSpec(
    name="gdpl", config_cls=GDPLConfig, model_cls=GDPLAdaptedModel, prompt_learner=True,
    description="GDPL: domain prompt learning with quaternion networks, hierarchical vision prompts and "
                "coupled low-rank adaptation",
    defaults={"optimizer": "sgd", "lr": 0.0035, "weight_decay": 5e-4, "epochs": 15, "batch_size": 4,
              "loss": "ce", "shots": 16, "schedule": "dassl", "augmentation": "dassl"},
))
