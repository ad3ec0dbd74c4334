"""The frozen domain model of GDPL: any open_clip vision tower, a timm model, or a remote-sensing MAE ViT,
with its checkpoint.

``f_d`` = mean of its output tokens (after the projection for open_clip ViTs; the pooled features for other
open_clip towers; timm: mean of ``forward_features`` tokens or spatial positions). Inputs arrive normalised
for the base model; they are un-normalised, resized and normalised for the domain model when those differ.

``mae`` / ``mae:TIMM_VIT`` (default ``vit_base_patch16_224``): an MAE checkpoint in its own layout
(``{'model': {...}}`` with the encoder's timm keys plus ``decoder_*`` and ``mask_token``), as the released GDPL
loads ``vit-b-checkpoint-1599.pth``. The released code calls a modified ``models_mae`` (not in its repository)
that gives 196 x 512 tokens per image; we read that as the full (unmasked) encoder, its final norm and the
MAE's ``decoder_embed`` projection (768 -> 512), averaged over the patch tokens. As in the released code the
MAE gets the image as the base model gets it (CLIP-normalised), resized to the MAE's input size if needed.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from ..towers import AdapterError
from .config import GDPLConfig


class DomainEncoder(nn.Module):
    def __init__(self, net: nn.Module, kind: str, dim: int, size: Tuple[int, int], mean: Sequence[float],
                 std: Sequence[float], base_size: Tuple[int, int], base_mean: Sequence[float],
                 base_std: Sequence[float]):
        super().__init__()
        self.net, self.kind, self.dim = net, kind, dim
        self.size, self.base_size = tuple(size), tuple(base_size)
        for name, v in (("mean", mean), ("std", std), ("base_mean", base_mean), ("base_std", base_std)):
            self.register_buffer(name, torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.same_input = (self.size == self.base_size and torch.equal(self.mean, self.base_mean)
                           and torch.equal(self.std, self.base_std))
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "DomainEncoder":
        return super().train(False)  # always frozen, always in eval mode

    def _input(self, images: Tensor) -> Tensor:
        if self.same_input:
            return images
        x = images.float() * self.base_std + self.base_mean
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = self._input(images)
        if self.kind == "open_clip_vit":
            v = self.net
            t = v.ln_post(v.transformer(v._embeds(x)))
            f = t.mean(dim=1)
            return (f @ v.proj if v.proj is not None else f).float()
        if self.kind == "open_clip":
            return self.net(x).float()
        if self.kind == "mae":
            return self.net(x).float()
        feats = self.net.forward_features(x)  # timm
        return (feats.mean(dim=(2, 3)) if feats.ndim == 4 else feats.mean(dim=1)).float()


def build_domain_encoder(config: GDPLConfig, loaded) -> DomainEncoder:
    base = dict(base_size=loaded.image_size, base_mean=loaded.mean, base_std=loaded.std)
    name = config.domain_model
    if name == "self":
        visual = loaded.model.visual
        kind = "open_clip_vit" if isinstance(visual, VisionTransformer) else "open_clip"
        return DomainEncoder(visual, kind, int(loaded.embed_dim), loaded.image_size, loaded.mean, loaded.std, **base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.domain_seed)
        if name.startswith("timm:"):
            return _timm_encoder(name[len("timm:"):], config, loaded, base)
        if name == "mae" or name.startswith("mae:"):
            return _mae_encoder(name[len("mae:"):] or MAE_ARCH, config, loaded, base)
        from backend.models.loading import load_model
        dom = load_model(name, model_config=config.domain_model_config, checkpoint=config.domain_checkpoint,
                         device=str(loaded.device), random_weights=config.domain_random_weights)
    visual = dom.model.visual
    kind = "open_clip_vit" if isinstance(visual, VisionTransformer) else "open_clip"
    return DomainEncoder(visual, kind, int(dom.embed_dim), dom.image_size, dom.mean, dom.std, **base)


def _timm_encoder(arch: str, config: GDPLConfig, loaded, base) -> DomainEncoder:
    import timm
    if not config.domain_checkpoint and not config.domain_random_weights:
        raise AdapterError(f"timm domain model {arch!r} needs domain_checkpoint (or domain_random_weights)")
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as exc:
        raise AdapterError(f"cannot build timm model {arch!r}: {exc}") from None
    if config.domain_checkpoint:
        from backend.models.loading import read_state_dict
        sd = read_state_dict(config.domain_checkpoint)
        missing, _ = net.load_state_dict(sd, strict=False)
        if missing:
            raise AdapterError(f"checkpoint {config.domain_checkpoint} misses {len(missing)} tensors of timm "
                               f"{arch} (e.g. {missing[:3]})")
    cfg = timm.data.resolve_data_config({}, model=net)
    size = tuple(cfg["input_size"][-2:])
    net = net.to(loaded.device).eval()
    return DomainEncoder(net, "timm", int(net.num_features), size, cfg["mean"], cfg["std"], **base)


MAE_ARCH = "vit_base_patch16_224"


class MAEFeatures(nn.Module):
    """An MAE encoder (timm ViT keys), its final norm and ``decoder_embed``: B x (patches) x D_dec tokens."""

    def __init__(self, encoder: nn.Module, decoder_embed: nn.Linear):
        super().__init__()
        self.encoder, self.decoder_embed = encoder, decoder_embed

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.decoder_embed(self.encoder.forward_features(x))  # the norm is in forward_features
        return tokens[:, self.encoder.num_prefix_tokens:].mean(dim=1)


def _mae_encoder(arch: str, config: GDPLConfig, loaded, base) -> DomainEncoder:
    import timm
    if not config.domain_checkpoint:
        raise AdapterError("an MAE domain model needs its checkpoint (domain_checkpoint: the {'model': ...} file)")
    from backend.models.loading import read_state_dict
    sd = read_state_dict(config.domain_checkpoint)
    if "decoder_embed.weight" not in sd:
        raise AdapterError(f"{config.domain_checkpoint} is not an MAE checkpoint (no decoder_embed)")
    try:
        encoder = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as exc:
        raise AdapterError(f"cannot build timm model {arch!r}: {exc}") from None
    enc_sd = {k: v for k, v in sd.items() if not k.startswith("decoder") and k != "mask_token"}
    missing, unexpected = encoder.load_state_dict(enc_sd, strict=False)
    if missing or unexpected:
        raise AdapterError(f"{config.domain_checkpoint} does not fit an MAE {arch}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    w = sd["decoder_embed.weight"]
    decoder_embed = nn.Linear(w.shape[1], w.shape[0])
    decoder_embed.load_state_dict({"weight": w, "bias": sd["decoder_embed.bias"]})
    net = MAEFeatures(encoder, decoder_embed).to(loaded.device).eval()
    size = tuple(encoder.patch_embed.img_size)
    return DomainEncoder(net, "mae", int(w.shape[0]), size, base["base_mean"], base["base_std"], **base)
