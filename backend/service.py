"""The model-backed service: routes classify / rank / localize / embed to the tasks and shapes replies."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from shared_protocol import ErrorCode, Limits, ProtocolError, Reply, Request
from shared_protocol.defaults import MIN_VALID_SHARE
from shared_protocol.framing import DEFAULT_LIMITS
from shared_protocol.ops import ADAPT_METHODS, DEFAULT_MAX_CANVAS_PIXELS, SCORES_ARRAY, SELO_MODES, WINDOWS_ARRAY

from .adapt.store import adapter_summary
from .budget import ModelShape, check_budget
from .engine import WINDOW_PIXEL_BUDGET, Engine
from .errors import AdapterError, BackendError, DataError, ImageInputError, ModelLoadError, UnknownAdapter
from .models.precision import cpu_name
from .server import Job, Service
from .tasks import classify as classify_task
from .tasks import geo
from .tasks import localize as localize_task
from .tasks import rank as rank_task
from .tasks.masks import valid_pixels
from .models.presets import PRESETS
from .tasks.classnames import CLASS_PRESETS
from .tasks.templates import TEMPLATE_SETS

log = logging.getLogger("backend.service")
Handler = Callable[[Engine, Dict[str, Any], Dict[str, np.ndarray], Callable[[float, str], None]],
                   Tuple[Dict[str, Any], Dict[str, np.ndarray]]]
_CODES = ((UnknownAdapter, ErrorCode.NOT_FOUND), (ModelLoadError, ErrorCode.MODEL_ERROR),
          (AdapterError, ErrorCode.MODEL_ERROR), (DataError, ErrorCode.BAD_PARAMS),
          (ImageInputError, ErrorCode.BAD_ARRAY))


def protocol_error(exc: Exception) -> ProtocolError:
    """The protocol error a backend error is answered with (protocol errors pass through unchanged)."""
    if isinstance(exc, ProtocolError):
        return exc
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), ErrorCode.INTERNAL)
    if isinstance(exc, BackendError):
        return ProtocolError(code, exc.message, exc.details)
    return ProtocolError(code, str(exc))


def default_memory_budget() -> int:
    """Half the machine's memory (at least 1 GiB): the default ``--memory-budget-mb``."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(1 << 30, total // 2)


def without_paths(meta: Dict[str, Any]) -> Dict[str, Any]:
    """An adapter's description for a remote client: no file paths of this machine (the file, and the file
    names of a method's settings shortened to their base names)."""
    out = {k: v for k, v in meta.items() if k != "path"}
    config = meta.get("config")
    if isinstance(config, dict):
        out["config"] = {k: (os.path.basename(v) if isinstance(v, str) and ("/" in v or os.sep in v) else v)
                         for k, v in config.items()}
    return out


def uniform_image_warnings(arrays: Dict[str, np.ndarray], min_valid: float = MIN_VALID_SHARE) -> list:
    """Say so when images hold one value only over their valid pixels (all nodata, a blank render): their
    answers mean little. Tiles skipped for too few valid pixels are not counted (the reply says so itself)."""
    out = []
    for name, arr in arrays.items():
        if name.endswith("_mask") or arr.ndim not in (3, 4) or not arr.size:
            continue
        valid = valid_pixels(arrays, name)
        arr = arr[..., :3]  # not the alpha
        if arr.ndim == 3:
            pixels = arr.reshape(-1, arr.shape[-1]) if valid is None else arr[valid]
            if pixels.size and pixels.min() == pixels.max():
                out.append(f"'{name}' holds a single value ({pixels.flat[0]}) over its valid pixels: all nodata "
                           "or blank? The answer is uninformative")
            continue
        if valid is None:
            flat = arr.reshape(arr.shape[0], -1)
            blank = int((flat.min(axis=1) == flat.max(axis=1)).sum())
            count = arr.shape[0]
        else:
            kept = [i for i in range(arr.shape[0]) if valid[i].mean() >= min_valid]
            blank = sum(1 for i in kept if valid[i].any() and arr[i][valid[i]].min() == arr[i][valid[i]].max())
            count = len(kept)
        if blank:
            out.append(f"{blank} of {count} '{name}' hold a single value (nodata or blank)")
    return out


