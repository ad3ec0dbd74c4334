"""An exact, faster ``encode_text`` for open_clip's ``CLIP`` (padding after the end-of-text token dropped)."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def trimmed_text_encoder(model: torch.nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """An exact, faster ``encode_text`` for open_clip's ``CLIP`` with a causal mask and EOT pooling.

    With a causal attention mask, the end-of-text token's output depends only on the tokens before it, so
    the padding after the longest prompt of a batch can be dropped: a 6-word query runs over ~10 positions
    instead of 77. Other models (custom text towers, other pooling, adapters) return ``None``.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool
    if type(model) is not CLIP or getattr(model, "text_pool_type", None) != "argmax" or model.attn_mask is None:
        return None

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        n = int(tokens.argmax(dim=-1).max()) + 1  # the EOT token has the highest id
        tokens = tokens[:, :n]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = text_global_pool(x, tokens, "argmax")
        return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
            else x @ model.text_projection

    return encode
