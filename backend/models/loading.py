"""Build an open_clip model from a preset, an architecture name or a config file, and load its weights.

Weights are looked for, in order: ``--checkpoint FILE``; a file named like the preset's checkpoint in
``$MAPQUERY_WEIGHTS`` (default ``~/.cache/mapquery-rs/weights``); the Hugging Face hub cache and then the
hub itself (unless offline); an open_clip pretrained tag. Checkpoints load with ``weights_only=True``; a
plain ``state_dict``, one under ``"state_dict"`` and ``module.``-prefixed keys are accepted. Random weights
are used only when asked for, and the loaded model then says so.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import open_clip
import torch

from ..errors import ModelLoadError
from .presets import CONFIG_DIR, DEFAULT_PRESET, Preset, get_preset, weights_dir

log = logging.getLogger("backend.models")
PathLike = Union[str, os.PathLike]
_registered_dirs: set = set()




@dataclass
class LoadedModel:
    """A ready-to-use model with what the pipelines need to feed it."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str  # preset name, or the architecture
    arch: str
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str
    resize_mode: str
    device: torch.device
    weights: str  # where the weights came from, in words
    random_weights: bool = False
    quick_gelu: bool = False
    embed_dim: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.name, "arch": self.arch, "weights": self.weights, "random_weights": self.random_weights,
            "quick_gelu": self.quick_gelu, "image_size": list(self.image_size), "embed_dim": self.embed_dim,
            "device": str(self.device),
        }


class _NoPretrainedNotice(logging.Filter):
    """open_clip warns 'No pretrained weights loaded' whenever it builds a bare model; we load weights
    ourselves right after (or say plainly that they are random), so that notice only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


logging.getLogger().addFilter(_NoPretrainedNotice())


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was asked for but torch sees no CUDA device; use --device cpu", device=device)
    return dev


def gpu_unused_reason(requested: Optional[str], device: torch.device) -> str:
    """Why the model does not run on a GPU, in words ('' when it does)."""
    if device.type != "cpu":
        return ""
    if requested not in (None, "", "auto"):
        return f"--device {requested} was asked for"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return "torch has no CUDA build (a CPU-only wheel)"
    if shutil.which("nvidia-smi") is None and not os.path.exists("/proc/driver/nvidia"):
        return "no NVIDIA driver"
    return f"torch (built for CUDA {torch.version.cuda}) sees no usable GPU; the driver may be older than that"


def register_config(path: PathLike) -> str:
    """Make an open_clip model-config JSON known to open_clip; returns its architecture name."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model config {path} does not exist", path=str(path))
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model config {path} is not valid JSON: {exc}", path=str(path)) from None
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ModelLoadError(f"model config {path} needs embed_dim, vision_cfg and text_cfg", path=str(path))
    open_clip.add_model_config(path)
    return path.stem