class ModelService(Service):
    """Serves one base model (and its adapters) through an :class:`Engine`."""

    def __init__(self, engine: Engine, limits: Limits = DEFAULT_LIMITS,
                 max_canvas_pixels: int = DEFAULT_MAX_CANVAS_PIXELS,
                 adapter_info: Optional[Dict[str, Dict[str, Any]]] = None, memory_budget: Optional[int] = None,
                 data_dirs: Sequence[str] = (), adapter_store=None):
        self.engine = engine
        self.adapter_store = adapter_store  # backend.adapt.store.AdapterStore: where 'train' saves (None: nowhere)
        self.limits = limits
        self.memory_budget = default_memory_budget() if memory_budget is None else int(memory_budget)
        self.max_canvas_pixels = max_canvas_pixels
        self.adapter_info = dict(adapter_info or {})
        self.handlers: Dict[str, Callable[[Job], Reply]] = {
            "classify": self._run(classify_task.classify),
            "rank": self._run(rank_task.rank),
            "embed": self._run(rank_task.embed),
            "localize": self._localize,
            "train": self._train,
        }
        from .index.service import IndexOps  # the index operations (backend/index)
        self.index_ops = IndexOps(engine, data_dirs)
        self.handlers.update(self.index_ops.handlers())

    def info(self, remote: bool = False) -> Dict[str, Any]:
        loaded = self.engine.loaded
        dev = loaded.device
        device = {"type": dev.type, "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
                  "precision": self.engine.precision.name,
                  "adapter_precision": self.engine.adapter_precision, "reason": loaded.extra.get("gpu_unused", "")}
        return {
            "model": loaded.describe(),
            "adapters": [{"name": n, **adapter_summary(without_paths(meta) if remote else meta)}
                         for n, meta in sorted(dict(self.adapter_info).items())],
            "adapter_dir": (str(self.adapter_store.root) if self.adapter_store is not None and not remote
                            else None),
            "device": device,
            "capabilities": {
                "operations": sorted(self.handlers),
                "template_sets": {k: len(v) for k, v in TEMPLATE_SETS.items()},
                "class_presets": CLASS_PRESETS,
                "model_presets": sorted(PRESETS),
                "ensembles": ["georsclip", "openclip"],
                "adapt_methods": list(ADAPT_METHODS),
                "image_dtypes": ["uint8", "uint16"],
                "max_canvas_pixels": self.max_canvas_pixels,
                "memory_budget_bytes": self.memory_budget,
                "localize_outputs": ["heatmaps", "geotiff", "polygons", SCORES_ARRAY],
                "selo_modes": list(SELO_MODES),
            },
            "cache": self.engine.cache.stats(),
            "warnings": self.warnings(),
        }

    def warnings(self) -> list:
        if self.engine.loaded.random_weights:
            return ["the model has RANDOM weights (--random-weights): its answers are meaningless"]
        return []

    def model_shape(self) -> ModelShape:
        return ModelShape(self.engine.batch_size, int(self.engine.loaded.image_size[0]),
                          int(self.engine.loaded.embed_dim or 512), WINDOW_PIXEL_BUDGET)

    def admit(self, request: Request, canvas_hw: Optional[Tuple[int, int]] = None) -> None:
        """``too_large`` before any work when the request's estimated peak memory is over the budget."""
        shapes = {name: tuple(arr.shape) for name, arr in request.arrays.items()}
        check_budget(request.op, request.params, shapes, self.model_shape(), self.memory_budget, canvas_hw)

    def handle(self, job: Job) -> Reply:
        request = job.request
        handler = self.handlers.get(request.op)
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"{request.op} is not served here")
        for name, arr in request.arrays.items():
            if name.endswith("_mask"):  # its shape was checked against its image's
                continue
            if arr.ndim >= 3 and arr.shape[-3] * arr.shape[-2] > self.max_canvas_pixels:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"'{name}' has {arr.shape[-3]} x {arr.shape[-2]} pixels, over "
                                    f"the limit of {self.max_canvas_pixels}", {"name": name})
            if arr.ndim >= 3 and arr.shape[-1] not in (1, 3, 4):
                raise ProtocolError(ErrorCode.BAD_ARRAY, f"'{name}' must have 1, 3 or 4 channels, got "
                                    f"{arr.shape[-1]}", {"name": name})
            if arr.ndim >= 3 and (arr.shape[-2] == 0 or arr.shape[-3] == 0):
                raise ProtocolError(ErrorCode.BAD_ARRAY, f"'{name}' has an empty image", {"name": name})
        started = time.perf_counter()
        try:
            reply = handler(job)
        except BackendError as exc:
            raise protocol_error(exc) from exc
        reply.result["elapsed_s"] = round(time.perf_counter() - started, 4)
        reply.result["model"] = self.engine.loaded.name
        reply.result["adapter"] = request.params.get("adapter")
        warnings = self.warnings() + uniform_image_warnings(request.arrays,
                                                            request.params.get("min_valid", MIN_VALID_SHARE))
        if warnings:
            reply.result["warnings"] = warnings
        return reply

    def _run(self, task: Handler) -> Callable[[Job], Reply]:
        def run(job: Job) -> Reply:
            result, arrays = task(self.engine, job.request.params, job.request.arrays, job.progress)
            return Reply.ok(job.request.id, job.request.op, result, arrays)
        return run

    def _train(self, job: Job) -> Reply:
        from .adapt.job import run_train
        return run_train(self.engine, self.adapter_store, self.adapter_info, job)

    def _localize(self, job: Job) -> Reply:
        params = job.request.params
        canvas = localize_task.resolve_canvas(self.engine, job.request.arrays.get("canvas"), params,
                                              job.request.arrays.get("canvas_mask"))
        h, w = canvas.height, canvas.width
        if canvas.pixels is None:  # a canvas named by its id: its size is known only now
            self.admit(job.request, (h, w))
        boxes = job.request.arrays.get(WINDOWS_ARRAY)
        if boxes is not None:  # explicit windows: their scores, no heatmap
            scores, result = localize_task.window_scores(self.engine, canvas, boxes, params,
                                                         lambda p, m: job.progress(0.9 * p, m))
            job.progress(1.0, "done")
            return Reply.ok(job.request.id, "localize", result, {SCORES_ARRAY: scores})
        out_bytes = len(params["queries"]) * h * w * 4
        if out_bytes > self.limits.max_array_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(params['queries'])} heatmaps of {h} x {w} need "
                                f"{out_bytes} bytes, over the reply limit of {self.limits.max_array_bytes}; send "
                                "fewer queries at once", {"limit": "max_array_bytes"})
        if params.get("geotiff") and len(params["queries"]) + 1 > self.limits.max_arrays:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"with geotiff=true at most {self.limits.max_arrays - 1} "
                                "queries fit in one reply", {"limit": "max_arrays"})
        crs_obj = geo.parse_crs(params.get("crs"))  # fail early on a bad CRS
        heatmaps, result = localize_task.localize(self.engine, canvas, params, lambda p, m: job.progress(0.9 * p, m))
        arrays: Dict[str, np.ndarray] = {"heatmaps": heatmaps}
        result["crs"] = crs_obj.to_string() if crs_obj is not None else None
        result["transform"] = params.get("transform")
        if params.get("geotiff"):
            for q in range(len(heatmaps)):
                job.check_cancelled()
                data = geo.heatmap_geotiff(heatmaps[q], params.get("transform"), params.get("crs"))
                arrays[f"geotiff_{q}"] = np.frombuffer(data, dtype=np.uint8)
        if params.get("polygons"):
            result["polygons"] = [geo.heatmap_polygons(heatmaps[q], params["threshold"], params.get("transform"),
                                                       params["queries"][q]) for q in range(len(heatmaps))]
        job.progress(1.0, "done")
        return Reply.ok(job.request.id, "localize", result, arrays)

    def close(self) -> None:
        self.engine.cache.clear()
