"""localize: how far the fast default is from the reference pipeline (``selo_mode="reference"``).

On a few canvases (the shared Landsat raster when present, and synthetic ones) and one query each, both
modes run with the default windows (256, 512, 768) and smoothing (251 px) on the same engine (fp32). Reported:
the heatmap difference in grey levels (the reference map is 8-bit; the fast map is scaled by 255), and the
SeLo metrics of both maps (measured as the reference measures them: after a JPEG round trip) on two
quadrilateral regions per canvas (one fixed, one around the reference map's peak), with their deltas. The
default model is the tiny random-weight test model (``--model``/``--checkpoint`` take any other): the
differences measure the pipelines, not a model's skill.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import ROOT, machine
from backend.engine import Engine, EngineConfig
from backend.evaluation import selo
from backend.models import load_model
from backend.tasks.localize import localize

SHARED = ROOT.parent / "shared" / "data" / "RGB.byte.tif"


def synthetic_canvas(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour fields with 'water bodies' and noise: structure at the scale of the windows."""
    import cv2
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.random((h, w, 3)), (0, 0), 40)
    base = (base - base.min()) / (base.max() - base.min())
    yy, xx = np.mgrid[0:h, 0:w]
    base[(np.sin(xx / 97.0 + seed) + np.cos(yy / 71.0)) > 1.2] = [0.15, 0.35, 0.6]
    return np.uint8(np.clip(base + rng.normal(0, 0.04, base.shape), 0, 1) * 255)


def canvases():
    out = []
    if SHARED.is_file():
        from backend.files import read_image
        out.append(("RGB.byte.tif 791x718", read_image(SHARED).pixels[:, :, :3]))
    out += [("synthetic 1024x1024", synthetic_canvas(1024, 1024, 1)),
            ("synthetic 1200x1600", synthetic_canvas(1200, 1600, 2))]
    return out


def regions_for(reference: np.ndarray):
    """Two quadrilaterals: one fixed (right of the centre), one around the reference map's hottest pixel
    (so that attention centres fall inside a region and Ras / Rda are exercised)."""
    h, w = reference.shape
    fixed = [[w * 0.55, h * 0.45], [w * 0.8, h * 0.45], [w * 0.8, h * 0.7], [w * 0.55, h * 0.7]]
    y, x = np.unravel_index(np.argmax(reference), reference.shape)
    r = 0.12 * min(h, w)
    hot = [[max(x - r, 0), max(y - r, 0)], [min(x + r, w - 1), max(y - 0.8 * r, 0)],
           [min(x + r, w - 1), min(y + r, h - 1)], [max(x - 0.9 * r, 0), min(y + r, h - 1)]]
    return [fixed, hot]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--checkpoint")
    ap.add_argument("--query", default="a lake next to a green forest")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    loaded = load_model(args.model, checkpoint=args.checkpoint, random_weights=args.checkpoint is None
                        and args.model == "tiny", device="auto")
    engine = Engine(loaded, EngineConfig(precision="fp32", cache_bytes=0))
    rows = []
    print(f"# {machine()}\n# model {loaded.name} ({loaded.weights}), precision fp32\n")
    print(f"{'canvas':24} {'mean |d|':>8} {'p99 |d|':>8} {'max |d|':>8} {'corr':>6} {'t fast':>7} {'t ref':>7}  "
          "metric: fast / reference (delta)")
    for name, canvas in canvases():
        params = {"queries": [args.query], "window_sizes": [256, 512, 768], "crop_size": 256, "smooth": 251}
        t = time.perf_counter()
        fast, _ = localize(engine, canvas, dict(params, selo_mode="fast"), lambda p, m: None)
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        ref, _ = localize(engine, canvas, dict(params, selo_mode="reference"), lambda p, m: None)
        t_ref = time.perf_counter() - t
        d = np.abs(fast[0].astype(np.float64) * 255 - ref[0].astype(np.float64) * 255)
        corr = float(np.corrcoef(fast[0].ravel(), ref[0].ravel())[0, 1])
        regions = regions_for(ref[0])
        m_fast = selo.selo_metrics(selo.jpeg_round_trip(fast[0]), regions)
        m_ref = selo.selo_metrics(selo.jpeg_round_trip(ref[0]), regions)
        metrics = {k: (m_fast[k], m_ref[k], m_fast[k] - m_ref[k]) for k in ("rsu", "ras", "rda", "rmi")}
        row = {"canvas": name, "mean_abs_grey": float(d.mean()), "p99_abs_grey": float(np.percentile(d, 99)),
               "max_abs_grey": float(d.max()), "corr": corr, "t_fast_s": t_fast, "t_reference_s": t_ref,
               "metrics": metrics}
        rows.append(row)
        shown = "  ".join(f"{k} {a:.4f}/{b:.4f} ({c:+.4f})" for k, (a, b, c) in metrics.items())
        print(f"{name:24} {row['mean_abs_grey']:8.2f} {row['p99_abs_grey']:8.1f} {row['max_abs_grey']:8.1f} "
              f"{corr:6.3f} {t_fast:7.2f} {t_ref:7.2f}  {shown}", flush=True)
    if args.json:
        print(json.dumps({"machine": machine(), "model": loaded.name, "rows": rows}))


if __name__ == "__main__":
    main()
