"""CoOp settings (Zhou et al. 2022: learnable context vectors in place of the template words)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..base import ConfigMixin


@dataclass
class CoOpConfig(ConfigMixin):
    # the context is initialised from the word embeddings of ctx_init (n_ctx is then its token count);
    # with ctx_init None, n_ctx vectors are drawn from N(0, 0.02) as in CoOp's generic context
    ctx_init: Optional[str] = "a satellite image of a"
    n_ctx: int = 4
    init_std: float = 0.02
