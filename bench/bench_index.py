"""The index (backend/index): build throughput, query latency and recall at 1,000,000 rows, Ray's overhead.

1. ``build``: pixels read from a real (tiled, deflate) GeoTIFF to rows stored in LanceDB, against raw
   ``Engine.encode_windows`` on the same windows of the same raster already in memory. Target >= 0.9 on
   CPU: reading (a prefetching reader thread) and writing (a writer thread) must overlap the encoding.
2. ``query``: N synthetic, clustered, unit 512-d rows (N = 1,000,000 by default) in an index of the index's
   own schema, finished as a build finishes (its ANN index, compaction); p50 latency of a top-100 search
   as the server makes one (the store reused while ``is_current()``, ``IndexStore.search`` with the result
   columns) and recall@100 against an exact search, for a few nprobes (the index's default marked), each in
   a first sweep and a repeat (partitions then in the process's cache). Targets: p50 <= 10 ms, recall >= 0.95.
   CPU-heavy (minutes): run it alone.
3. ``ray``: the same build on Ray Data (``--engine ray``) against the in-process build, Ray's start apart.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine
from backend.engine import Engine, EngineConfig
from backend.index import layout
from backend.index.build import build_index, hit_column
from backend.index.layout import WindowSettings
from backend.index.rasters import window_boxes
from backend.models import load_model


def write_scene(path: Path, size: int) -> Path:
    """A textured RGB uint8 GeoTIFF, tiled 256 x 256 and deflate-compressed like a COG."""
    import rasterio
    from rasterio.transform import from_origin
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bands = [(np.sin(xx / (17 + 9 * b)) * np.cos(yy / (23 + 5 * b)) * 100 + 128 + rng.normal(0, 12, (size, size)))
             .clip(0, 255).astype(np.uint8) for b in range(3)]
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32618",
                       transform=from_origin(500000, 4200000, 0.5, 0.5), tiled=True, blockxsize=256, blockysize=256,
                       compress="deflate") as dst:
        dst.write(np.stack(bands))
    return path


def bench_build(args, work: Path) -> dict:
    import rasterio
    loaded = load_model(args.model, random_weights=True, device="cpu")
    engine = Engine(loaded, EngineConfig(batch_size=64, precision=args.precision, cache_bytes=0))
    scene = write_scene(work / "scene.tif", args.scene)
    settings = WindowSettings((256, 512, 768), 256, 0.5)
    boxes, _ = window_boxes(args.scene, args.scene, settings)
    with rasterio.open(scene) as ds:
        canvas = np.ascontiguousarray(ds.read().transpose(1, 2, 0))
    engine.warm_up()
    t = time.perf_counter()  # once per process, not per build: importing lancedb, the weights' fingerprint
    import lancedb  # noqa: F401
    from backend.index.identity import model_identity
    model_identity(engine)
    once_s = time.perf_counter() - t
    raw_times, build_times = [], []
    for i in range(args.repeat):  # alternate, so that load from elsewhere hits both sides alike
        t = time.perf_counter()
        engine.encode_windows(canvas, boxes, 256, None, (0.0, 255.0))
        raw_times.append(time.perf_counter() - t)
        out = work / f"index{i}"
        t = time.perf_counter()
        report = build_index(engine, out, [str(scene)], settings)
        build_times.append(time.perf_counter() - t)
        assert report["rows"] == len(boxes), report
        shutil.rmtree(out)
        time.sleep(1)
    raw, built = min(raw_times), min(build_times)
    res = {"windows": len(boxes), "scene": args.scene, "model": loaded.name, "precision": engine.precision.name,
           "raw_encode_s": round(raw, 3), "build_s": round(built, 3), "raw_windows_per_s": round(len(boxes) / raw, 2),
           "build_windows_per_s": round(len(boxes) / built, 2), "ratio": round(raw / built, 3),
           "raw_times": [round(x, 2) for x in raw_times], "build_times": [round(x, 2) for x in build_times],
           "once_per_process_s": round(once_s, 2)}
    print(f"build: {len(boxes)} windows of a {args.scene}^2 GeoTIFF, {loaded.name} {engine.precision.name}: raw "
          f"encode {raw:.2f} s ({res['raw_windows_per_s']}/s), whole build {built:.2f} s "
          f"({res['build_windows_per_s']}/s): ratio {res['ratio']} (target >= 0.9)", flush=True)
    return res


def clustered_rows(n: int, dim: int, rng, clusters: int = 4096, chunk: int = 100_000):
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        v = centers[rng.integers(0, clusters, m)] + rng.standard_normal((m, dim)).astype(np.float32) * 0.6 / dim ** 0.5
        yield v / np.linalg.norm(v, axis=1, keepdims=True)


def synthetic_rows(start: int, vectors: np.ndarray):
    """Index rows (the index's own schema) for synthetic vectors: windows of 256 px on a 1000-wide grid."""
    import pyarrow as pa
    n, dim = vectors.shape
    i = np.arange(start, start + n)
    col, row = (i % 1000 * 256).astype(np.int32), (i // 1000 * 256).astype(np.int32)
    x0, y0 = 500000.0 + col, 4200000.0 - row
    lon, lat = -75 + col * 1e-5, 38 - row * 1e-5
    cols = {"id": [f"synthetic:256:{c}:{r}" for c, r in zip(col, row)], "raster": ["/data/synthetic.tif"] * n,
            "raster_id": ["synthetic"] * n, "col": col, "row": row, "width": np.full(n, 256, np.int32),
            "height": np.full(n, 256, np.int32), "size": np.full(n, 256, np.int32), "crs": ["EPSG:32618"] * n,
            "minx": x0, "miny": y0 - 256, "maxx": x0 + 256, "maxy": y0, "lon_min": lon, "lat_min": lat - 2.5e-3,
            "lon_max": lon + 2.5e-3, "lat_max": lat, "geometry": [b""] * n,
            "wkt": [f"POLYGON(({a:.5f} {b:.5f}, ...))" for a, b in zip(lon, lat)], "valid": np.ones(n, np.float32),
            "date": ["2026-11-25"] * n,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)}
    cols["hit"] = hit_column(cols)
    return pa.table(cols, schema=layout.windows_schema(dim))


def bench_query(args, work: Path) -> dict:
    """Top-100 searches through the index's own path (``IndexStore.search`` with the result columns, as
    ``index search`` asks), on an index of synthetic rows built by the index's own ``finish``."""
    from backend.index.query import RESULT_COLUMNS
    rng = np.random.default_rng(0)
    n, dim = args.rows, 512
    identity = {"name": "synthetic", "arch": "synthetic", "embed_dim": dim, "weights": None,
                "random_weights": True, "adapter": None, "fingerprint": "synthetic"}
    store = layout.IndexStore.create_or_open(work / "q", identity, WindowSettings())
    parts = []
    t = time.perf_counter()
    with store.writing():
        for v in clustered_rows(n, dim, rng):
            store.append(synthetic_rows(sum(len(p) for p in parts), v))
            parts.append(v)
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        info = store.finish()  # the ANN index (above layout.ANN_MIN_ROWS) and compaction, as a build ends
    ann_s = time.perf_counter() - t
    data = np.concatenate(parts)
    del parts
    print(f"query: {n} rows written in {write_s:.1f} s, finished (ANN {info['ann']}) in {ann_s:.1f} s", flush=True)
    picks = rng.integers(0, n, args.queries)
    queries = data[picks] + rng.standard_normal((args.queries, dim)).astype(np.float32) * 0.6 / dim ** 0.5
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(data @ queries.T), axis=0)[:100].T  # queries x 100
    default = layout.ANN_NPROBES
    settings = []
    kinds = [k for k in dict.fromkeys([layout.ANN_KIND] + args.ann_kinds.split(",")) if k]
    for kind, nprobes in [(k, p) for k in kinds for p in dict.fromkeys([default, 4, 16])]:
        if kind != layout.ANN_KIND:  # the same rows, the index built again as another kind
            t = time.perf_counter()
            with store.writing():
                layout.create_ann(store.windows, n, dim, kind)
            print(f"  {kind} built in {time.perf_counter() - t:.1f} s", flush=True)
            layout.ANN_KIND = kind
            store = layout.IndexStore.open(work / "q")
        layout.ANN_NPROBES = nprobes
        for sweep in ("first", "repeat"):  # first: partitions loaded from disk; repeat: from the process's cache
            times, cpu, recalls, errors = [], [], [], []
            for i, q in enumerate(queries):
                t, c = time.perf_counter(), time.process_time()
                if not store.is_current():  # what the server does for each request (backend/index/service.py)
                    store = layout.IndexStore.open(work / "q")
                table = store.search(q, 100, None, RESULT_COLUMNS)
                got = [json.loads(h)["window"] for h in table["hit"].to_pylist()]
                dt, dc = time.perf_counter() - t, time.process_time() - c
                times.append(dt)
                cpu.append(dc)  # CPU time of all the process's threads: what load from elsewhere cannot inflate
                rows = [w[1] // 256 * 1000 + w[0] // 256 for w in got]  # synthetic_rows' grid
                recalls.append(len(set(rows) & set(exact[i].tolist())) / 100)
                errors.append(float(np.abs(table["score"].to_numpy() - data[rows] @ q).max()))
            s = {"kind": kind, "nprobes": nprobes, "sweep": sweep, "p50_ms": round(1000 * statistics.median(times), 2),
                 "p90_ms": round(1000 * float(np.percentile(times, 90)), 2),
                 "cpu_p50_ms": round(1000 * statistics.median(cpu), 2),
                 "recall_at_100": round(float(np.mean(recalls)), 4), "score_error_max": round(max(errors), 5),
                 "default": nprobes == default and kind == kinds[0]}
            settings.append(s)
            print(f"  {kind} nprobes {nprobes:3d} ({sweep} sweep): p50 {s['p50_ms']} ms (CPU {s['cpu_p50_ms']} ms), "
                  f"p90 {s['p90_ms']} ms, recall@100 {s['recall_at_100']}, score error <= {s['score_error_max']}"
                  + (" (the index's default)" if s["default"] else ""), flush=True)
    layout.ANN_NPROBES, layout.ANN_KIND = default, kinds[0]
    return {"rows": n, "dim": dim, "queries": args.queries, "ann_kind": kinds[0], "write_s": round(write_s, 1),
            "ann_build_s": round(ann_s, 1), "settings": settings}


def bench_ray(args, work: Path) -> dict:
    import torch
    import ray
    from backend.index.ray_build import make_engine, ray_build_index
    scene = write_scene(work / "ray_scene.tif", args.ray_scene)
    ckpt = work / "model.pt"
    torch.manual_seed(0)
    torch.save(load_model(args.model, random_weights=True, device="cpu").model.state_dict(), ckpt)
    model = {"model": args.model, "checkpoint": str(ckpt), "device": "cpu", "precision": args.precision,
             "batch_size": 64}
    engine = make_engine(model)
    engine.warm_up()
    settings = WindowSettings((256, 512, 768), 256, 0.5)
    t = time.perf_counter()
    local = build_index(engine, work / "local", [str(scene)], settings)
    local_s = time.perf_counter() - t
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    on_ray = ray_build_index(model, str(work / "ray"), [str(scene)], settings, engine=engine)
    ray_s = time.perf_counter() - t
    ray.shutdown()
    assert on_ray["rows"] == local["rows"]
    res = {"windows": local["rows"], "scene": args.ray_scene, "local_s": round(local_s, 2),
           "ray_init_s": round(init_s, 2), "ray_build_s": round(ray_s, 2), "overhead": round(ray_s / local_s, 2)}
    print(f"ray: {local['rows']} windows: in-process {local_s:.1f} s, on Ray {ray_s:.1f} s ({res['overhead']}x; "
          f"ray.init {init_s:.1f} s more)", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("build", "query", "ray", "all"), default="build",
                   help="query is CPU-heavy (minutes at 1M rows): run it on its own")
    p.add_argument("--model", default="ViT-B-32-quickgelu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--scene", type=int, default=3072, help="side of the build benchmark's GeoTIFF")
    p.add_argument("--ray-scene", type=int, default=1536)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--ann-kinds", default="", help="query part: other ANN kinds to measure on the same rows after "
                   "the index's default (comma-separated: IVF_RQ, IVF_SQ, IVF_PQ, IVF_FLAT)")
    args = p.parse_args()
    print(f"machine: {machine()}", flush=True)
    result = {"machine": machine()}
    work = Path(tempfile.mkdtemp(prefix="bench_index_"))
    try:
        for part, fn in (("build", bench_build), ("query", bench_query), ("ray", bench_ray)):
            if args.part in (part, "all"):
                result[part] = fn(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
