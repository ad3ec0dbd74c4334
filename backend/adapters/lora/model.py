"""LoRA on an open_clip model through peft, on a structural copy of the base (the base stays untouched)."""
from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Dict, Iterator, List, Tuple

import peft
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from .. import towers
from ..base import AdaptedModel, MethodSpec, register
from ..towers import AdapterError
from .config import TARGETS, LoraConfig
from .layers import LoraLayer, PeftLoraConfig, PeftMHA, inject_adapter_in_model, mha_out_proj_factor

ADAPTER = "default"


def shallow_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def target_names(model: nn.Module, config: LoraConfig) -> List[str]:
    prefixes = {"text": r"transformer\.resblocks\.(\d+)\.", "vision": r"visual\.transformer\.resblocks\.(\d+)\."}
    suffixes = [s for t in config.targets for s in TARGETS[t]]
    names = []
    for name, _ in model.named_modules():
        for tower in config.towers:
            m = re.fullmatch(prefixes[tower] + "(.+)", name)
            if m and m.group(2) in suffixes and (config.layers is None or int(m.group(1)) in config.layers):
                names.append(name)
    if not names:
        raise AdapterError(f"no LoRA targets {config.targets} found in the {config.towers} tower(s) of "
                           f"{type(model).__name__}")
    return names


class LoraAdaptedModel(AdaptedModel):
    """peft LoRA layers injected into a copy of the base model that shares the frozen tensors."""

    method = "lora"

    def __init__(self, loaded, config: LoraConfig):
        super().__init__(loaded, config)
        clip = shallow_copy(loaded.model)
        names = target_names(clip, config)
        pcfg = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                              target_modules="^(?:" + "|".join(re.escape(n) for n in names) + ")$")
        self.clip = inject_adapter_in_model(pcfg, clip)
        self.targets = names
        factor = mha_out_proj_factor()
        for mod in self.clip.modules():
            if isinstance(mod, PeftMHA) and factor != 1:
                out = mod.base_layer.out_proj
                out.scaling[ADAPTER] = out.scaling[ADAPTER] / factor
        self._walkable = isinstance(self.clip, CLIP) and isinstance(self.clip.visual, VisionTransformer)

    def adapter_named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.clip.named_parameters() if "lora_" in n)

    def encode_image(self, images: Tensor, normalize: bool = False, embed_dropout: float = 0.0) -> Tensor:
        if embed_dropout and self._walkable:
            x = towers.encode_image(self.clip.visual, images, embed_dropout=embed_dropout)
        else:
            x = self.clip.encode_image(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = False, embed_dropout: float = 0.0) -> Tensor:
        if embed_dropout and isinstance(self.clip, CLIP):
            x = towers.encode_text(self.clip, tokens, embed_dropout=embed_dropout)
        else:
            x = self.clip.encode_text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def lora_layers(self) -> List[LoraLayer]:
        return [m for m in self.clip.modules() if isinstance(m, LoraLayer) and not isinstance(
            getattr(m, "base_layer", None), LoraLayer)]

    def merge(self) -> None:
        """Fold the LoRA updates into (copies of) the weights: same outputs, no per-call merging."""
        for m in self.clip.modules():
            if isinstance(m, PeftMHA) or (isinstance(m, LoraLayer) and not _inside_mha(self.clip, m)):
                if not m.merged:
                    if isinstance(m, PeftMHA):
                        m.merge()
                    else:
                        _merge_copy(m)

    def prepare_inference(self) -> "LoraAdaptedModel":
        self.eval()
        self.merge()
        return self

    def header_extra(self) -> Dict[str, Any]:
        return {"peft": peft.__version__, "targets": len(self.targets)}


def _inside_mha(root: nn.Module, layer: nn.Module) -> bool:
    return any(isinstance(m, PeftMHA) and m.base_layer.out_proj is layer for m in root.modules())


def _merge_copy(layer: LoraLayer) -> None:
    """Merge a LoRA Linear into a fresh weight tensor, so the shared base tensor is not written to."""
    base = layer.get_base_layer()
    base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    if base.bias is not None:
        base.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    layer.merge()


register(MethodSpec(
    name="lora", config_cls=LoraConfig, model_cls=LoraAdaptedModel, prompt_learner=False,
    description="LoRA (peft) on the attention (and optionally MLP) layers of both encoders",
    defaults={"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.01, "epochs": 10, "batch_size": 64,
              "loss": "infonce", "shots": 16},
))
