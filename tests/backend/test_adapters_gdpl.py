"""GDPL: quaternion layer against an explicit Hamilton product, coupling, domain model, shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.adapters import AdapterError, build_adapter
from backend.adapters.gdpl.layers import CoupledLoRA, QuaternionLinear


def hamilton(a, b):
    """Hamilton product of quaternions a = (a1, b1, c1, d1) and b, component-wise on arrays."""
    a1, b1, c1, d1 = a
    a2, b2, c2, d2 = b
    return (a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2,
            a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2,
            a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2,
            a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2)


def test_quaternion_linear_is_a_hamilton_product():
    torch.manual_seed(0)
    q = QuaternionLinear(16, 8)
    with torch.no_grad():
        q.bias.normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    y = q.double()(x).detach().numpy()
    r, i, j, k = (t.detach().double().numpy() for t in (q.r, q.i, q.j, q.k))  # (out/4, in/4)
    xs = x.numpy().reshape(5, 4, 4)  # batch, component, unit
    expected = np.zeros((5, 4, 2))
    for o in range(2):
        for n in range(4):
            w = (r[o, n], i[o, n], j[o, n], k[o, n])
            v = (xs[:, 0, n], xs[:, 1, n], xs[:, 2, n], xs[:, 3, n])
            for c, val in enumerate(hamilton(w, v)):
                expected[:, c, o] += val
    expected = expected.reshape(5, 8) + q.bias.detach().double().numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


def test_quaternion_layer_holds_a_quarter_of_the_dense_parameters():
    for n_in, n_out in ((1024, 512), (1024, 768), (128, 64)):
        q = QuaternionLinear(n_in, n_out, bias=False)
        dense = torch.nn.Linear(n_in, n_out, bias=False)
        assert sum(p.numel() for p in q.parameters()) * 4 == sum(p.numel() for p in dense.parameters())
    with pytest.raises(AdapterError, match="divisible by 4"):
        QuaternionLinear(10, 8)


def test_quaternion_glorot_scale():
    torch.manual_seed(0)
    q = QuaternionLinear(1024, 512, bias=False)
    w = q.weight().detach()
    # E|q|^2 = 4 s^2 with s = 1 / sqrt(2 (256 + 128)): per real weight 1 / (2 * 384)
    assert abs(float(w.pow(2).mean()) - 1.0 / 768) / (1.0 / 768) < 0.05
    assert q.weight().shape == (512, 1024)


def test_coupled_scaling_starts_uncoupled_and_couples():
    lora = CoupledLoRA(64, 64, depth=2, rank=4)
    assert torch.equal(lora.scales(), torch.ones(2, 4, 2))
    with torch.no_grad():
        lora.R.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))  # text scale += vision scale
        lora.S[..., 0] = 2.0
    s = lora.scales()
    assert torch.allclose(s[..., 0], torch.full((2, 4), 2.0)) and torch.allclose(s[..., 1], torch.full((2, 4), 3.0))
    assert all(torch.equal(m.B_out, torch.zeros_like(m.B_out)) for m in [*lora.text, *lora.vision])
    assert lora.text[0].qkv_scale == pytest.approx(1 / 4 / 4)


def test_gdpl_shapes_and_depths(tiny):
    a = build_adapter("gdpl", tiny, domain_model="tiny-quickgelu", domain_random_weights=True).eval()
    assert a.config.prompt_depth == 2 and a.config.lora_depth == 2  # capped at the tiny model's 2 layers
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = a.class_embeddings(["red", "dense_residential", "blue"], x)
        assert feats.shape == (3, 3, 32)
        assert a.class_embeddings(["red"]) is None  # image-dependent: no images, no learned features
        assert not torch.allclose(feats[0], feats[1])  # the domain bias makes them depend on the image
        assert a.encode_image(x).shape == (3, 32)
    p = a.adapter["prompts"]
    assert p.q_text.in_features == 128 and p.q_text.out_features == 64
    assert len(p.q_vision) == 1 and p.deep_text.shape == (1, 2, 64)
    assert a.domain.dim == 32 and a.domain.kind == "open_clip_vit"
    assert not any(q.requires_grad for q in a.domain.parameters())


def test_gdpl_domain_model_is_reproducible_and_frozen(tiny):
    kw = dict(domain_model="tiny-quickgelu", domain_random_weights=True, domain_seed=5)
    a, b = build_adapter("gdpl", tiny, **kw), build_adapter("gdpl", tiny, **kw)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.domain(x), b.domain(x))
    assert a.domain.net is not tiny.model.visual
    own = build_adapter("gdpl", tiny)
    assert own.domain.net is tiny.model.visual


def test_gdpl_noise_only_while_training(tiny):
    a = build_adapter("gdpl", tiny)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a.eval()
        assert torch.equal(a.class_logits(x, ["red", "blue"]), a.class_logits(x, ["red", "blue"]))
        a.train()
        assert not torch.equal(a.class_logits(x, ["red", "blue"]), a.class_logits(x, ["red", "blue"]))


def test_timm_domain_model_with_its_checkpoint(tiny, tmp_path):
    """A timm vision tower named with its checkpoint supplies the domain features (and reloads with the adapter)."""
    import timm
    import torch.nn.functional as F

    from backend.adapters import load_adapter, save_adapter
    torch.manual_seed(4)
    net = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    torch.save(net.state_dict(), tmp_path / "domain.pt")
    a = build_adapter("gdpl", tiny, domain_model="timm:test_vit", domain_checkpoint=str(tmp_path / "domain.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = a.domain(x)
        # independent: undo the base model's normalisation, resize to the timm model's input, its own normalisation
        cfg = timm.data.resolve_data_config({}, model=net)
        raw = x * torch.tensor(tiny.std).view(1, 3, 1, 1) + torch.tensor(tiny.mean).view(1, 3, 1, 1)
        raw = F.interpolate(raw, size=cfg["input_size"][-2:], mode="bilinear", antialias=True, align_corners=False)
        tokens = net.forward_features((raw - torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
                                      / torch.tensor(cfg["std"]).view(1, 3, 1, 1))
        torch.testing.assert_close(got, tokens.mean(dim=1))
    assert a.domain.dim == net.num_features
    with torch.no_grad():
        for _, p in a.adapter_named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_adapter(tmp_path / "gdpl.pt", a.eval())
    b = load_adapter(path, tiny)
    with torch.no_grad():
        torch.testing.assert_close(a.class_embeddings(["red", "blue"], x), b.class_embeddings(["red", "blue"], x))
    other = timm.create_model("test_vit2", pretrained=False, num_classes=0)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(AdapterError):
        build_adapter("gdpl", tiny, domain_model="timm:test_vit", domain_checkpoint=str(tmp_path / "other.pt"))
    with pytest.raises(AdapterError, match="domain_checkpoint"):
        build_adapter("gdpl", tiny, domain_model="timm:test_vit")


# -- fidelity to the released code (caoql98/GDPL trainer/maple.py) and its paper variant ---------------------
def test_deep_vision_prompts_are_padded_with_zeros_first(tiny):
    a = build_adapter("gdpl", tiny).eval()
    x = torch.randn(2, 3, 32, 32)
    p = a.adapter["prompts"]
    with torch.no_grad():
        cond = a.conditioning(x)
        b = p.domain_bias(a.domain(x)).unsqueeze(1)
        for layer, q in enumerate(p.q_vision, start=1):
            deep = p.deep_text[layer - 1].unsqueeze(0) + b
            expected = q(torch.cat([torch.zeros_like(deep), deep], dim=-1))  # cat(zeros, p_l + b)
            torch.testing.assert_close(cond["vision"][layer], expected)
            assert not torch.allclose(cond["vision"][layer], q(torch.cat([deep, torch.zeros_like(deep)], dim=-1)))


def test_released_variant_behaviours(tiny):
    paper = build_adapter("gdpl", tiny)
    released = build_adapter("gdpl", tiny, variant="released")
    x = torch.randn(2, 3, 32, 32)
    # one initialisation copied to every deep quaternion layer (the tiny model has one: build 3 here)
    from backend.adapters.gdpl.model import GDPLPrompts
    for shared in (True, False):
        qs = GDPLPrompts(torch.zeros(2, 64), 32, 64, 64, depth=4, hidden=8, deep_std=0.02,
                         shared_deep_init=shared).q_vision
        same = [torch.equal(q.r, qs[0].r) and torch.equal(q.k, qs[0].k) for q in qs[1:]]
        assert len(qs) == 3 and (all(same) if shared else not any(same))
    # noise at test time too, one draw per image (the same for every context token)
    released.eval()
    with torch.no_grad():
        c1, c2 = released.conditioning(x)["text_ctx"], released.conditioning(x)["text_ctx"]
        assert not torch.equal(c1, c2)
        paper.eval()
        assert torch.equal(paper.conditioning(x)["text_ctx"], paper.conditioning(x)["text_ctx"])
    # the S/R coupling gets no gradient in the released code (re-wrapped as a new leaf every forward)
    for model, trains in ((paper, True), (released, False)):
        model.train().mark_trainable()
        model.zero_grad()
        model.class_logits(x, ["red", "blue"]).sum().backward()
        lora = model.adapter["lora"]
        assert (lora.S.grad is not None and lora.R.grad is not None) == trains
        assert model.adapter["prompts"].ctx.grad is not None
    with pytest.raises(AdapterError, match="variant"):
        build_adapter("gdpl", tiny, variant="other")


def test_mae_domain_checkpoint_in_its_own_layout(tiny, tmp_path):
    """An MAE checkpoint ({'model': encoder + decoder_* + mask_token}) supplies f_d = mean over the patch
    tokens of decoder_embed(norm(encoder(x)))."""
    import timm
    torch.manual_seed(7)
    enc = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    dec = torch.nn.Linear(enc.embed_dim, 48)
    sd = dict(enc.state_dict())
    sd.update({"decoder_embed.weight": dec.weight.detach().clone(), "decoder_embed.bias": dec.bias.detach().clone(),
               "mask_token": torch.zeros(1, 1, 48), "decoder_pos_embed": torch.zeros(1, 101, 48),
               "decoder_pred.weight": torch.zeros(768, 48), "decoder_pred.bias": torch.zeros(768)})
    torch.save({"model": sd, "epoch": 1599}, tmp_path / "mae.pth")
    a = build_adapter("gdpl", tiny, domain_model="mae:test_vit", domain_checkpoint=str(tmp_path / "mae.pth"))
    assert a.domain.dim == 48
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        big = torch.nn.functional.interpolate(x, size=(160, 160), mode="bilinear", antialias=True, align_corners=False)
        tokens = dec(enc.forward_features(big))[:, 1:]  # drop the class token
        torch.testing.assert_close(a.domain(x), tokens.mean(dim=1))
    torch.save({"model": enc.state_dict()}, tmp_path / "not_mae.pth")
    with pytest.raises(AdapterError, match="not an MAE"):
        build_adapter("gdpl", tiny, domain_model="mae:test_vit", domain_checkpoint=str(tmp_path / "not_mae.pth"))
