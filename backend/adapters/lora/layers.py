"""peft's LoRA layers, and a guard against peft's MultiheadAttention out_proj double update.

peft 0.21's ``lora.MultiheadAttention.merge`` writes ``W + dW`` into ``out_proj`` and then calls
``out_proj.merge()``, which adds ``dW`` again (huggingface/peft PR #3774): every forward then uses
``W_out + 2 dW_out``. :func:`mha_out_proj_factor` measures the factor on a small probe layer once, and the
model divides the out_proj scaling by it, so the adapted attention is exactly ``W + (alpha/r) B A`` on this
and on fixed peft versions alike (a test checks it against an explicit computation).
"""
from __future__ import annotations

import functools

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import MultiheadAttention as PeftMHA

__all__ = ["LoraLayer", "PeftMHA", "mha_out_proj_factor", "PeftLoraConfig", "inject_adapter_in_model"]


@functools.lru_cache(maxsize=1)
def mha_out_proj_factor() -> int:
    """How many times peft's MultiheadAttention LoRA applies the out_proj delta in a forward (1 or 2)."""
    gen = torch.Generator().manual_seed(0)
    holder = torch.nn.Module()
    holder.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ref.load_state_dict(holder.attn.state_dict())
    inject_adapter_in_model(PeftLoraConfig(r=2, lora_alpha=2, target_modules=["attn"]), holder)
    layer = holder.attn
    out = layer.base_layer.out_proj
    with torch.no_grad():
        for lin in (layer.lora_B["default"], out.lora_B["default"]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
        x = torch.randn(1, 3, 8, generator=gen)
        got = layer(x, x, x, need_weights=False)[0]
        ref.in_proj_weight += layer.get_delta_weight("default")
        delta_out = out.get_delta_weight("default")
        errors = {}
        for k in (1, 2):
            trial = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            trial.load_state_dict(ref.state_dict())
            trial.out_proj.weight += k * delta_out
            errors[k] = float((trial(x, x, x, need_weights=False)[0] - got).abs().max())
    return min(errors, key=errors.get)
