"""CoOp on an open_clip CLIP: a learned context shared by all classes; the encoders stay frozen."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from .. import towers
from ..base import AdaptedModel, MethodSpec, register
from ..towers import AdapterError
from .config import CoOpConfig
from .layers import context_from_words, count_tokens, insert_context, prompt_tokens


class CoOpAdaptedModel(AdaptedModel):
    method = "coop"

    def __init__(self, loaded, config: CoOpConfig):
        super().__init__(loaded, config)
        if not isinstance(self.clip, CLIP) or not all(isinstance(b, ResidualAttentionBlock)
                                                      for b in self.clip.transformer.resblocks):
            raise AdapterError("CoOp needs an open_clip CLIP with a standard text transformer")
        width = self.clip.transformer.width
        if config.ctx_init:
            config.n_ctx = count_tokens(self.tokenizer, config.ctx_init)
            init = context_from_words(self.clip, self.tokenizer, config.ctx_init)
            self.prefix = config.ctx_init
        else:
            init = torch.randn(config.n_ctx, width) * config.init_std
            self.prefix = " ".join(["X"] * config.n_ctx)
        self.adapter = nn.Module()
        self.adapter.ctx = nn.Parameter(init)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def class_embeddings(self, classnames: List[str], images: Optional[Tensor] = None) -> Tensor:
        """(C, D) text features of the learned prompts (not normalised)."""
        tokens = prompt_tokens(self.tokenizer, self.prefix, classnames, self.device)
        embeds = insert_context(self.clip, tokens, self.adapter.ctx)
        return towers.encode_text(self.clip, tokens, embeds=embeds)

    def class_logits(self, images: Tensor, classnames: List[str]) -> Tensor:
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.class_embeddings(classnames), dim=-1)
        return self.logit_scale.exp() * img @ txt.T


register(MethodSpec(
    name="coop", config_cls=CoOpConfig, model_cls=CoOpAdaptedModel, prompt_learner=True,
    description="CoOp: learned prompt context vectors (prompt-learning baseline)",
    defaults={"optimizer": "sgd", "lr": 0.002, "weight_decay": 5e-4, "epochs": 200, "batch_size": 32,
              "loss": "ce", "shots": 16, "schedule": "dassl", "augmentation": "dassl"},
))
