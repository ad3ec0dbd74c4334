"""``python -m backend demo``: start a backend, run a scripted client session against it, print the answers."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List

import numpy as np

from shared_protocol.client import Client

from .files import atomic_write, read_image
from .models.presets import DEFAULT_PRESET
from .process import ServerStartError, start_server

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "RGB.byte.tif"
CLASSES = ["forest", "river", "farmland", "dense residential", "bare land", "sea or lake"]
QUERIES = ["a river winding through farmland", "dense forest"]


def _start(preset: str):
    """The preset offline; if its weights are missing, say so and fall back to the tiny random model."""
    print(f"demo: starting the backend with preset {preset} (offline) ...", flush=True)
    try:
        return start_server(["--model", preset, "--offline", "--device", "auto"]), preset
    except ServerStartError as exc:
        reason = next((line for line in reversed(exc.output) if "cannot start" in line), str(exc))
        print(f"demo: {reason}", flush=True)
        print("demo: FALLBACK: the tiny random-weight test model (answers are meaningless, the plumbing is real)."
              " Put the weights where the message above says to get real answers.", flush=True)
        return start_server(["--model", "tiny", "--random-weights"]), "tiny"


def _canvas(path: str | None) -> tuple:
    p = Path(path) if path else SAMPLE
    if p.is_file():
        img = read_image(p)
        mask = img.mask if img.mask is not None else np.ones(img.pixels.shape[:2], np.uint8)
        return img.pixels[:, :, :3], mask, img.transform, img.crs, str(p)
    print(f"demo: {p} not found; using a synthetic 768 x 768 canvas", flush=True)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (768, 768, 3), dtype=np.uint8), np.ones((768, 768), np.uint8), None, None, "synthetic"


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        server, used = _start(args.model or DEFAULT_PRESET)
    except ServerStartError as exc:
        print("demo: the backend did not start:\n  " + "\n  ".join(exc.output[-10:]), file=sys.stderr)
        return 1
    try:
        with server, Client(server.address, timeout=600.0) as client:
            info = client.hello()
            print(f"demo: connected to {server.address}: protocol {info['protocol']}, model {info['model']['name']}"
                  f" ({info['model']['arch']}), device {info['device']['type']}, weights {info['model']['weights']}")
            for w in info.get("warnings", []):
                print(f"demo: WARNING: {w}")
            canvas, mask, transform, crs, name = _canvas(args.image)
            h, w = canvas.shape[:2]
            print(f"demo: canvas {name}: {w} x {h} px, crs {crs}")

            t = time.perf_counter()
            reply = client.classify(CLASSES, canvas=canvas, canvas_mask=mask, tile_size=256, top_k=3)
            print(f"\n[classify] {len(reply.result['tiles'])} grid tiles of 256 px "
                  f"({time.perf_counter() - t:.2f} s):")
            for tile, box in zip(reply.result["tiles"], reply.arrays["boxes"]):
                tops = ", ".join(f"{m['label']} {m['score']:.2f}" for m in tile["top"]) or "skipped (nodata)"
                print(f"  tile {tile['index']:2d} px {list(map(int, box))}: {tops}")

            boxes = _full_tiles(h, w, 256)
            tiles = np.stack([canvas[y0:y0 + 256, x0:x0 + 256] for x0, y0, _, _ in boxes])
            t = time.perf_counter()
            reply = client.rank(tiles, QUERIES, top_k=3,
                                images_mask=np.stack([mask[y0:y0 + 256, x0:x0 + 256] for x0, y0, _, _ in boxes]))
            print(f"\n[rank] {len(tiles)} tiles x {len(QUERIES)} texts ({time.perf_counter() - t:.2f} s):")
            for q, ranks in zip(QUERIES, reply.result["by_query"]):
                print(f"  {q!r}: " + ", ".join(f"tile {m['index']} ({m['score']:.3f})" for m in ranks))

            t = time.perf_counter()
            reply = client.localize(canvas, QUERIES[:1], canvas_mask=mask, transform=transform, crs=crs, geotiff=True,
                                    polygons=True, threshold=0.7)
            cold = time.perf_counter() - t
            t = time.perf_counter()
            client.localize(canvas, QUERIES[1:], canvas_mask=mask, transform=transform, crs=crs)
            warm = time.perf_counter() - t
            heat = reply.arrays["heatmaps"][0]
            tif = atomic_write(out / "demo_heatmap.tif", reply.arrays["geotiff_0"].tobytes())
            geojson = atomic_write(out / "demo_regions.geojson", json.dumps(reply.result["polygons"][0]).encode())
            print(f"\n[localize] {QUERIES[0]!r}: {reply.result['windows']} windows, heatmap {heat.shape[1]} x "
                  f"{heat.shape[0]}, {len(reply.result['polygons'][0]['features'])} regions >= 0.7; "
                  f"cold {cold:.2f} s, second query on the same canvas {warm:.2f} s")
            print(f"  wrote {tif} and {geojson}")
            client.shutdown()
    except Exception as exc:
        print(f"demo: failed: {exc}", file=sys.stderr)
        return 1
    print(f"\ndemo: done with model {used}")
    return 0


def _full_tiles(h: int, w: int, size: int) -> List[tuple]:
    return [(x, y, x + size, y + size) for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]
