"""An int8 copy of a model for CPU inference: its Linear layers dynamically quantised (``--precision int8``).

Dynamic quantisation stores each ``nn.Linear``'s weight as int8 (one scale per output channel) and quantises
the layer's input per batch at run time, so the copy takes fp32 inputs and gives fp32 outputs. In a ViT the
Linear layers (the MLPs and the attention's input and output projections) are nearly all of the arithmetic.

``nn.MultiheadAttention`` keeps its input projection as a bare parameter, which quantisation cannot reach: the
self-attention of open_clip's ``ResidualAttentionBlock`` is first replaced by :class:`SelfAttention`, the
same computation with its projections as ``nn.Linear`` layers (exact in fp32, tested). Anything else (cross
attention, key/value biases, other towers' own attention modules) keeps its own code; their ``nn.Linear``
layers are quantised all the same.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s self-attention (``query is key is value``) with ``nn.Linear`` projections.

    Called as open_clip calls the module it replaces: ``attn(x, x, x, need_weights=False, attn_mask=mask)``,
    returning ``(output, None)``; a float mask is added to the scores, a bool mask's True means "masked".
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d = mha.embed_dim
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        self.in_proj.weight = nn.Parameter(mha.in_proj_weight.detach(), requires_grad=False)
        self.out_proj.weight = nn.Parameter(mha.out_proj.weight.detach(), requires_grad=False)
        if mha.in_proj_bias is not None:
            self.in_proj.bias = nn.Parameter(mha.in_proj_bias.detach(), requires_grad=False)
        if mha.out_proj.bias is not None:
            self.out_proj.bias = nn.Parameter(mha.out_proj.bias.detach(), requires_grad=False)

    @staticmethod
    def replaces(mha: Any) -> bool:
        """Whether ``mha`` is an ``nn.MultiheadAttention`` this class computes exactly."""
        return (type(mha) is nn.MultiheadAttention and mha._qkv_same_embed_dim and mha.bias_k is None
                and not mha.add_zero_attn and mha.embed_dim % mha.num_heads == 0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None):
        if key is not query or value is not query or need_weights:
            raise RuntimeError("the int8 model's attention computes self-attention only, without weights")
        x = query if self.batch_first else query.transpose(0, 1)
        n, length, d = x.shape
        qkv = self.in_proj(x).view(n, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # MultiheadAttention's True masks out; SDPA's True keeps
                attn_mask = torch.zeros_like(attn_mask, dtype=x.dtype).masked_fill_(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:  # (N * heads, L, L)
                attn_mask = attn_mask.view(n, self.num_heads, length, length)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def with_linear_attention(model: nn.Module) -> nn.Module:
    """``model`` with the self-attention of each open_clip ``ResidualAttentionBlock`` (``attn`` beside
    ``ln_1`` and no ``ln_1_kv``) replaced, in place, by :class:`SelfAttention`."""
    for block in list(model.modules()):
        if hasattr(block, "ln_1") and not hasattr(block, "ln_1_kv") and SelfAttention.replaces(
                getattr(block, "attn", None)):
            block.attn = SelfAttention(block.attn)
    return model


def quantize_linear_layers(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` with its dynamically quantised int8 version.

    torch 2.14 still ships ``torch.ao.quantization.quantize_dynamic`` but marks it deprecated in favour of
    torchao (not a dependency here): only those deprecation warnings are silenced, here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError as exc:  # a future torch without it
            raise ValueError(f"int8 needs torch.ao.quantization.quantize_dynamic, which torch "
                             f"{torch.__version__} does not have: use fp32") from exc
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    for block in model.modules():  # open_clip reads the blocks' compute dtype from mlp.c_fc.weight,
        c_fc = getattr(getattr(block, "mlp", None), "c_fc", None)  # a method once quantised: it reads this first
        if c_fc is not None and not isinstance(c_fc, nn.Linear):
            c_fc.int8_original_dtype = torch.float32
    return model


def int8_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose Linear layers run in int8 (see the module's docstring).

    The copy shares every tensor that is not quantised (embeddings, norms, convolutions) with ``model``, so it
    costs only the int8 weights (about a quarter of the Linear layers' fp32 bytes); ``model`` is unchanged.
    """
    memo: Dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    out = copy.deepcopy(model, memo)
    return quantize_linear_layers(with_linear_attention(out)).eval()
