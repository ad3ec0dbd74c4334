"""GDPL settings (Cao et al.; REFERENCE section 6). Widths come from the model: text width W_t, vision
width W_v (512 / 768 in the paper's ViT-B/16), both divisible by 4 for the quaternion layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..base import ConfigMixin


@dataclass
class GDPLConfig(ConfigMixin):
    ctx_init: str = "a photo of a"  # prompt "[SOS][ctx_1..n] of a {class}."; the first n_ctx words seed ctx
    n_ctx: int = 2
    prompt_depth: int = 9  # layers with prompts (layer 0: shallow prompts; 1..depth-1: deep prompts)
    deep_prompt_std: float = 0.02
    domain_hidden: int = 32  # domain bias: Linear(D_d -> 32) ReLU Linear(32 -> W_t)
    noise: bool = True  # n = N(0, 1) * mean(f_d), added to the context while training only
    lora_depth: int = 9  # attention layers 0..lora_depth-1 of both encoders
    lora_rank: int = 4
    lora_alpha: float = 1.0  # QKV update scaled by (alpha / r) / 4
    out_lora_scale: float = 0.25
    # frozen domain model: 'self' (the base model's own vision tower), an open_clip preset or architecture
    # (optionally with domain_model_config / domain_checkpoint), 'timm:NAME' with domain_checkpoint, or
    # 'mae' / 'mae:TIMM_VIT' with an MAE checkpoint in its {'model': ...} layout (domain.py)
    domain_model: str = "self"
    domain_model_config: Optional[str] = None
    domain_checkpoint: Optional[str] = None
    domain_random_weights: bool = False  # tests only: random weights drawn with domain_seed (reproducible)
    domain_seed: int = 0
    # 'paper' (default) or 'released': the released code's behaviours where it differs from the paper (the
    # S/R coupling re-wrapped every forward so it never trains, noise at test time too, drawn once per image
    # and scaled by the batch mean of f_d, one init copied to all deep quaternion layers); README, GDPL
    variant: str = "paper"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            from ..towers import AdapterError
            raise AdapterError(f"GDPL variant must be one of {VARIANTS}, got {self.variant!r}")


VARIANTS = ("paper", "released")
