"""Whole server path vs raw ``encode_image`` on the same batches (target: ratio >= 0.9 on CPU).

Prints tiles/s for both and their ratio. The server runs in a subprocess with the same architecture
(random weights: throughput does not depend on them) and the same batch size and precision.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from common import best_of, machine
from backend.engine import Engine, EngineConfig
from backend.models import load_model
from backend.models.preprocess import preprocess_batch
from backend.process import start_server
from shared_protocol.client import Client


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="georsclip-vit-b-32")
    ap.add_argument("--tiles", type=int, default=0, help="default: 256 on CPU, 8192 on CUDA")
    ap.add_argument("--batch", type=int, default=0, help="tiles per request (default: the engine's batch size)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bind", default=None, help="server address (default: a free loopback TCP port)")
    args = ap.parse_args()

    loaded = load_model(args.model, random_weights=True, device=args.device)
    engine = Engine(loaded, EngineConfig())
    batch = args.batch or engine.batch_size
    n = args.tiles or (8192 if loaded.device.type == "cuda" else 128)
    n = max(batch, n // batch * batch)
    rng = np.random.default_rng(0)
    size = loaded.image_size
    tiles = rng.integers(0, 256, (n, size[0], size[1], 3), dtype=np.uint8)
    batches = [preprocess_batch(tiles[i:i + batch], loaded) for i in range(0, n, batch)]

    def raw():
        for x in batches:
            engine.encode_pixels(x)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    extra = ["--model", args.model, "--random-weights", "--device", args.device, "--batch-size", str(batch),
             "--cache-mb", "0"]  # the same tiles go round three times: measure encoding, not the cache
    with start_server(extra, address=args.bind) as server, Client(server.address, timeout=600) as client:
        client.hello()

        def served():
            for i in range(0, n, batch):
                client.embed(tiles[i:i + batch])

        # alternate the two, so that load from elsewhere on a shared machine hits both alike
        raw_times, served_times = [], []
        for _ in range(3):  # (the pauses let the other process's OpenMP threads stop spinning)
            time.sleep(1.0)
            raw_times.append(best_of(raw, repeat=1, warmup=0))
            time.sleep(1.0)
            served_times.append(best_of(served, repeat=1, warmup=0))
        raw_s, served_s = min(raw_times[1:]), min(served_times[1:])  # the first round warms up
    result = {"bench": "server_vs_raw", "model": args.model, "tiles": n, "batch": batch,
              "raw_tiles_per_s": n / raw_s, "server_tiles_per_s": n / served_s, "ratio": raw_s / served_s,
              "target_ratio": 0.9, "precision": engine.precision.name, "machine": machine()}
    print(f"server path vs raw encode_image: {args.model} in {engine.precision.name}, {n} tiles of {size[0]} px "
          f"in batches of {batch}")
    print(f"  raw encode_image : {result['raw_tiles_per_s']:10.1f} tiles/s")
    print(f"  whole server path: {result['server_tiles_per_s']:10.1f} tiles/s")
    print(f"  ratio            : {result['ratio']:.3f} (target >= 0.9)")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
