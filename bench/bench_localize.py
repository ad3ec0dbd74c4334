"""localize: batched + cached vs a straightforward reference, and a repeat query vs a cold one.

1. The reference algorithm written plainly (per window: PIL resize to 256, open_clip's PIL preprocessing,
   encode_image with batch 1 in fp32, accumulate into full-size sum/count arrays) against ``tasks.localize``
   on the same canvas and windows, unsmoothed (smoothing is compared separately: the reference's OpenCV
   median has no equal here). Target: the same heatmap, >= 3x faster on CPU. Measured for the engine in
   fp32 (exact) and in the precision ``auto`` picks on this machine (bf16 on a CPU with native bf16), whose
   heatmap is also compared with the reference run on the same bf16 weights.
2. Through a live server: a cold query vs a second query on the same canvas (window embeddings cached).
   Target: >= 30x faster.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from common import machine
from backend.engine import Engine, EngineConfig
from backend.models import load_model
from backend.process import start_server
from backend.tasks.localize import localize
from backend.tasks.windows import selo_windows
from shared_protocol.client import Client
from shared_protocol.defaults import DEFAULT_CROP_SIZE, DEFAULT_SMOOTH, DEFAULT_WINDOW_SIZES

SIZES = list(DEFAULT_WINDOW_SIZES)
REPEAT_QUERIES = ["an airport", "dense forest", "a river", "farmland"]


def reference_heatmap(loaded, canvas: np.ndarray, query: str, model=None) -> np.ndarray:
    h, w = canvas.shape[:2]
    pre = open_clip.image_transform(loaded.image_size, is_train=False, mean=loaded.mean, std=loaded.std)
    model = model or loaded.model
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        text = F.normalize(model.encode_text(loaded.tokenizer([query]).to(loaded.device)), dim=-1)[0]
        total, count = np.zeros((h, w)), np.zeros((h, w))
        for s in SIZES:
            for x0, y0, x1, y1 in selo_windows(h, w, s):
                crop = Image.fromarray(canvas[y0:y1, x0:x1]).resize((256, 256), Image.BICUBIC)
                emb = F.normalize(model.encode_image(pre(crop)[None].to(loaded.device, dtype)), dim=-1)[0]
                total[y0:y1, x0:x1] += float(emb.float() @ text.float())
                count[y0:y1, x0:x1] += 1
    return (total / count).astype(np.float32)


def synthetic_canvas(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    canvas[(np.sin(xx / 90.0) + np.cos(yy / 70.0)) > 0.8] = [40, 90, 160]  # structure, like water bodies
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="georsclip-vit-b-32")
    ap.add_argument("--canvas", type=int, default=0, help="square canvas size (default 1024 CPU, 4096 CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    loaded = load_model(args.model, random_weights=True, device=args.device)
    size = args.canvas or (4096 if loaded.device.type == "cuda" else 1024)
    canvas = synthetic_canvas(size)
    query = "a harbour with many boats"
    params = {"queries": [query], "window_sizes": SIZES, "crop_size": 256, "smooth": 0, "normalize": False}
    windows = sum(len(selo_windows(size, size, s)) for s in SIZES)
    result = {"bench": "localize", "model": args.model, "canvas": size, "windows": windows, "machine": machine()}
    print(f"localize: {args.model}, canvas {size} x {size}, {windows} windows of {SIZES}")

    if not args.skip_reference:
        t = time.perf_counter()
        ref = reference_heatmap(loaded, canvas, query)
        ref_s = time.perf_counter() - t
        spread = float(ref.max() - ref.min())
        result.update(reference_s=ref_s, target_speedup=3.0)
        print(f"  reference (PIL per window, batch 1, fp32): {ref_s:8.2f} s")
        for precision in ("fp32", "auto"):
            engine = Engine(loaded, EngineConfig(precision=precision))
            name = engine.precision.name
            if name in result.get("precisions", []):  # auto is fp32 on this machine: measured already
                continue
            t = time.perf_counter()
            ours = localize(engine, canvas, params, lambda p, m: None)[0][0]
            ours_s = time.perf_counter() - t
            diff = float(np.abs(ours - ref).max())
            corr = float(np.corrcoef(ours.ravel(), ref.ravel())[0, 1])
            result.setdefault("precisions", []).append(name)
            result[name] = {"ours_s": ours_s, "speedup": ref_s / ours_s, "max_abs_diff": diff,
                            "diff_vs_spread": diff / spread, "correlation": corr}
            print(f"  tasks.localize, cold, {name:4}           : {ours_s:8.2f} s  -> {ref_s / ours_s:.2f}x "
                  f"(target >= 3x); heatmap max |diff| {diff:.2e} ({100 * diff / spread:.2f}% of the score "
                  f"range), correlation {corr:.6f}")
            if engine.base_model is not loaded.model:  # the same algorithm on the same cast weights
                t = time.perf_counter()
                same = reference_heatmap(loaded, canvas, query, engine.base_model)
                same_s = time.perf_counter() - t
                d = float(np.abs(ours - same).max())
                result[name].update(reference_same_weights_s=same_s, max_abs_diff_same_weights=d,
                                    diff_vs_spread_same_weights=d / spread)
                print(f"    reference on the same {name} weights: {same_s:8.2f} s; heatmap max |diff| {d:.2e} "
                      f"({100 * d / spread:.2f}% of the score range)")
            del engine
    # the engine alone (no transport), in the precision auto picks, with the default smoothing
    engine = Engine(loaded, EngineConfig())
    served = {"queries": [query], "window_sizes": SIZES, "crop_size": DEFAULT_CROP_SIZE, "smooth": DEFAULT_SMOOTH,
              "normalize": True}
    t = time.perf_counter()
    localize(engine, canvas, served, lambda p, m: None)
    engine_cold = time.perf_counter() - t
    engine_warm = []
    for q in REPEAT_QUERIES:
        t = time.perf_counter()
        localize(engine, canvas, {**served, "queries": [q]}, lambda p, m: None)
        engine_warm.append(time.perf_counter() - t)
    engine_repeat = float(np.median(engine_warm))
    precision_name = engine.precision.name
    del engine, loaded

    extra = ["--model", args.model, "--random-weights", "--device", args.device]
    with start_server(extra) as server, Client(server.address, timeout=1200) as client:
        client.hello()
        t = time.perf_counter()
        client.localize(canvas, [query])
        cold = time.perf_counter() - t
        warm = []
        for q in REPEAT_QUERIES:  # the client sends the canvas's id, not the canvas
            t = time.perf_counter()
            client.localize(canvas, [q])
            warm.append(time.perf_counter() - t)
    repeat = float(np.median(warm))
    result.update(precision=precision_name, engine_cold_s=engine_cold, engine_repeat_s=engine_repeat,
                  cold_s=cold, repeat_s=repeat,
                  repeat_speedup=cold / repeat, target_repeat_speedup=30.0)
    print(f"  engine cold query ({precision_name:4}, smooth 251): {engine_cold:8.3f} s")
    print(f"  engine repeat query (same canvas)  : {engine_repeat:8.3f} s")
    print(f"  server cold query                  : {cold:8.3f} s")
    print(f"  server repeat query (same canvas)  : {repeat:8.3f} s  -> {cold / repeat:.1f}x (target >= 30x); "
          f"the canvas goes by its id, the {4 * size * size / 2**20:.0f} MB heatmap comes back")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
