"""CoOp settings (Zhou et al. 2022: learnable context vectors in place of the template words)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..base import ConfigMixin


# named configurations: 'satellite' (ours: the context starts as the words "a satellite image of a") and
# 'paper' (CoOp's paper: 16 context vectors drawn from N(0, 0.02), the class token at the end)
VARIANTS = {
    "satellite": {"ctx_init": "a satellite image of a", "n_ctx": 4, "init_std": 0.02},
    "paper": {"ctx_init": None, "n_ctx": 16, "init_std": 0.02},
}


@dataclass
class CoOpConfig(ConfigMixin):
    # the context is initialised from the word embeddings of ctx_init (n_ctx is then its token count);
    # with ctx_init None, n_ctx vectors are drawn from N(0, init_std) as in CoOp's generic context.
    # variant 'paper' sets all three to the paper's configuration (they cannot be combined with it)
    ctx_init: Optional[str] = "a satellite image of a"
    n_ctx: int = 4
    init_std: float = 0.02
    variant: str = "satellite"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            from ..towers import AdapterError
            raise AdapterError(f"CoOp variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.variant == "paper":
            for key, value in VARIANTS["paper"].items():
                setattr(self, key, value)
