"""Image-text retrieval recall (REFERENCE section 4): R@1/5/10 both ways and their mean mR, in percent.

An image query is correct at K when one of its own captions is among the K best texts; a text query is
correct at K when its image is among the K best images.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

KS = (1, 5, 10)


def recall_metrics(sim: Tensor, text_to_image: Sequence[int] | Tensor, ks: Sequence[int] = KS) -> Dict[str, float]:
    """``sim``: N_images x N_texts scores; ``text_to_image[t]`` = the image that text ``t`` describes."""
    sim = sim.float().cpu()
    t2i_idx = torch.as_tensor(text_to_image, dtype=torch.long)
    n_img, n_txt = sim.shape
    if t2i_idx.numel() != n_txt:
        raise ValueError(f"{n_txt} texts but {t2i_idx.numel()} text-to-image entries")
    # rank of the best correct text for each image (0 = first)
    order = sim.argsort(dim=1, descending=True)  # N_img x N_txt
    correct = t2i_idx[order] == torch.arange(n_img).unsqueeze(1)
    has = correct.any(dim=1)
    first_i2t = torch.where(has, correct.float().argmax(dim=1), torch.full((n_img,), n_txt))
    order_t = sim.T.argsort(dim=1, descending=True)  # N_txt x N_img
    rank_t2i = (order_t == t2i_idx.unsqueeze(1)).float().argmax(dim=1)
    out: Dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((first_i2t < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((rank_t2i < k).float().mean())
    out["mr"] = sum(out.values()) / len(out)
    return out


@torch.no_grad()
def encode_pairs(model, tokenizer, items, loader, batch_size: int = 64, device=None
                 ) -> Tuple[Tensor, Tensor, List[int]]:
    """Normalised image features, caption features and caption->image indices for caption items."""
    device = device or next(model.parameters()).device
    imgs, txts, t2i = [], [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        imgs.append(F.normalize(model.encode_image(loader([it.path for it in chunk]).to(device)).float(), dim=-1))
    captions = [(c, i) for i, it in enumerate(items) for c in it.captions]
    for i in range(0, len(captions), 256):
        chunk = captions[i:i + 256]
        tokens = tokenizer([c for c, _ in chunk]).to(device)
        txts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        t2i += [j for _, j in chunk]
    return torch.cat(imgs), torch.cat(txts), t2i


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, items, loader, batch_size: int = 64, device=None) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        img, txt, t2i = encode_pairs(model, tokenizer, items, loader, batch_size, device)
    finally:
        model.train(was_training)
    out = recall_metrics(img @ txt.T, t2i)
    out.update(images=len(items), texts=len(t2i))
    return out
