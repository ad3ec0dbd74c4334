"""Datasets: Karpathy JSON (RSICD, RSITMD, UCM-captions), CSV ``filename,title``, ImageFolder with N-shot
sampling. Images are read with :func:`backend.files.read_image` and put through the model's own
preprocessing (:func:`backend.models.preprocess.preprocess_batch`) on the CPU.
"""
from __future__ import annotations

import csv
import json
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backend.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
PathLike = Union[str, Path]


@dataclass
class CaptionItem:
    path: Path
    captions: List[str]
    split: str = "train"


@dataclass
class CaptionData:
    train: List[CaptionItem]
    held_out: List[CaptionItem]
    held_out_name: str = "val"


@dataclass
class ClassData:
    classes: List[str]
    train: List[Tuple[Path, int]]
    held_out: List[Tuple[Path, int]] = field(default_factory=list)


def _images_dir(annotation: Path, images_dir: Optional[PathLike], first: str) -> Path:
    if images_dir is not None:
        return Path(images_dir)
    for cand in (annotation.parent, annotation.parent / "images", annotation.parent / "imgs"):
        if (cand / first).is_file():
            return cand
    return annotation.parent


def read_karpathy(path: PathLike, images_dir: Optional[PathLike] = None) -> List[CaptionItem]:
    """``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`` (``filepath`` is honoured)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a Karpathy-style caption JSON ({exc})") from None
    if not images:
        raise DataError(f"{path}: no images")
    root = _images_dir(path, images_dir, images[0]["filename"])
    items = []
    for im in images:
        caps = [s["raw"] if isinstance(s, dict) else str(s) for s in im.get("sentences", [])]
        sub = Path(im.get("filepath", "")) / im["filename"]
        items.append(CaptionItem(root / sub, [c.strip() for c in caps if c and c.strip()], im.get("split", "train")))
    return items


def read_caption_csv(path: PathLike, images_dir: Optional[PathLike] = None,
                     encoding: str = "utf-8") -> List[CaptionItem]:
    """One ``filename,title`` row per caption (a header row is optional; with a header naming ``filename``
    and ``title``, those columns are read wherever they are); captions grouped per image. RS5M's RSICD test
    CSV is ``gb18030``."""
    path = Path(path)
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    file_col, title_col = 0, 1
    try:
        with open(path, newline="", encoding=encoding) as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not {encoding} text ({exc})") from None
    for i, row in enumerate(rows):
        if i == 0:
            header = [c.strip().lower() for c in row]
            if "filename" in header and "title" in header:
                file_col, title_col = header.index("filename"), header.index("title")
                continue
            if header and header[0] in ("filename", "file", "image", "filepath"):
                continue
        if len(row) <= max(file_col, title_col):
            continue
        groups.setdefault(row[file_col].strip(), []).append(row[title_col].strip())
    if not groups:
        raise DataError(f"{path}: no filename,title rows")
    root = _images_dir(path, images_dir, next(iter(groups)))
    return [CaptionItem(root / name, caps, "all") for name, caps in groups.items()]


def read_captions(path: PathLike, images_dir: Optional[PathLike] = None, fmt: str = "auto") -> List[CaptionItem]:
    fmt = {"auto": Path(path).suffix.lower().lstrip(".")}.get(fmt, fmt)
    if fmt in ("json", "karpathy"):
        return read_karpathy(path, images_dir)
    if fmt in ("csv", "tsv"):
        return read_caption_csv(path, images_dir)
    raise DataError(f"{path}: caption data must be a Karpathy .json or a filename,title .csv")


def split_captions(items: List[CaptionItem], eval_split: Optional[str] = None, val_fraction: float = 0.1,
                   seed: int = 0) -> CaptionData:
    """Karpathy: train = 'train' + 'restval', held out = ``eval_split`` ('val' if present, else 'test').
    Without splits (CSV): a seeded ``val_fraction`` of the images is held out."""
    splits = {it.split for it in items}
    if splits - {"all"}:
        name = eval_split or ("val" if "val" in splits else "test")
        train = [it for it in items if it.split in ("train", "restval")]
        return CaptionData(train, [it for it in items if it.split == name], name)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(val_fraction * len(items)))) if len(items) > 1 else 0
    held = set(order[:n_val])
    return CaptionData([it for i, it in enumerate(items) if i not in held],
                       [it for i, it in enumerate(items) if i in held], "held-out")


def list_image_folder(root: PathLike) -> Tuple[List[str], Dict[str, List[Path]]]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory of class folders")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = {c: sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    classes = [c for c in classes if files[c]]
    if not classes:
        raise DataError(f"{root}: no class folders with images")
    return classes, files


def read_image_folder(root: PathLike, shots: Optional[int] = None, seed: int = 0,
                      held_out_per_class: Optional[int] = None, val_root: Optional[PathLike] = None) -> ClassData:
    """ImageFolder (``root/CLASS/*.png``). ``shots``: N images per class drawn with ``seed``; the rest
    (at most ``held_out_per_class`` each) is held out, unless ``val_root`` gives the held-out images."""
    classes, files = list_image_folder(root)
    rng = random.Random(seed)
    train, held = [], []
    for label, c in enumerate(classes):
        paths = list(files[c])
        picked = (sorted(rng.sample(range(len(paths)), shots)) if shots and shots < len(paths)
                  else list(range(len(paths))))
        train += [(paths[i], label) for i in picked]
        rest = [paths[i] for i in range(len(paths)) if i not in set(picked)]
        held += [(p, label) for p in rest[:held_out_per_class]]
    if val_root is not None:
        vclasses, vfiles = list_image_folder(val_root)
        unknown = set(vclasses) - set(classes)
        if unknown:
            raise DataError(f"{val_root}: classes {sorted(unknown)} are not in {root}")
        held = [(p, classes.index(c)) for c in vclasses for p in vfiles[c][:held_out_per_class]]
    return ClassData(classes, train, held)


class ImageLoader:
    """Path -> preprocessed 3 x S x S tensor (model normalisation), optionally cached in memory."""

    def __init__(self, loaded, cache: bool = True):
        self.spec = SimpleNamespace(device=torch.device("cpu"), image_size=tuple(loaded.image_size),
                                    mean=tuple(loaded.mean), std=tuple(loaded.std))
        self.cache: Optional[Dict[Path, Tensor]] = {} if cache else None

    def __call__(self, path: Path) -> Tensor:
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        from backend.files import read_image
        from backend.models.preprocess import preprocess_batch
        try:
            pixels = read_image(path).pixels
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        x = preprocess_batch(np.require(pixels, requirements=["C", "W"])[None], self.spec)[0]
        if self.cache is not None:
            self.cache[path] = x
        return x

    def batch(self, paths: Sequence[Path]) -> Tensor:
        return torch.stack([self(p) for p in paths])


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random flips and quarter turns per image (remote-sensing imagery has no up)."""
    out = []
    for img in x:
        k = int(torch.randint(4, (1,), generator=generator))
        img = torch.rot90(img, k, dims=(1, 2))
        if torch.rand(1, generator=generator) < 0.5:
            img = img.flip(2)
        out.append(img)
    return torch.stack(out)


def random_resized_crop_flip(x: Tensor, generator: torch.Generator, scale: Tuple[float, float] = (0.08, 1.0),
                             ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Dassl's ``random_resized_crop`` + ``random_flip`` (torchvision's sampling: 10 tries, else the centre
    crop of the clamped ratio; bicubic back to the size; horizontal flip with p 0.5), on the model-size images
    (Dassl crops the raw image before resizing; here the loader's resized centre crop is what is cropped)."""
    out = []
    _, h, w = x.shape[1:]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for img in x:
        box = None
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
            aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
                box = (top, left, ch, cw)
                break
        if box is None:  # the centre crop with the ratio clamped to its range
            r = w / h
            cw, ch = (w, int(round(w / ratio[0]))) if r < ratio[0] else \
                ((int(round(h * ratio[1])), h) if r > ratio[1] else (w, h))
            box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
        top, left, ch, cw = box
        crop = img[:, top:top + ch, left:left + cw].unsqueeze(0)
        img = F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False)[0]
        if torch.rand(1, generator=generator) < 0.5:
            img = img.flip(2)
        out.append(img)
    return torch.stack(out)


def batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None,
            drop_last: bool = False) -> Iterator[List[int]]:
    """Index batches, shuffled with ``generator`` when given."""
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]
