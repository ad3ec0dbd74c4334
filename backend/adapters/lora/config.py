"""LoRA settings (REFERENCE section 6: through ``peft``, on modules that really receive gradients)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..base import ConfigMixin

# target name -> module-name suffixes inside an open_clip residual block
TARGETS = {"attn": ("attn",), "mlp": ("mlp.c_fc", "mlp.c_proj"), "c_fc": ("mlp.c_fc",),
           "c_proj": ("mlp.c_proj",)}


@dataclass
class LoraConfig(ConfigMixin):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # 'attn' = the whole nn.MultiheadAttention (peft adapts in_proj and out_proj); 'mlp' = c_fc and c_proj.
    # 'out_proj' alone is refused: nn.MultiheadAttention never calls its forward, so LoRA there is bypassed.
    targets: List[str] = field(default_factory=lambda: ["attn"])
    towers: List[str] = field(default_factory=lambda: ["text", "vision"])
    layers: Optional[List[int]] = None  # block indices; None = all

    def __post_init__(self) -> None:
        from ..towers import AdapterError
        for t in self.targets:
            if t not in TARGETS:
                hint = (" (nn.MultiheadAttention reads out_proj.weight directly, so a LoRA wrapped around "
                        "attn.out_proj gets no gradient and changes nothing; target 'attn' instead)"
                        if "out_proj" in t else "")
                raise AdapterError(f"LoRA target {t!r} is not supported; use {sorted(TARGETS)}{hint}")
        bad = set(self.towers) - {"text", "vision"}
        if bad or not self.towers:
            raise AdapterError(f"LoRA towers must be 'text' and/or 'vision', got {self.towers}")
        if self.r < 1:
            raise AdapterError("LoRA rank r must be >= 1")
