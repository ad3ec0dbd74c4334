"""A request's peak memory, estimated from its parameters and array shapes before any work starts.

Each term is what the engine holds at once: preprocessed batches (``batch x H x W x 3`` floats, twice for the
conversion and the resize), SeLo windows in flight (``windows x crop^2 x 3 x 4`` bytes, at most a batch and a
resize chunk of them at a time), class prompts (``classes x templates``), grid tiles (``tiles x tile^2``),
heatmaps and results, and the Python bookkeeping of window and grid lists. A request over the server's budget
(``serve --memory-budget-mb``, reported by ``info`` as ``capabilities.memory_budget_bytes``) is refused with
``too_large`` before it is queued; one ``crop_size`` of 4096 on 64 windows would otherwise take 13 GB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.ops import WINDOWS_ARRAY

F32 = 4
CONTEXT_LEN = 77  # tokens per prompt
PY_ITEM = 300  # bytes of Python objects per window or grid cell while the lists are built
DEFAULT_TEMPLATES = 105


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of the engine."""
    batch_size: int
    image_size: int
    embed_dim: int
    window_pixel_budget: int


def _grid_count(dim: int, step: int) -> int:
    return max(1, math.ceil(dim / step))


def selo_window_count(height: int, width: int, sizes: Sequence[int]) -> int:
    """An upper bound of the number of SeLo windows (two grids per size, offsets 0 and size / 2)."""
    total = 0
    for s in sizes:
        for offset in (0, s // 2):
            total += _grid_count(max(height - offset, 1), s) * _grid_count(max(width - offset, 1), s)
    return total


def _image_batches(m: ModelShape, n: int, h: int, w: int) -> int:
    b = min(max(n, 0), m.batch_size)
    return b * h * w * 3 * F32 * 2 + b * 3 * m.image_size ** 2 * F32 * 2


def _texts(m: ModelShape, count: int) -> int:
    return count * (CONTEXT_LEN * 8 + m.embed_dim * F32 * 2)


def peak_bytes(op: str, params: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]], m: ModelShape,
               canvas_hw: Optional[Tuple[int, int]] = None) -> Dict[str, int]:
    """The estimate's terms (bytes) for one request; ``canvas_hw`` stands for a canvas named by ``canvas_id``."""
    terms: Dict[str, int] = {}
    if op == "classify":
        classes = len(params.get("classes") or [])
        templates = len(params.get("custom_templates") or []) or DEFAULT_TEMPLATES
        terms["classes x templates"] = _texts(m, classes * templates)
        if "tiles" in shapes:
            n, h, w = shapes["tiles"][:3]
            terms["tile batches"] = _image_batches(m, n, h, w)
        elif "canvas" in shapes and params.get("tile_size"):
            h, w = shapes["canvas"][:2]
            tile = int(params["tile_size"])
            stride = int(params.get("stride") or tile)
            n = _grid_count(h, stride) * _grid_count(w, stride)
            terms["grid tiles"] = n * (PY_ITEM + m.embed_dim * F32) + _image_batches(m, n, tile, tile)
        else:
            n = 0
        terms["probabilities"] = n * classes * F32 * 2
    elif op in ("rank", "embed"):
        n_total = 0
        for name in ("images", "query_images"):
            if name in shapes:
                n, h, w = shapes[name][:3]
                n_total += n
                terms[f"{name} batches"] = _image_batches(m, n, h, w)
        texts = len(params.get("texts") or [])
        terms["texts"] = _texts(m, texts)
        terms["results"] = n_total * (texts + n_total + m.embed_dim) * F32
    elif op == "localize":
        if "canvas" in shapes:
            h, w, c = shapes["canvas"][:3]
        elif canvas_hw is not None:
            (h, w), c = canvas_hw, 3
        else:
            return terms  # a canvas_id the server does not hold: answered not_found, nothing allocated
        sizes = [int(s) for s in params.get("window_sizes") or (256, 512, 768)]
        crop = int(params.get("crop_size") or m.image_size)
        windows = shapes[WINDOWS_ARRAY][0] if WINDOWS_ARRAY in shapes else selo_window_count(h, w, sizes)
        in_flight = min(windows, 2 * m.batch_size)
        terms["canvas as floats"] = h * w * c * F32
        terms["windows in flight"] = in_flight * (crop * crop * 3 * F32 * 2 + 3 * m.image_size ** 2 * F32)
        largest = min(max(sizes), max(h, w)) ** 2
        terms["window crops"] = max(m.window_pixel_budget, largest) * 3 * F32 * 2
        terms["window list and embeddings"] = windows * (PY_ITEM + m.embed_dim * F32)
        queries = len(params.get("queries") or [])
        terms["heatmaps"] = queries * (windows if WINDOWS_ARRAY in shapes else h * w * 3) * F32
    return terms


def check_budget(op: str, params: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]], m: ModelShape,
                 budget: int, canvas_hw: Optional[Tuple[int, int]] = None) -> int:
    """The estimate in bytes; ``too_large`` (naming the largest term) when it is over ``budget``."""
    terms = peak_bytes(op, params, shapes, m, canvas_hw)
    total = sum(terms.values())
    if budget > 0 and total > budget:
        worst = max(terms, key=terms.get)
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{op} would need about {total >> 20} MiB at its peak (mostly "
                            f"{worst}: {terms[worst] >> 20} MiB), over the backend's memory budget of "
                            f"{budget >> 20} MiB; send less at once (smaller crop_size, fewer classes or "
                            "templates, a coarser grid, a smaller canvas)",
                            {"limit": "memory_budget_bytes", "estimate": total, "budget": budget, "term": worst})
    return total
