"""localize: batched + cached vs a straightforward reference, and a repeat query vs a cold one.

1. The reference algorithm written plainly (per window: PIL resize to 256, open_clip's PIL preprocessing,
   encode_image with batch 1, accumulate into full-size sum/count arrays) against ``tasks.localize`` on the
   same canvas and windows, unsmoothed (smoothing is compared separately: the reference's OpenCV median has
   no equal here). Target: the same heatmap, >= 3x faster on CPU.
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

SIZES = [256, 512, 768]


def reference_heatmap(loaded, canvas: np.ndarray, query: str) -> np.ndarray:
    h, w = canvas.shape[:2]
    pre = open_clip.image_transform(loaded.image_size, is_train=False, mean=loaded.mean, std=loaded.std)
    model = loaded.model
    with torch.no_grad():
        text = F.normalize(model.encode_text(loaded.tokenizer([query]).to(loaded.device)), dim=-1)[0]
        total, count = np.zeros((h, w)), np.zeros((h, w))
        for s in SIZES:
            for x0, y0, x1, y1 in selo_windows(h, w, s):
                crop = Image.fromarray(canvas[y0:y1, x0:x1]).resize((256, 256), Image.BICUBIC)
                emb = F.normalize(model.encode_image(pre(crop)[None].to(loaded.device)), dim=-1)[0]
                total[y0:y1, x0:x1] += float(emb @ text)
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
        engine = Engine(loaded, EngineConfig(precision="fp32"))
        t = time.perf_counter()
        ref = reference_heatmap(loaded, canvas, query)
        ref_s = time.perf_counter() - t
        t = time.perf_counter()
        ours = localize(engine, canvas, params, lambda p, m: None)[0][0]
        ours_s = time.perf_counter() - t
        diff = float(np.abs(ours - ref).max())
        spread = float(ref.max() - ref.min())
        result.update(reference_s=ref_s, ours_s=ours_s, speedup=ref_s / ours_s, max_abs_diff=diff,
                      diff_vs_spread=diff / spread, target_speedup=3.0)
        print(f"  reference (PIL per window, batch 1): {ref_s:8.2f} s")
        print(f"  batched (tasks.localize, cold)     : {ours_s:8.2f} s  -> {ref_s / ours_s:.2f}x (target >= 3x)")
        print(f"  heatmap max |diff| {diff:.2e} ({100 * diff / spread:.2f}% of the score range), "
              f"correlation {np.corrcoef(ours.ravel(), ref.ravel())[0, 1]:.6f}")
        del engine
    del loaded

    extra = ["--model", args.model, "--random-weights", "--device", args.device]
    with start_server(extra) as server, Client(server.address, timeout=1200) as client:
        client.hello()
        t = time.perf_counter()
        client.localize(canvas, [query])
        cold = time.perf_counter() - t
        warm = []
        for q in ["an airport", "dense forest", "a river", "farmland"]:
            t = time.perf_counter()
            client.localize(canvas, [q])
            warm.append(time.perf_counter() - t)
    repeat = float(np.median(warm))
    result.update(cold_s=cold, repeat_s=repeat, repeat_speedup=cold / repeat, target_repeat_speedup=30.0)
    print(f"  server cold query                  : {cold:8.3f} s")
    print(f"  server repeat query (same canvas)  : {repeat:8.3f} s  -> {cold / repeat:.1f}x (target >= 30x)")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
