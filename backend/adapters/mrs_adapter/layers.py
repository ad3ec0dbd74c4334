"""The multimodal remote sensing adapter: modality-specific down/up projections plus a shared up part."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..towers import AdapterError


class MRSAdapter(nn.Module):
    """``adapter(x, m) = concat(up_m(h), up_shared(h))`` with ``h = dropout(relu(down_m(x)))``.

    Init (PE-RSITR): down weights Kaiming-uniform (a = sqrt 5); every up weight and every bias zero, so
    the adapter outputs zeros and the adapted model equals its base at the start.
    """

    MODALITIES = ("text", "vision")

    def __init__(self, text_width: int, vision_width: int, bottleneck: int = 64, shared_dim: int = 64,
                 dropout: float = 0.5):
        super().__init__()
        widths = {"text": text_width, "vision": vision_width}
        if any(w <= shared_dim for w in widths.values()):
            raise AdapterError(f"MRS-Adapter shared width {shared_dim} must be smaller than both encoder "
                               f"widths {widths}")
        self.down = nn.ModuleDict({m: nn.Linear(w, bottleneck) for m, w in widths.items()})
        self.up = nn.ModuleDict({m: nn.Linear(bottleneck, w - shared_dim) for m, w in widths.items()})
        self.up_shared = nn.Linear(bottleneck, shared_dim)
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in self.down.values():
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            nn.init.zeros_(lin.bias)
        for lin in [*self.up.values(), self.up_shared]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, modality: str) -> Tensor:
        h = self.drop(F.relu(self.down[modality](x)))
        return torch.cat([self.up[modality](h), self.up_shared(h)], dim=-1)
