"""Common interface of adapted models, the method registry, and the adapter file format.

An adapter file is ``torch.save`` of ``{"header": {...}, "tensors": {name: Tensor}}``: only the adapter's
own tensors plus a JSON-able header (format and version, method, config, the base model's name,
architecture and widths, free-form ``extra``). It is read back with ``torch.load(weights_only=True)`` and
is refused on a base model of another architecture.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .towers import AdapterError

log = logging.getLogger("backend.adapters")
PathLike = Union[str, os.PathLike]
FORMAT = "mapquery-adapter"
FORMAT_VERSION = 1


class AdaptedModel(nn.Module):
    """A frozen open_clip model plus a small trainable adaptation, served like a CLIP model.

    ``encode_image`` / ``encode_text`` take what ``CLIP.encode_image`` / ``encode_text`` take. Prompt
    learners also answer ``class_embeddings`` with their learned class text features: (C, D), or (B, C, D)
    when the features depend on the image (GDPL); other methods return ``None`` (callers then use
    hand-written templates through ``encode_text``).
    """

    method: str = ""
    image_conditioned: bool = False  # class features depend on the image (GDPL): classify per batch

    def __init__(self, loaded, config: Any):
        super().__init__()
        self.clip = loaded.model  # frozen base (shared with the caller, never modified in place)
        self.config = config
        self.base_name: str = loaded.name
        self.base_arch: str = loaded.arch
        self.embed_dim: int = int(loaded.embed_dim)
        self.tokenizer = loaded.tokenizer
        self.image_size = tuple(loaded.image_size)
        self.mean, self.std = tuple(loaded.mean), tuple(loaded.std)

    # -- the serving interface ------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        raise NotImplementedError

    def class_embeddings(self, classnames: List[str], images: Optional[Tensor] = None) -> Optional[Tensor]:
        return None

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    # -- adapter tensors --------------------------------------------------------------------------------
    def adapter_named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """The trainable tensors, with stable names (default: everything under ``self.adapter``)."""
        return self.adapter.named_parameters()

    def mark_trainable(self) -> "AdaptedModel":
        """Freeze everything but the adapter's tensors."""
        for p in self.parameters():
            p.requires_grad_(False)
        for _, p in self.adapter_named_parameters():
            p.requires_grad_(True)
        return self

    def adapter_state_dict(self) -> Dict[str, Tensor]:
        return {n: p.detach().clone().cpu() for n, p in self.adapter_named_parameters()}

    def load_adapter_state(self, tensors: Dict[str, Tensor]) -> None:
        """Copy saved tensors in; names and shapes must match exactly."""
        own = dict(self.adapter_named_parameters())
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise AdapterError(f"adapter tensors do not fit this {self.method} model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, p in own.items():
                t = tensors[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise AdapterError(f"adapter tensor {name} has shape {list(t.shape)}, the model wants "
                                       f"{list(p.shape)}")
                p.copy_(t.to(p.dtype))

    def prepare_inference(self) -> "AdaptedModel":
        """Called by :func:`load_adapter` before serving: eval mode (LoRA also merges its weights)."""
        return self.eval()

    def header_extra(self) -> Dict[str, Any]:
        """Method-specific facts recorded in the file header."""
        return {}


@dataclass
class MethodSpec:
    """One PEFT method: its config class, its model class and its training defaults."""

    name: str
    config_cls: type
    model_cls: Callable[..., AdaptedModel]
    description: str
    prompt_learner: bool  # needs class-labelled data (cross-entropy over class prompts)
    defaults: Dict[str, Any] = field(default_factory=dict)  # optimizer, lr, epochs, batch_size, shots, loss ...
    aliases: Tuple[str, ...] = ()

    def build(self, loaded, config: Any = None, **overrides: Any) -> AdaptedModel:
        cfg = config if config is not None else self.config_cls(**overrides)
        model = self.model_cls(loaded, cfg)
        return model.to(loaded.device).mark_trainable()


METHODS: Dict[str, MethodSpec] = {}
_METHOD_MODULES = ("lora", "mrs_adapter", "gdpl", "coop", "instant")


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def ensure_registered() -> None:
    """Import every method's module (LoRA's imports peft and transformers: seconds, paid once per process)."""
    for mod in _METHOD_MODULES:
        importlib.import_module(f"backend.adapters.{mod}")


def get_method(name: str) -> MethodSpec:
    ensure_registered()
    key = name.lower().replace("_", "-")
    for spec in METHODS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise AdapterError(f"unknown adaptation method {name!r}; known: {', '.join(sorted(METHODS))}", method=name)


def build_adapter(method: str, loaded, **config: Any) -> AdaptedModel:
    """A fresh adapted model of ``method`` on ``loaded`` (its base stays untouched), adapter trainable."""
    spec = get_method(method)
    return spec.build(loaded, spec.config_cls(**config))


def count_parameters(module: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_signature(model: nn.Module) -> Dict[str, int]:
    """Widths and depths that an adapter's tensors depend on."""
    sig: Dict[str, int] = {}
    tr = getattr(model, "transformer", None)
    if tr is not None and hasattr(tr, "width"):
        sig.update(text_width=int(tr.width), text_layers=len(tr.resblocks))
    vt = getattr(getattr(model, "visual", None), "transformer", None)
    if vt is not None and hasattr(vt, "width"):
        sig.update(vision_width=int(vt.width), vision_layers=len(vt.resblocks))
    return sig


def make_header(adapted: AdaptedModel, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    trainable = sum(p.numel() for _, p in adapted.adapter_named_parameters())
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": adapted.method,
        "config": adapted.config.to_dict(),
        "base": {"name": adapted.base_name, "arch": adapted.base_arch, "embed_dim": adapted.embed_dim,
                 **base_signature(adapted.clip)},
        "trainable_parameters": int(trainable),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__),
        "extra": {**adapted.header_extra(), **(extra or {})},
    }
    return json.loads(json.dumps(header))  # plain JSON types only (raises TypeError otherwise)


def save_adapter(path: PathLike, adapted: AdaptedModel, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write the adapter's tensors and header (atomically: the file is complete or absent)."""
    from ..files import atomic_file
    payload = {"header": make_header(adapted, extra), "tensors": adapted.adapter_state_dict()}
    with atomic_file(path) as f:
        torch.save(payload, f)
    return Path(path)


def _read(path: PathLike, mmap: bool = False) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist", path=str(path), reason="not_found")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise AdapterError(f"cannot read adapter file {path}: {exc}", path=str(path)) from None
    header = obj.get("header") if isinstance(obj, dict) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise AdapterError(f"{path} is not an adapter file (no '{FORMAT}' header)", path=str(path))
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise AdapterError(f"{path} has adapter format {header.get('format_version')}; this backend reads up "
                           f"to {FORMAT_VERSION}", path=str(path))
    tensors = obj.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise AdapterError(f"{path} holds no adapter tensors", path=str(path))
    return obj


def describe_adapter(path: PathLike) -> Dict[str, Any]:
    """The header of an adapter file (tensors are memory-mapped, not read), JSON-able."""
    header = _read(path, mmap=True)["header"]
    base = header.get("base", {})
    return {"path": str(path), "method": header["method"], "base_name": base.get("name"),
            "base_arch": base.get("arch"), "embed_dim": base.get("embed_dim"),
            "trainable_parameters": header.get("trainable_parameters"),
            "format_version": header.get("format_version"), "created": header.get("created"),
            "config": header.get("config", {}), "extra": header.get("extra", {})}


def check_base(header: Dict[str, Any], loaded, path: PathLike = "") -> None:
    """Refuse an adapter made for another architecture; warn when only the weights' name differs."""
    base = header.get("base", {})
    if base.get("arch") != loaded.arch:
        raise AdapterError(f"adapter {path} was made for base architecture {base.get('arch')!r} (model "
                           f"{base.get('name')!r}); the loaded model is {loaded.arch!r}: refusing to load it",
                           reason="adapter_mismatch", adapter_arch=base.get("arch"), model_arch=loaded.arch)
    sig = base_signature(loaded.model)
    wanted = {k: base[k] for k in sig if k in base}
    if wanted != {k: sig[k] for k in wanted} or int(base.get("embed_dim", loaded.embed_dim)) != loaded.embed_dim:
        raise AdapterError(f"adapter {path} expects widths {wanted} (embed {base.get('embed_dim')}); the loaded "
                           f"model has {sig} (embed {loaded.embed_dim})", reason="adapter_mismatch")
    if base.get("name") != loaded.name:
        log.warning("adapter %s was trained on %s, now applied to %s (same architecture %s)", path,
                    base.get("name"), loaded.name, loaded.arch)


# settings that count examples, not widths: bounded on their own (a 200,000-example cache of 1024-d embeddings
# is 800 MB; a header claiming more is refused before anything is allocated)
COUNT_LIMITS = {"n_cache": 200_000}


def check_config_sizes(config: Any, loaded, path: PathLike = "") -> None:
    """Refuse, before anything is allocated, a header whose sizes the base model cannot have made: every integer
    setting (a rank, a bottleneck, a context or prompt length, a depth) at most the base model's widest width,
    every layer index inside its depth. A header claiming LoRA ``r = 20,000,000`` would otherwise allocate
    until the OOM killer came."""
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {path}: its config is not an object", reason="bad_adapter")
    sig = base_signature(loaded.model)
    widest = max([v for k, v in sig.items() if k.endswith("_width")] + [int(loaded.embed_dim or 0), 1])
    deepest = max([v for k, v in sig.items() if k.endswith("_layers")] + [1])
    for key, value in config.items():
        if "seed" in key:
            continue  # a random seed is no size
        items = value if isinstance(value, list) else [value]
        for item in items:
            if type(item) is not int:
                continue
            limit = COUNT_LIMITS.get(key) or (deepest - 1 if isinstance(value, list) else widest)
            if item < 0 or item > limit:
                what = "a count" if key in COUNT_LIMITS else "a layer index" if isinstance(value, list) else "a size"
                raise AdapterError(f"adapter {path}: {key} = {item} is not {what} the base model can have (at "
                                   f"most {limit}: widths up to {widest}, {deepest} layers); refusing to load it",
                                   reason="bad_adapter", setting=key)


def load_adapter(path: PathLike, base_loaded_model, for_inference: bool = True) -> AdaptedModel:
    """Rebuild the adapted model from a file on ``base_loaded_model`` (a ``LoadedModel``; left unchanged).

    ``for_inference`` puts it in eval mode and lets LoRA merge its weights (faster, no per-call merge);
    pass ``False`` to keep training it.
    """
    obj = _read(path)
    header = obj["header"]
    check_base(header, base_loaded_model, path)
    spec = get_method(header["method"])
    check_config_sizes(header.get("config", {}), base_loaded_model, path)
    config = spec.config_cls.from_dict(header.get("config", {}))
    adapted = spec.build(base_loaded_model, config)
    adapted.load_adapter_state(obj["tensors"])
    adapted.file_header = header
    return adapted.prepare_inference() if for_inference else adapted


class ConfigMixin:
    """to_dict / from_dict for the method configs (dataclasses of plain values)."""

    def to_dict(self) -> Dict[str, Any]:
        from dataclasses import asdict
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        from dataclasses import fields
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"{cls.__name__}: unknown settings {unknown}")
        return cls(**data)