def _ensure_builtin_configs() -> None:
    if CONFIG_DIR not in _registered_dirs:
        open_clip.add_model_config(CONFIG_DIR)
        _registered_dirs.add(CONFIG_DIR)


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load a checkpoint safely (``weights_only``) and normalise its layout to a plain open_clip state dict."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist", path=str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, ...
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}", path=str(path)) from None
    for key in ("state_dict", "model"):  # open_clip training checkpoints; MAE-style {'model': ...}
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"checkpoint {path} holds no state_dict of tensors", path=str(path))
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_dict_into(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly: a wrong architecture must fail loudly, never half-load."""
    state_dict = dict(state_dict)
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != model.logit_scale.ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    if getattr(model, "logit_bias", None) is None:
        state_dict.pop("logit_bias", None)
    try:
        open_clip.factory.resize_pos_embed(state_dict, model)
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        msg = str(exc).splitlines()[0][:500]
        raise ModelLoadError(f"weights from {source} do not fit this architecture: {msg}", source=source) from None


def _find_weights(preset: Optional[Preset], offline: bool) -> Tuple[Optional[Path], List[str]]:
    """Return a local checkpoint path for a preset (downloading through the hub when allowed)."""
    looked: List[str] = []
    if preset is None or not preset.hf_filename:
        return None, looked
    local = weights_dir() / preset.weight_filename
    looked.append(str(local))
    if local.is_file():
        return local, looked
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency
        return None, looked
    for local_only in ((True,) if offline else (True, False)):
        where = f"hf-hub:{preset.hf_repo}/{preset.hf_filename}" + (" (cache)" if local_only else "")
        looked.append(where)
        try:
            return Path(hf_hub_download(preset.hf_repo, preset.hf_filename, local_files_only=local_only)), looked
        except Exception as exc:
            log.info("weights not at %s: %s", where, exc.__class__.__name__)
    return None, looked


def load_model(model: str = DEFAULT_PRESET, *, model_config: Optional[PathLike] = None,
               checkpoint: Optional[PathLike] = None, pretrained: Optional[str] = None, device: str = "auto",
               random_weights: bool = False, offline: Optional[bool] = None) -> LoadedModel:
    """Create the model, load its weights and put it in eval mode on ``device``.

    ``model`` is a preset name (``python -m backend presets``), an open_clip architecture, or ignored when
    ``model_config`` (an open_clip JSON config) is given. ``pretrained`` is an open_clip tag or hub id.
    """
    _ensure_builtin_configs()
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
    preset = None if model_config else get_preset(model)
    arch = register_config(model_config) if model_config else (preset.arch if preset else model)
    if arch not in open_clip.list_models():
        raise ModelLoadError(f"unknown model {model!r}: not a preset (python -m backend presets) nor an open_clip "
                             "architecture; pass --model-config FILE for a custom one", model=model)
    dev = resolve_device(device)
    try:
        clip = open_clip.create_model(arch, pretrained=None, device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot build {arch}: {exc}", arch=arch) from None

    source: Optional[str] = None
    if checkpoint is not None:
        load_state_dict_into(clip, read_state_dict(checkpoint), str(checkpoint))
        source = f"checkpoint {checkpoint}"
    elif not random_weights:
        found, looked = _find_weights(preset, offline)
        tag = pretrained or (preset.pretrained_tag if preset else None)
        if found is not None:
            load_state_dict_into(clip, read_state_dict(found), str(found))
            source = str(found)
        elif tag:
            looked.append(f"open_clip pretrained '{tag}'")
            try:
                clip = open_clip.create_model(arch, pretrained=tag, device="cpu", require_pretrained=True)
                source = f"open_clip pretrained '{tag}'"
            except Exception as exc:
                log.info("open_clip pretrained %s failed: %s", tag, exc)
        if source is None:
            raise ModelLoadError(_missing_weights_message(model, preset, looked), model=model, looked=looked,
                                 reason="weights_missing")
    weights = source or "random initialisation (--random-weights): answers are meaningless"
    clip = clip.to(dev).eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    pp = clip.visual.preprocess_cfg if hasattr(clip.visual, "preprocess_cfg") else {}
    size = pp.get("size", clip.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return LoadedModel(
        model=clip, tokenizer=open_clip.get_tokenizer(arch), name=preset.name if preset else arch, arch=arch,
        image_size=size, mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)), interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"), device=dev, weights=weights,
        random_weights=source is None, quick_gelu=_uses_quick_gelu(clip),
        embed_dim=int(clip.text_projection.shape[1]) if getattr(clip, "text_projection", None) is not None
        else int(getattr(clip, "embed_dim", 0) or 0), extra={"gpu_unused": gpu_unused_reason(device, dev)},
    )


def _uses_quick_gelu(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "QuickGELU" for m in model.modules())


def _missing_weights_message(model: str, preset: Optional[Preset], looked: List[str]) -> str:
    lines = [f"no weights found for {model!r}; looked at: " + "; ".join(looked or ["nothing to look at"]) + "."]
    if preset and preset.hf_filename:
        lines.append(f"Download {preset.hf_filename} from https://huggingface.co/{preset.hf_repo} into "
                     f"{weights_dir()} (or set MAPQUERY_WEIGHTS), or pass --checkpoint FILE.")
    elif preset and preset.random_only:
        lines.append(f"{model!r} has no published weights: pass --random-weights.")
    else:
        lines.append("Pass --checkpoint FILE or --pretrained TAG, or --random-weights for a test run.")
    return " ".join(lines)
