"""Similarity ranking: tiles against text and/or image queries, ranked both ways."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.defaults import MIN_VALID_SHARE

from ..engine import Engine, Progress
from ..models.preprocess import value_scale
from .masks import image_shares, skipped, valid_pixels


def top_k(sim: np.ndarray, k: int) -> List[List[Dict[str, Any]]]:
    """Per row: the ``k`` best columns as ``{"index", "score"}``, best first (ties by index)."""
    k = min(k, sim.shape[1])
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return [[{"index": int(j), "score": float(sim[i, j])} for j in row] for i, row in enumerate(order)]


def encode_valid(engine: Engine, arrays: Dict[str, np.ndarray], name: str, params: Dict[str, Any],
                 progress: Progress, normalize: bool = True) -> Tuple[torch.Tensor, List[int]]:
    """Embeddings of ``arrays[name]`` (NaN rows for the images skipped by ``min_valid``) and the skipped indices.

    uint16 images are stretched from the valid pixels of all of them.
    """
    images = arrays[name]
    valid = valid_pixels(arrays, name)
    skip = skipped(image_shares(valid, len(images)), params.get("min_valid", MIN_VALID_SHARE))
    scale = value_scale(images, params.get("value_range"), valid)
    if not skip:
        return engine.encode_images(images, params.get("adapter"), scale=scale, progress=progress,
                                    normalize=normalize), skip
    keep = np.setdiff1d(np.arange(len(images)), skip)
    feats = torch.full((len(images), engine.loaded.embed_dim), float("nan"), device=engine.device)
    if len(keep):
        feats[torch.from_numpy(keep).to(engine.device)] = engine.encode_images(
            images[keep], params.get("adapter"), scale=scale, progress=progress, normalize=normalize)
    return feats, skip


def rank(engine: Engine, params: Dict[str, Any], arrays: Dict[str, np.ndarray],
         progress: Progress) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Images x queries similarities, ranked both ways; images with too few valid pixels are never ranked."""
    texts = params.get("texts") or []
    query_images = arrays.get("query_images")
    if not texts and query_images is None:
        raise ProtocolError(ErrorCode.BAD_PARAMS, "rank needs 'texts' or 'query_images' to rank against")
    adapter = params.get("adapter")
    if query_images is not None:
        q_skip = skipped(image_shares(valid_pixels(arrays, "query_images"), len(query_images)),
                         params.get("min_valid", MIN_VALID_SHARE))
        if q_skip:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"query image {q_skip[0]} has too few valid pixels (see "
                                "min_valid)", {"param": "query_images", "skipped": q_skip})
    queries = [engine.encode_texts(texts, adapter)] if texts else []
    if query_images is not None:
        queries.append(encode_valid(engine, arrays, "query_images", params, lambda p, m: None)[0])
    img, skip = encode_valid(engine, arrays, "images", params, lambda p, m: progress(0.8 * p, m))
    q = torch.cat(queries)
    sim = (img @ q.T).float().cpu().numpy().astype(np.float32)  # images x queries (NaN rows: skipped)
    labels = [{"kind": "text", "text": t} for t in texts] + [
        {"kind": "image", "index": i} for i in range(0 if query_images is None else len(query_images))]
    k = params.get("top_k", 5)
    keep = np.setdiff1d(np.arange(len(sim)), skip)
    by_query = [[{"index": int(keep[m["index"]]), "score": m["score"]} for m in row]
                for row in top_k(sim[keep].T, k)]
    by_image = top_k(sim, k)
    for i in skip:
        by_image[i] = []
    result = {"queries": labels, "by_query": by_query, "by_image": by_image, "skipped": skip}
    return result, {"similarity": sim}


def embed(engine: Engine, params: Dict[str, Any], arrays: Dict[str, np.ndarray],
          progress: Progress) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Raw embeddings; images with too few valid pixels are skipped (NaN rows, listed in ``skipped``)."""
    texts = params.get("texts") or []
    images = arrays.get("images")
    if not texts and images is None:
        raise ProtocolError(ErrorCode.BAD_PARAMS, "embed needs 'images' and/or 'texts'")
    adapter = params.get("adapter")
    norm = params.get("normalize", True)
    out: Dict[str, np.ndarray] = {}
    skip: List[int] = []
    if images is not None:
        feats, skip = encode_valid(engine, arrays, "images", params, progress, normalize=norm)
        out["image_embeddings"] = feats.float().cpu().numpy().astype(np.float32)
    if texts:
        out["text_embeddings"] = engine.encode_texts(texts, adapter, normalize=norm).cpu().numpy().astype(np.float32)
    return {"dim": int(next(iter(out.values())).shape[1]), "skipped": skip}, out
