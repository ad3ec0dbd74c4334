"""Reproduce GeoRSCLIP's published table (RS5M ``inference/inference.py``) on the RS5M test bundle.

The bundle's layout (``unzip rs5m_test_data.zip``), as RS5M's ``inference_tool.py`` reads it:

- zero-shot (torchrs ImageFolders, class = folder name): ``AID/CLASS/*.jpg``, ``RESISC45/CLASS/*.jpg``,
  ``eurosat-rgb/2750/CLASS/*.jpg``; GeoRSCLIP's 105 templates and ensembling; top-1;
- retrieval (one ``filename,title`` row per caption, captions grouped per image): ``rsitmd/rsitmd_test.csv``
  with ``rsitmd/images/``, ``rsicd/rsicd_test.csv`` (gb18030) with ``rsicd/RSICD_images/``; R@1/5/10 both
  ways and their mean mR;
- SeLo: ``AIR-SLT/annotations/anno.json`` (``[{"caption", "jpg_name", "points"}]``) with ``AIR-SLT/imgs/``;
  each entry's heatmap in reference mode (``tasks/selo_reference.py``: windows 256/512/768, OpenCV bicubic,
  JPEG round trip, 8-bit map, 251-px median), measured after a JPEG round trip as the original measures
  ``probmap_{i}.jpg``; Rsu, Rda, Ras, Rmi averaged over the entries.

Zero-shot and retrieval run the served code paths (``backend.zeroshot``, the engine's preprocessing); the
model runs in fp32, as the original.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from backend.errors import DataError

Log = Callable[[str], None]
SELO_WINDOWS = [256, 512, 768]
SELO_SMOOTH = 251

ZEROSHOT = {"aid": "AID", "resisc45": "RESISC45", "eurosat": "eurosat-rgb/2750"}
RETRIEVAL = {"rsitmd": ("rsitmd/rsitmd_test.csv", "rsitmd/images", "utf-8"),
             "rsicd": ("rsicd/rsicd_test.csv", "rsicd/RSICD_images", "gb18030")}
SELO = {"air-slt": ("AIR-SLT/annotations/anno.json", "AIR-SLT/imgs")}
DATASETS = (*ZEROSHOT, *RETRIEVAL, *SELO)

# REFERENCE section 7: GeoRSCLIP's published numbers, by preset
PUBLISHED: Dict[str, Dict[str, Dict[str, float]]] = {
    "georsclip-vit-b-32": {
        "eurosat": {"top1": 61.40}, "resisc45": {"top1": 72.74}, "aid": {"top1": 74.42},
        "rsitmd": {"mr": 35.33}, "rsicd": {"mr": 26.06},
        "air-slt": {"rsu": 0.7556, "rda": 0.7309, "ras": 0.2580, "rmi": 0.7447},
    },
    "georsclip-vit-h-14": {"eurosat": {"top1": 67.47}, "resisc45": {"top1": 73.83}, "aid": {"top1": 76.33}},
}

BUNDLE_REPO, BUNDLE_FILE = "Zilun/GeoRSCLIP", "data/rs5m_test_data.zip"


def layout_help(data: Path) -> str:
    """What to put where, in words (offline, or when parts are missing)."""
    return "\n".join([
        f"Put the RS5M test bundle under {data}: download "
        f"https://huggingface.co/{BUNDLE_REPO}/resolve/main/{BUNDLE_FILE} and unzip it so that these exist:",
        f"  {data}/AID/<class>/*.jpg, {data}/RESISC45/<class>/*.jpg, {data}/eurosat-rgb/2750/<class>/*.jpg",
        f"  {data}/rsitmd/rsitmd_test.csv + {data}/rsitmd/images/, "
        f"{data}/rsicd/rsicd_test.csv (gb18030) + {data}/rsicd/RSICD_images/",
        f"  {data}/AIR-SLT/annotations/anno.json + {data}/AIR-SLT/imgs/",
        "and the checkpoint ckpt/RS5M_ViT-B-32.pt from the same repository into $MAPQUERY_WEIGHTS (default "
        "~/.cache/mapquery-rs/weights) or pass it with --checkpoint FILE.",
    ])


def bundle_root(data: Path) -> Path:
    """``data`` itself, or its ``rs5m_test_data/`` folder when the zip was unpacked with its top folder."""
    if not any((data / d).exists() for d in ("AID", "RESISC45", "rsitmd", "AIR-SLT")):
        inner = data / "rs5m_test_data"
        if inner.is_dir():
            return inner
    return data


def download_bundle(data: Path, log: Log) -> Path:
    """Fetch and unpack the bundle through the Hugging Face hub (resumable, checksummed by the hub client).

    Raises ``DataError`` with :func:`layout_help` when it cannot (offline, no access)."""
    import zipfile
    try:
        from huggingface_hub import hf_hub_download
        zip_path = hf_hub_download(BUNDLE_REPO, BUNDLE_FILE)
    except Exception as exc:  # offline (HF_HUB_OFFLINE, no network), no access, interrupted ...
        raise DataError(f"cannot download {BUNDLE_FILE} from {BUNDLE_REPO} ({type(exc).__name__}: {exc}).\n"
                        + layout_help(data)) from None
    log(f"unpacking {zip_path} into {data}")
    data.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(data)
    return bundle_root(data)


def zeroshot_part(loaded, folder: Path, batch_size: int) -> Dict[str, Any]:
    from backend.evaluation.zeroshot import evaluate_zeroshot
    from backend.training.data import ImageLoader, list_image_folder
    classes, files = list_image_folder(folder)
    samples = [(p, k) for k, c in enumerate(classes) for p in files[c]]
    res = evaluate_zeroshot(loaded.model, loaded.tokenizer, samples, classes, ImageLoader(loaded, cache=False).batch,
                            "georsclip", "georsclip", batch_size)
    return {"top1": res["top1"], "images": res["n"], "classes": res["classes"]}


def retrieval_part(loaded, csv_path: Path, images: Path, encoding: str, batch_size: int) -> Dict[str, Any]:
    from backend.evaluation.retrieval import evaluate_retrieval
    from backend.training.data import ImageLoader, read_caption_csv
    items = read_caption_csv(csv_path, images, encoding=encoding)
    missing = [str(it.path) for it in items if not it.path.is_file()]
    if missing:
        raise DataError(f"{len(missing)} images of {csv_path} are missing (e.g. {missing[0]})")
    return evaluate_retrieval(loaded.model, loaded.tokenizer, items, ImageLoader(loaded, cache=False).batch,
                              batch_size)


def selo_part(loaded, anno_path: Path, images: Path, log: Log) -> Dict[str, Any]:
    import json

    import cv2

    from backend.engine import Engine, EngineConfig
    from backend.evaluation import selo
    from backend.tasks.localize import localize
    entries = json.loads(anno_path.read_text(encoding="utf-8"))
    engine = Engine(loaded, EngineConfig(precision="fp32", cache_bytes=256 << 20))
    per: List[Dict[str, float]] = []
    for i, e in enumerate(entries):
        path = images / e["jpg_name"]
        bgr = cv2.imread(str(path))
        if bgr is None:
            raise DataError(f"cannot read {path}")
        params = {"queries": [e["caption"]], "window_sizes": SELO_WINDOWS, "crop_size": 256, "smooth": SELO_SMOOTH,
                  "selo_mode": "reference"}
        heat, _ = localize(engine, np.ascontiguousarray(bgr[:, :, ::-1]), params, lambda p, m: None)
        m = selo.selo_metrics(selo.jpeg_round_trip(heat[0]), e["points"])
        per.append({k: m[k] for k in ("rsu", "rda", "ras", "rmi")})
        log(f"  AIR-SLT {i + 1}/{len(entries)} {e['jpg_name']}: "
            + " ".join(f"{k} {v:.4f}" for k, v in per[-1].items()))
    out: Dict[str, Any] = {k: float(np.mean([p[k] for p in per])) for k in ("rsu", "rda", "ras", "rmi")}
    out["queries"] = len(per)
    return out


def reproduce_georsclip(loaded, data: Path, batch_size: int = 64, log: Log = print) -> Dict[str, Dict[str, Any]]:
    """Every part of the table the bundle holds: {dataset: metrics} or {dataset: {"skipped": why}}."""
    data = bundle_root(Path(data))
    loaded.model.eval()
    results: Dict[str, Dict[str, Any]] = {}
    for name, rel in ZEROSHOT.items():
        folder = data / rel
        if not folder.is_dir():
            results[name] = {"skipped": f"{folder} is missing"}
            continue
        log(f"zero-shot {name}: {folder}")
        results[name] = zeroshot_part(loaded, folder, batch_size)
    for name, (csv_rel, img_rel, encoding) in RETRIEVAL.items():
        csv_path, images = data / csv_rel, data / img_rel
        if not csv_path.is_file() or not images.is_dir():
            results[name] = {"skipped": f"{csv_path if not csv_path.is_file() else images} is missing"}
            continue
        log(f"retrieval {name}: {csv_path}")
        results[name] = retrieval_part(loaded, csv_path, images, encoding, batch_size)
    for name, (anno_rel, img_rel) in SELO.items():
        anno, images = data / anno_rel, data / img_rel
        if not anno.is_file() or not images.is_dir():
            results[name] = {"skipped": f"{anno if not anno.is_file() else images} is missing"}
            continue
        log(f"SeLo {name} (reference mode): {anno}")
        results[name] = selo_part(loaded, anno, images, log)
    return results


def compare(results: Dict[str, Dict[str, Any]], preset: str) -> Tuple[List[str], Dict[str, Dict[str, Any]]]:
    """Table lines (ours, published, difference) and the results with ``published`` / ``difference`` added."""
    published = PUBLISHED.get(preset, {})
    lines = [f"{'dataset':10} {'metric':7} {'ours':>9} {'published':>10} {'difference':>11}"]
    out: Dict[str, Dict[str, Any]] = {}
    for name in DATASETS:
        res = dict(results.get(name, {"skipped": "not run"}))
        if "skipped" in res:
            lines.append(f"{name:10} skipped: {res['skipped']}")
            out[name] = res
            continue
        metrics = ["top1"] if name in ZEROSHOT else (
            ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr"] if name in RETRIEVAL
            else ["rsu", "rda", "ras", "rmi"])
        pub = published.get(name, {})
        res["published"] = {k: pub[k] for k in metrics if k in pub}
        res["difference"] = {k: res[k] - pub[k] for k in metrics if k in pub}
        for k in metrics:
            p = f"{pub[k]:10.4f}" if k in pub else f"{'-':>10}"
            d = f"{res[k] - pub[k]:+11.4f}" if k in pub else f"{'':>11}"
            lines.append(f"{name:10} {k:7} {res[k]:9.4f} {p} {d}")
        out[name] = res
    return lines, out
