"""Adapting from the map (issue 13): held-out accuracy per method, and the time from *adapt* to a usable adapter.

Part ``accuracy``: a labelled scene painted from the real rasters in ``../shared/data`` (5 classes, textured
regions, polygons in EPSG:4326), the tiny random-weight model (zero-shot at chance), every method through a
live server: held-out accuracy on the polygons the split kept out (zero-shot and adapted) and the job's time.

Part ``speed``: ViT-B-32 architecture (random weights: time does not depend on them), 5 classes x 20 chips of
224 px: the seconds from reading the layer to the adapter registered on a warm server (chips cut, sent,
encoded, fitted, held-out accuracy measured, saved), for each instant method (the first with the class names
new to the server, the second with the same names on other chips); then one epoch of each trained method on
the same chips (seconds per epoch from the trainer's history). ``--precision`` is passed to the server (both
parts; without it the accuracy part runs fp32 and the speed part the server's ``auto``).

Part ``agreement``: the speed part's 100 chips embedded in this process by the speed part's architecture
(random weights) at ``--precision`` and at fp32, the same weights: the cosine between the two per chip.

Prints a table and one ``RESULT {json}`` line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine
from backend.adapt.examples import build_examples
from backend.adapt.scene import make_scene
from backend.models.precision_names import PRECISIONS
from backend.process import start_server
from shared_protocol.client import Client

DATA = ROOT.parent / "shared" / "data"
METHODS = ("instant-cache", "linear-probe", "coop", "lora", "mrs-adapter", "gdpl")
TRAINED = ("coop", "lora", "mrs-adapter", "gdpl")


def textures():
    found = sorted(DATA.glob("*.tif")) if DATA.is_dir() else []
    if not found:
        print(f"warning: no rasters at {DATA}: synthetic textures", file=sys.stderr)
    return found


def send(client: Client, ex, name: str, method: str, **params):
    p = {"name": name, "method": method, "classes": ex.classes, "overwrite": True, "value_range": ex.value_range,
         **params}
    arrays = {"chips": ex.chips, "labels": ex.labels, "groups": ex.groups, "held_out": ex.held_out.astype(np.uint8)}
    return client.request("train", p, arrays, timeout=3600).result


def per_class_subset(ex, per_class: int, seed: int = 0):
    """At most ``per_class`` chips of each class, drawn a whole polygon at a time (the split stays by polygon)."""
    rng = np.random.default_rng(seed)
    keep = []
    for k in range(len(ex.classes)):
        groups = np.unique(ex.groups[ex.labels == k])
        rng.shuffle(groups)
        chosen = []
        for g in groups:
            idx = np.flatnonzero(ex.groups == g).tolist()
            chosen += idx[:per_class - len(chosen)]
            if len(chosen) >= per_class:
                break
        keep += chosen
    keep = np.array(sorted(keep))
    ex.chips, ex.labels, ex.groups, ex.held_out = ex.chips[keep], ex.labels[keep], ex.groups[keep], ex.held_out[keep]
    return ex


def accuracy_part(folder: Path, epochs: int, precision: str) -> list:
    scene = make_scene(folder / "scene", n_classes=5, grid=8, cell=80, textures=textures())
    rows = []
    server = start_server(["--model", "tiny", "--random-weights", "--device", "cpu", "--precision", precision,
                           "--adapter-dir", str(folder / "adapters")])
    try:
        with Client(server.address, timeout=3600, retries=0) as client:
            print(f"accuracy: the server runs {client.hello()['device']['precision']}", flush=True)
            ex = build_examples(scene.raster, scene.labels, "landcover", chip_size=32, max_per_example=4)
            for method in METHODS:
                t = time.perf_counter()
                res = send(client, ex, f"bench-{method}", method, epochs=epochs if method in TRAINED else None)
                rows.append({"method": method, "zero_shot": res["metrics"]["zero_shot"]["top1"],
                             "adapted": res["metrics"]["adapted"]["top1"], "held_out": res["metrics"]["held_out_chips"],
                             "train": res["metrics"]["train_chips"], "job_s": res["seconds"],
                             "wall_s": round(time.perf_counter() - t, 2),
                             "epochs": epochs if method in TRAINED else None})
                row = rows[-1]
                print(f"accuracy {method:14} zero-shot {row['zero_shot']:5.1f}%  adapted {row['adapted']:5.1f}%  "
                      f"({row['train']} train / {row['held_out']} held-out chips, {res['seconds']:.1f} s)", flush=True)
    finally:
        server.stop()
    return rows


def speed_scenes(folder: Path) -> list:
    # 5 classes on 5x5 cells of 2240 m: 224-px chips at the native 5 m, 4 per polygon, 20 per class; one scene
    # per instant method (other textures: no chip embedding is cached from the job before; the class names,
    # hence their text vectors, are: the first job is cold, the second is the labelling loop's next round)
    return [make_scene(folder / f"scene224-{i}", n_classes=5, grid=5, cell=448, pixel=5.0, textures=textures(),
                       seed=i) for i in range(2)]


def speed_examples(scene, i: int):
    return per_class_subset(build_examples(scene.raster, scene.labels, "landcover", resolution=5.0, chip_size=224,
                                           max_per_example=8, seed=i), 20)


def speed_part(folder: Path, model: str, trained: tuple, precision: str) -> dict:
    scenes = speed_scenes(folder)
    server = start_server(["--model", model, "--random-weights", "--adapter-dir", str(folder / "adapters224"),
                           "--precision", precision])
    out = {"model": model, "instant": {}, "trained_epoch_s": {}}
    try:
        with Client(server.address, timeout=3600, retries=0) as client:
            out["precision"] = client.hello()["device"]["precision"]
            print(f"speed: {model} on the server in {out['precision']}", flush=True)
            for i, method in enumerate(("instant-cache", "linear-probe")):
                t = time.perf_counter()
                ex = speed_examples(scenes[i], i)
                cut = time.perf_counter() - t
                res = send(client, ex, f"speed-{method}", method)
                total = time.perf_counter() - t
                out["instant"][method] = {"total_s": round(total, 2), "cut_s": round(cut, 2), "job_s": res["seconds"],
                                          "chips": int(len(ex.chips)), "adapted": res["metrics"]["adapted"]["top1"]}
                print(f"speed {method:14} {total:6.2f} s from the layer to the adapter ({cut:.2f} s cutting "
                      f"{len(ex.chips)} chips, {res['seconds']:.2f} s on the server)", flush=True)
            if trained:
                for method in trained:
                    res = send(client, ex, f"speed-{method}", method, epochs=1)
                    hist = [h for h in res["tuning"]["history"] if h.get("epoch", 0) >= 1]
                    out["trained_epoch_s"][method] = hist[0]["seconds"]
                    print(f"speed {method:14} {hist[0]['seconds']:6.1f} s per epoch ({res['metrics']['train_chips']} "
                          f"chips; the job with evaluation: {res['seconds']:.1f} s)", flush=True)
    finally:
        server.stop()
    return out


def agreement_part(folder: Path, model: str, precision: str) -> dict:
    import torch
    import torch.nn.functional as F
    from backend.engine import Engine, EngineConfig
    from backend.models import load_model
    torch.manual_seed(0)
    loaded = load_model(model, random_weights=True, device="cpu")
    chips = speed_examples(speed_scenes(folder)[0], 0).chips
    fp32 = Engine(loaded, EngineConfig(precision="fp32", cache_bytes=0)).encode_images(chips)
    other = Engine(loaded, EngineConfig(precision=precision, cache_bytes=0))
    cos = F.cosine_similarity(other.encode_images(chips), fp32)
    out = {"model": model, "precision": other.precision.name, "chips": len(chips),
           "cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 5)}
    print(f"agreement {model} {out['precision']} vs fp32 on {len(chips)} chips: cosine min {out['cosine_min']}, "
          f"mean {out['cosine_mean']} (random weights)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("accuracy", "speed", "agreement", "all"), default="all")
    ap.add_argument("--epochs", type=int, default=10, help="trained methods' epochs in the accuracy part")
    ap.add_argument("--model", default="ViT-B-32", help="architecture of the speed part")
    ap.add_argument("--no-trained-speed", action="store_true", help="skip the trained methods' epoch times")
    ap.add_argument("--trained", nargs="+", choices=TRAINED, default=list(TRAINED),
                    help="the trained methods whose epoch is timed in the speed part")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="the server's --precision (default: fp32 for the accuracy part, auto for the speed part)")
    args = ap.parse_args()
    print(machine(), flush=True)
    result = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("accuracy", "all"):
            result["accuracy"] = accuracy_part(Path(tmp), args.epochs, args.precision or "fp32")
        if args.part in ("speed", "all"):
            result["speed"] = speed_part(Path(tmp), args.model, () if args.no_trained_speed else tuple(args.trained),
                                         args.precision or "auto")
        if args.part == "agreement":
            result["agreement"] = agreement_part(Path(tmp), args.model, args.precision or "auto")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
