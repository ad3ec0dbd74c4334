"""Similarity ranking: tiles against text and/or image queries, ranked both ways."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from shared_protocol import ErrorCode, ProtocolError

from ..engine import Engine, Progress


def top_k(sim: np.ndarray, k: int) -> List[List[Dict[str, Any]]]:
    """Per row: the ``k`` best columns as ``{"index", "score"}``, best first (ties by index)."""
    k = min(k, sim.shape[1])
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return [[{"index": int(j), "score": float(sim[i, j])} for j in row] for i, row in enumerate(order)]


def rank(engine: Engine, params: Dict[str, Any], arrays: Dict[str, np.ndarray],
         progress: Progress) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    texts = params.get("texts") or []
    query_images = arrays.get("query_images")
    if not texts and query_images is None:
        raise ProtocolError(ErrorCode.BAD_PARAMS, "rank needs 'texts' or 'query_images' to rank against")
    adapter = params.get("adapter")
    images = arrays["images"]
    img = engine.encode_images(images, adapter, params.get("value_range"), lambda p, m: progress(0.8 * p, m))
    queries = [engine.encode_texts(texts, adapter)] if texts else []
    if query_images is not None:
        queries.append(engine.encode_images(query_images, adapter, params.get("value_range")))
    q = torch.cat(queries)
    sim = (img @ q.T).float().cpu().numpy().astype(np.float32)  # images x queries
    labels = [{"kind": "text", "text": t} for t in texts] + [
        {"kind": "image", "index": i} for i in range(0 if query_images is None else len(query_images))]
    k = params.get("top_k", 5)
    result = {"queries": labels, "by_query": top_k(sim.T, k), "by_image": top_k(sim, k)}
    return result, {"similarity": sim}


def embed(engine: Engine, params: Dict[str, Any], arrays: Dict[str, np.ndarray],
          progress: Progress) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    texts = params.get("texts") or []
    images = arrays.get("images")
    if not texts and images is None:
        raise ProtocolError(ErrorCode.BAD_PARAMS, "embed needs 'images' and/or 'texts'")
    adapter = params.get("adapter")
    norm = params.get("normalize", True)
    out: Dict[str, np.ndarray] = {}
    if images is not None:
        feats = engine.encode_images(images, adapter, params.get("value_range"), progress, normalize=norm)
        out["image_embeddings"] = feats.cpu().numpy().astype(np.float32)
    if texts:
        out["text_embeddings"] = engine.encode_texts(texts, adapter, normalize=norm).cpu().numpy().astype(np.float32)
    return {"dim": int(next(iter(out.values())).shape[1])}, out
