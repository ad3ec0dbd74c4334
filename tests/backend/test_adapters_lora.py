"""LoRA through peft: the adapted attention equals an explicit W + (alpha/r) B A computation."""
from __future__ import annotations

import copy

import torch

from backend.adapters import build_adapter, load_adapter, save_adapter
from backend.adapters.lora.layers import PeftMHA


def _randomise(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in a.adapter_named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _explicit(tiny, a):
    """A plain copy of the base with the LoRA updates written into its weights by hand."""
    ref = copy.deepcopy(tiny.model)
    scale = a.config.alpha / a.config.r
    for tower, ours in ((ref.transformer, a.clip.transformer), (ref.visual.transformer, a.clip.visual.transformer)):
        for blk, lblk in zip(tower.resblocks, ours.resblocks):
            la = lblk.attn
            assert isinstance(la, PeftMHA)
            with torch.no_grad():
                A, B = la.lora_A["default"].weight, la.lora_B["default"].weight
                blk.attn.in_proj_weight += scale * B @ A
                out = la.base_layer.out_proj
                A, B = out.lora_A["default"].weight, out.lora_B["default"].weight
                blk.attn.out_proj.weight += scale * B @ A
                if "mlp" in a.config.targets:
                    for name in ("c_fc", "c_proj"):
                        lin = getattr(lblk.mlp, name)
                        getattr(blk.mlp, name).weight += (scale * lin.lora_B["default"].weight
                                                          @ lin.lora_A["default"].weight)
    return ref


def test_lora_equals_explicit_low_rank_update(tiny):
    a = build_adapter("lora", tiny, r=4, alpha=8, targets=["attn", "mlp"]).eval()
    _randomise(a)
    ref = _explicit(tiny, a)
    x = torch.randn(2, 3, 32, 32)
    t = tiny.tokenizer(["a red area", "blue"])
    with torch.no_grad():
        assert torch.allclose(a.encode_image(x), ref.encode_image(x), atol=1e-5)
        assert torch.allclose(a.encode_text(t), ref.encode_text(t), atol=1e-5)
        assert not torch.allclose(a.encode_image(x), tiny.model.encode_image(x), atol=1e-3)


def test_merged_equals_unmerged_and_base_is_kept(tiny, tmp_path):
    a = build_adapter("lora", tiny, r=4, alpha=4, targets=["attn", "mlp"]).eval()
    _randomise(a, 1)
    x = torch.randn(2, 3, 32, 32)
    t = tiny.tokenizer(["a red area", "blue"])
    base_before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with torch.no_grad():
        unmerged_i, unmerged_t = a.encode_image(x), a.encode_text(t)
    b = load_adapter(save_adapter(tmp_path / "l.pt", a), tiny)  # merged for inference
    assert all(m.merged for m in b.clip.modules() if isinstance(m, PeftMHA))
    with torch.inference_mode():
        assert torch.allclose(b.encode_image(x), unmerged_i, atol=1e-5)
        assert torch.allclose(b.encode_text(t), unmerged_t, atol=1e-5)
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in base_before.items())


def test_lora_targets_and_towers(tiny):
    text_only = build_adapter("lora", tiny, towers=["text"], layers=[1])
    names = [n for n, _ in text_only.adapter_named_parameters()]
    assert names and all(n.startswith("transformer.resblocks.1.") for n in names)
    x = torch.randn(1, 3, 32, 32)
    _randomise(text_only)
    with torch.no_grad():
        assert torch.equal(text_only.eval().encode_image(x), tiny.model.encode_image(x))
