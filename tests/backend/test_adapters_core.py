"""Adapters: encoder walk-through, parameter counts, identity at init, gradients, save/load, base untouched."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from backend.adapters import (AdapterError, build_adapter, count_parameters, describe_adapter, get_method,
                              load_adapter, save_adapter)
from backend.adapters import towers
from backend.models import load_model

GDPL_KW = {"domain_model": "tiny-quickgelu", "domain_random_weights": True}
METHOD_KW = {"lora": {}, "mrs-adapter": {}, "coop": {}, "gdpl": GDPL_KW}


def _inputs(tiny, n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), tiny.tokenizer(["a red area", "green", "the blue image"])


def test_towers_reproduce_open_clip(tiny):
    x, t = _inputs(tiny)
    with torch.no_grad():
        assert torch.allclose(towers.encode_image(tiny.model.visual, x), tiny.model.encode_image(x), atol=1e-6)
        assert torch.allclose(towers.encode_text(tiny.model, t), tiny.model.encode_text(t), atol=1e-6)
        blk = tiny.model.transformer.resblocks[0]
        h = torch.randn(2, 77, 64)
        mask = tiny.model.attn_mask
        ours = towers.attention_with_deltas(blk.attn, h, mask)
        ref = blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        assert torch.allclose(ours, ref, atol=1e-5)


def test_mrs_adapter_has_161088_parameters_on_vit_b_32():
    loaded = load_model("ViT-B-32", random_weights=True, device="cpu")
    a = build_adapter("mrs-adapter", loaded)
    trainable, total = count_parameters(a)
    assert trainable == 161_088
    parts = {n: p.numel() for n, p in a.adapter_named_parameters()}
    assert parts["down.vision.weight"] + parts["down.vision.bias"] == 49_216
    assert parts["down.text.weight"] + parts["down.text.bias"] == 32_832
    assert parts["up.text.weight"] + parts["up.text.bias"] == 29_120
    assert parts["up.vision.weight"] + parts["up.vision.bias"] == 45_760
    assert parts["up_shared.weight"] + parts["up_shared.bias"] == 4_160
    assert total == sum(p.numel() for p in loaded.model.parameters()) + 161_088
    assert a.config.shared_dim == 64


@pytest.mark.parametrize("method", ["lora", "mrs-adapter"])
def test_identity_at_initialisation(tiny, method):
    a = build_adapter(method, tiny).eval()
    x, t = _inputs(tiny)
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), tiny.model.encode_image(x))
        assert torch.equal(a.encode_text(t), tiny.model.encode_text(t))


def test_mrs_adapter_changes_outputs_once_trained(tiny):
    a = build_adapter("mrs-adapter", tiny).eval()
    with torch.no_grad():
        a.adapter.up["vision"].weight.normal_()
    x, _ = _inputs(tiny)
    with torch.no_grad():
        assert not torch.allclose(a.encode_image(x), tiny.model.encode_image(x))


def _loss(a, tiny, x, t):
    classes = ["red", "green", "blue"]
    if get_method(a.method).prompt_learner:
        logits = a.class_logits(x, classes)
        return torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    img, txt = a.encode_image(x, normalize=True), a.encode_text(t, normalize=True)
    logits = 10 * img @ txt.T
    return torch.nn.functional.cross_entropy(logits, torch.arange(3))


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_every_trainable_tensor_gets_a_gradient_after_one_step(tiny, method):
    torch.manual_seed(0)
    a = build_adapter(method, tiny, **METHOD_KW[method]).train()
    x, t = _inputs(tiny)
    params = dict(a.adapter_named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    trainable_ids = {id(p) for p in params.values()}
    assert all(not p.requires_grad for p in a.parameters() if id(p) not in trainable_ids)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    for _ in range(2):  # the first step moves the zero-initialised up/B matrices, then all get gradients
        opt.zero_grad()
        _loss(a, tiny, x, t).backward()
        opt.step()
    dead = [n for n, p in params.items() if p.grad is None or not bool((p.grad != 0).any())]
    assert not dead, f"{method}: tensors without gradient: {dead}"
    base_grads = [n for n, p in tiny.model.named_parameters() if p.grad is not None]
    assert not base_grads


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_save_then_load_gives_identical_outputs(tiny, tmp_path, method):
    torch.manual_seed(3)
    a = build_adapter(method, tiny, **METHOD_KW[method])
    with torch.no_grad():  # move away from the initialisation so the test means something
        for _, p in a.adapter_named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    a.eval()
    path = save_adapter(tmp_path / f"{method}.pt", a, extra={"note": "test"})
    b = load_adapter(path, tiny)
    x, t = _inputs(tiny)
    with torch.no_grad():
        assert torch.allclose(a.encode_image(x), b.encode_image(x), atol=1e-5)
        assert torch.allclose(a.encode_text(t), b.encode_text(t), atol=1e-5)
        ca, cb = a.class_embeddings(["red", "blue"], x), b.class_embeddings(["red", "blue"], x)
        assert (ca is None) == (cb is None)
        if ca is not None:
            assert torch.allclose(ca, cb, atol=1e-5)
    info = describe_adapter(path)
    assert info["method"] == a.method and info["base_arch"] == "tiny-vit" and info["base_name"] == "tiny"
    assert info["embed_dim"] == 32 and info["extra"]["note"] == "test"
    assert info["trainable_parameters"] == sum(p.numel() for _, p in a.adapter_named_parameters())
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"header", "tensors"}
    assert sum(v.numel() for v in raw["tensors"].values()) == info["trainable_parameters"]
    assert path.stat().st_size < 2_000_000  # the adapter alone, not the base model


def test_base_model_is_untouched(tiny_fresh, tmp_path):
    before = copy.deepcopy(tiny_fresh.model.state_dict())
    x, t = _inputs(tiny_fresh)
    with torch.no_grad():
        ref_i, ref_t = tiny_fresh.model.encode_image(x), tiny_fresh.model.encode_text(t)
    for method, kw in METHOD_KW.items():
        a = build_adapter(method, tiny_fresh, **kw)
        with torch.no_grad():
            for _, p in a.adapter_named_parameters():
                p.add_(0.1 * torch.randn_like(p))
        _loss(a.train(), tiny_fresh, x, t).backward()
        b = load_adapter(save_adapter(tmp_path / f"{method}.pt", a.eval()), tiny_fresh)
        with torch.inference_mode():  # as the engine serves
            b.encode_image(x), b.encode_text(t)
    after = tiny_fresh.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(tiny_fresh.model.encode_image(x), ref_i)
        assert torch.equal(tiny_fresh.model.encode_text(t), ref_t)
    assert all(not p.requires_grad for p in tiny_fresh.model.parameters())


def test_refuses_another_architecture(tiny, tmp_path):
    path = save_adapter(tmp_path / "m.pt", build_adapter("mrs-adapter", tiny))
    other = load_model("ViT-B-32", random_weights=True, device="cpu")
    with pytest.raises(AdapterError, match="tiny-vit"):
        load_adapter(path, other)
    quick = load_model("tiny-quickgelu", random_weights=True, device="cpu")
    with pytest.raises(AdapterError, match="architecture"):
        load_adapter(path, quick)


def test_bad_files_are_refused(tmp_path, tiny):
    bad = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(AdapterError, match="not an adapter"):
        describe_adapter(bad)
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing.pt", tiny)
    evil = tmp_path / "evil.pt"
    torch.save({"header": {"format": "mapquery-adapter"}, "tensors": {}, "obj": open_clip.model.CLIPVisionCfg()}, evil)
    with pytest.raises(AdapterError, match="cannot read"):
        describe_adapter(evil)


def test_method_registry_and_errors(tiny):
    assert get_method("MRS_Adapter").name == "mrs-adapter" and get_method("pe-rsitr").name == "mrs-adapter"
    with pytest.raises(AdapterError, match="unknown adaptation method"):
        get_method("vpt")
    with pytest.raises(AdapterError, match="out_proj"):
        build_adapter("lora", tiny, targets=["out_proj"])
    rn = load_model("RN50", random_weights=True, device="cpu")
    with pytest.raises(AdapterError, match="ViT CLIP"):
        build_adapter("mrs-adapter", rn)
