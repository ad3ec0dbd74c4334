"""Which model made an index's embeddings: architecture, embedding size, adapter and a weights fingerprint.

The fingerprint hashes every floating-point weight of the model (and adapter) rounded to bf16, so that the
same weights served in fp32 or as a bf16 copy (``--precision``) give the same fingerprint, and other weights
(another checkpoint, a new random initialisation) another one. The base model's is taken from the weights
the engine's copy was made from (``engine.loaded.model``), so that an int8 copy, whose quantised layers
no longer hold those weights, has the fp32 model's fingerprint too.
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Any, Dict, Optional

import torch

from ..engine import Engine

_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            continue
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def model_identity(engine: Engine, adapter: Optional[str] = None) -> Dict[str, Any]:
    """The identity an index records and checks (computed once per engine and adapter)."""
    model = engine.model_for(adapter) if adapter is not None else engine.loaded.model
    if model not in _FINGERPRINTS:
        _FINGERPRINTS[model] = weights_fingerprint(model)
    loaded = engine.loaded
    return {"name": loaded.name, "arch": loaded.arch, "embed_dim": int(loaded.embed_dim), "weights": loaded.weights,
            "random_weights": bool(loaded.random_weights), "adapter": adapter, "fingerprint": _FINGERPRINTS[model]}
