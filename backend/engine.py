"""The inference engine: batched, cached encoding of images and texts with the base model or an adapter."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cache import LRUCache, content_key
from .errors import UnknownAdapter
from .models.loading import LoadedModel
from .models.preprocess import normalize as normalize_input
from .models.preprocess import (preprocess_batch, resize_exact, resize_shortest_and_crop, to_device, unit_rgb,
                                value_scale)
from .models.precision import inference_copy, resolve_precision
from .models.text_encoder import trimmed_text_encoder

log = logging.getLogger("backend.engine")
Progress = Callable[[float, str], None]
WINDOW_PIXEL_BUDGET = 16 * 768 * 768  # window pixels converted to float at once (~113 MB as float32 RGB)


def _no_progress(fraction: float, message: str = "") -> None:
    pass


@dataclass
class EngineConfig:
    batch_size: int = 0  # 0: 256 on CUDA, 64 on CPU
    precision: str = "auto"  # auto, fp32, fp16 (CUDA only), bf16, int8 (CPU only): see resolve_precision
    cache_bytes: int = 2 << 30  # embedding cache budget
    text_batch_size: int = 256


class Engine:
    """Encodes images and texts; ``adapter`` names select a loaded adapter instead of the base model."""

    def __init__(self, loaded: LoadedModel, config: Optional[EngineConfig] = None,
                 adapters: Optional[Dict[str, torch.nn.Module]] = None):
        config = config or EngineConfig()
        self.loaded = loaded
        self.config = config
        self.device = loaded.device
        self.adapters: Dict[str, torch.nn.Module] = dict(adapters or {})
        self.cache = LRUCache(config.cache_bytes)
        self.batch_size = config.batch_size or (256 if self.device.type == "cuda" else 64)
        self.precision = resolve_precision(config.precision, self.device)
        # the base model as run: on CPU with bf16, a bf16 copy; with int8, a copy with int8 Linear layers
        # (the loaded model and the adapters, which share its tensors, stay fp32: adapters run in fp32 on CPU)
        self.base_model = inference_copy(loaded.model, self.precision)
        if self.base_model is not loaded.model:
            log.info("base model: its %s copy for CPU inference", self.precision.name)
        self._fast_text = trimmed_text_encoder(self.base_model)

    @property
    def adapter_precision(self) -> str:
        """Adapters get the CUDA autocast but not the CPU weight cast (their code is written for fp32)."""
        return self.precision.name if self.precision.autocast is not None else "fp32"

    def autocast(self):
        """The engine's autocast context (bf16/fp16 on CUDA; nothing on CPU, where weights are cast instead)."""
        if self.precision.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast)

    def input_dtype(self, adapter: Optional[str] = None) -> torch.dtype:
        """The dtype a model's float inputs must have: its weights' (bf16 for a cast base model on CPU; fp32
        for the int8 copy, which quantises its Linear layers' inputs itself)."""
        return self.precision.weights if adapter is None else torch.float32  # see adapter_precision

    def model_for(self, adapter: Optional[str]) -> torch.nn.Module:
        if adapter is None:
            return self.base_model
        try:
            return self.adapters[adapter]
        except KeyError:
            raise UnknownAdapter(f"no adapter named {adapter!r} is loaded", adapters=sorted(self.adapters)) from None

    def feature_source(self, adapter: Optional[str]) -> Optional[str]:
        """The model whose embeddings ``adapter`` works on: ``None`` (the base, cached and cast as the base)
        for a head on the frozen base's embeddings (the instant methods), else the adapter itself."""
        return None if getattr(self.model_for(adapter), "base_features", False) else adapter

    def register_adapter(self, name: str, model: torch.nn.Module) -> None:
        """Serve ``model`` under ``name`` from the next request on (replacing one of that name: what was
        cached for the old one is dropped)."""
        self.adapters[name] = model
        self.cache.drop_where(lambda key: isinstance(key, tuple) and len(key) > 1 and key[1] == name)

    # -- images --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, x: torch.Tensor, adapter: Optional[str] = None, normalize: bool = True) -> torch.Tensor:
        """Normalised model input (N x 3 x S x S) -> float32 embeddings (N x D), L2-normalised by default."""
        with self.autocast():
            feats = self.model_for(adapter).encode_image(x.to(self.input_dtype(adapter))).float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_images(self, images: np.ndarray, adapter: Optional[str] = None,
                      value_range: Optional[Sequence[float]] = None, progress: Progress = _no_progress,
                      scale=None, normalize: bool = True) -> torch.Tensor:
        """N x H x W x C tiles -> N x D embeddings, in batches (progress and cancel between batches).

        Normalised embeddings are cached per tile content (and scaling and adapter): tiles seen before
        are not encoded again.
        """
        scale = scale or value_scale(images, value_range)
        adapter = self.feature_source(adapter)
        n = images.shape[0]
        cached = normalize and self.cache.max_bytes > 0  # no hashing when the cache is off
        keys = [("tile", adapter, scale, content_key(t)) for t in images] if cached else [None] * n
        found = {i: self.cache.get(k) for i, k in enumerate(keys) if k is not None}
        todo = [i for i in range(n) if found.get(i) is None]
        for start in range(0, len(todo), self.batch_size):
            progress(start / max(len(todo), 1), f"encoding images {start}/{len(todo)}")
            chunk = todo[start:start + self.batch_size]
            batch = preprocess_batch(images[chunk], self.loaded, scale=scale)
            for i, f in zip(chunk, self.encode_pixels(batch, adapter, normalize)):
                found[i] = f
                if keys[i] is not None:
                    self.cache.put(keys[i], f)
        progress(1.0, f"encoded {len(todo)} images ({n - len(todo)} cached)")
        if not n:
            return torch.zeros((0, self.loaded.embed_dim), device=self.device)
        return torch.stack([found[i] for i in range(n)])

    def encode_windows(self, canvas: np.ndarray, boxes: np.ndarray, crop_size: Optional[int], adapter: Optional[str],
                       scale, progress: Progress = _no_progress) -> torch.Tensor:
        """Embed square or rectangular windows (x0, y0, x1, y1) of one H x W x C canvas, batched on the device.

        Each window is first resized to ``crop_size`` x ``crop_size`` (when given, as SeLo does), then put
        through the model's own preprocessing.
        """
        quantize = canvas.dtype == np.uint8
        adapter = self.feature_source(adapter)
        pixels = to_device(canvas, self.device)  # once: windows are cut on the device
        n = len(boxes)
        out: List[torch.Tensor] = []
        order: List[int] = []
        pending: List[torch.Tensor] = []  # preprocessed windows (model size) waiting for a full batch
        pending_idx: List[int] = []

        def flush(count: int) -> None:
            x = torch.cat(pending)
            pending[:] = [x[count:]] if count < len(x) else []
            out.append(self.encode_pixels(normalize_input(x[:count], self.loaded.mean, self.loaded.std), adapter))
            order.extend(pending_idx[:count])
            del pending_idx[:count]
            progress(len(order) / max(n, 1), f"encoding windows {len(order)}/{n}")

        # windows of equal size are cut and resized together, a few at a time (bounded memory); once at
        # the model's input size, windows of all sizes fill the model's batches together
        sizes = sorted({(int(y1 - y0), int(x1 - x0)) for x0, y0, x1, y1 in boxes})
        progress(0.0, f"encoding windows 0/{n}")
        for size in sizes:
            idx = [i for i, (x0, y0, x1, y1) in enumerate(boxes) if (int(y1 - y0), int(x1 - x0)) == size]
            per_resize = max(1, min(self.batch_size, WINDOW_PIXEL_BUDGET // (size[0] * size[1])))
            for sub in range(0, len(idx), per_resize):
                chunk = idx[sub:sub + per_resize]
                crops = torch.stack([pixels[boxes[i][1]:boxes[i][3], boxes[i][0]:boxes[i][2]] for i in chunk])
                x = unit_rgb(crops, scale)
                if crop_size:
                    x = resize_exact(x, (crop_size, crop_size), quantize)
                pending.append(resize_shortest_and_crop(x, self.loaded.image_size, quantize))
                pending_idx.extend(chunk)
                while len(pending_idx) >= self.batch_size:
                    flush(self.batch_size)
        if pending_idx:
            flush(len(pending_idx))
        progress(1.0, f"encoded {n} windows")
        if not n:
            return torch.zeros((0, self.loaded.embed_dim), device=self.device)
        feats = torch.cat(out)
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(n)
        return feats[inverse.to(feats.device)]

    def warm_up(self) -> float:
        """Run the image, window and text paths once on dummy input, so that the first request does not pay
        for lazy initialisation (CUDA context and kernels, cuBLAS, oneDNN primitives). Caches nothing;
        returns the seconds it took."""
        start = time.perf_counter()
        size = int(self.loaded.image_size[0])
        canvas = np.zeros((2 * size, 2 * size, 3), np.uint8)
        boxes = np.array([[0, 0, size, size], [size // 2, size // 2, size // 2 + size, size // 2 + size]])
        self.encode_windows(canvas, boxes, size, None, (0.0, 255.0))
        self.encode_texts(["a satellite image"], use_cache=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # -- texts ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], adapter: Optional[str] = None, normalize: bool = True,
                     use_cache: bool = True) -> torch.Tensor:
        """Texts -> T x D float32 embeddings (L2-normalised unless ``normalize=False``), cached per text."""
        adapter = self.feature_source(adapter)
        model = self.model_for(adapter)
        encode = self._fast_text if adapter is None and self._fast_text is not None else model.encode_text
        results: Dict[int, torch.Tensor] = {}
        missing: List[int] = []
        for i, t in enumerate(texts):
            hit = self.cache.get(("text", adapter, t)) if use_cache else None
            if hit is None:
                missing.append(i)
            else:
                results[i] = hit
        for start in range(0, len(missing), self.config.text_batch_size):
            chunk = missing[start:start + self.config.text_batch_size]
            tokens = self.loaded.tokenizer([texts[i] for i in chunk]).to(self.device)
            with self.autocast():
                feats = encode(tokens).float()
            for i, f in zip(chunk, feats):
                results[i] = f
                if use_cache:
                    self.cache.put(("text", adapter, texts[i]), f)
        if not texts:
            return torch.zeros((0, self.loaded.embed_dim), device=self.device)
        raw = torch.stack([results[i] for i in range(len(texts))])
        return F.normalize(raw, dim=-1) if normalize else raw
