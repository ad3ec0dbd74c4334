"""MRS-Adapter settings (PE-RSITR; REFERENCE section 6)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..base import ConfigMixin


@dataclass
class MRSAdapterConfig(ConfigMixin):
    bottleneck: int = 64  # down-projection width (64 in PE-RSITR)
    # width of the shared up-projection (64 in PE-RSITR). None = 64, or half the narrower encoder width
    # when an encoder is not wider than 2 x 64 (tiny test models); the resolved value is saved.
    shared_dim: Optional[int] = None
    dropout: float = 0.5
    layers: Optional[List[int]] = None  # blocks that get the adapter; None = all, in both encoders

    def resolve(self, text_width: int, vision_width: int) -> "MRSAdapterConfig":
        if self.shared_dim is None:
            narrow = min(text_width, vision_width)
            self.shared_dim = 64 if narrow > 128 else narrow // 2
        return self
