"""``python -m backend adapt`` (examples from a raster and a labelled layer -> an adapter on a running server)
and ``python -m backend unsure`` (the tiles an adapter is least sure about, as a layer to label next).

Both are clients: they read files here and send pixels, never paths (the server may be remote). No torch.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any, Dict, List

import numpy as np

from shared_protocol.defaults import ADAPT_TEMPLATES, DEFAULT_TILE_SIZE, MIN_VALID_SHARE
from shared_protocol.ops import ADAPT_METHODS


def add_parser(subparsers) -> None:
    from ._common import add_client_args
    p = subparsers.add_parser(
        "adapt", help="adapt the served model to labelled places of a raster (instant or trained methods)",
        description="Cut chips from RASTER around the points and over the polygons of LABELS (any CRS), split them "
                    "by polygon, send them to the server, which adapts its model and registers the adapter under "
                    "NAME; prints the held-out accuracy (zero-shot and adapted, per class, confusion matrix).")
    add_client_args(p, timeout=3600.0)
    p.add_argument("--raster", required=True, help="a raster GDAL reads (GeoTIFF ...)")
    p.add_argument("--labels", required=True, help="points or polygons OGR reads (GeoPackage, GeoJSON, Shapefile)")
    p.add_argument("--layer", help="layer of a multi-layer file (default: the first)")
    p.add_argument("--class-field", required=True, help="the attribute holding each feature's class")
    p.add_argument("--labels-crs", help="CRS of a labels file that has none (EPSG:4326 ...)")
    p.add_argument("--method", choices=ADAPT_METHODS, help="instant-cache, linear-probe (seconds, no gradient) "
                   "or coop, lora, gdpl, mrs-adapter (trained)")
    p.add_argument("--name", help="the adapter's name on the server (A-Z a-z 0-9 _ . -)")
    p.add_argument("--resolution", type=float, help="ground size of a chip pixel in the raster's CRS units "
                   "(default: the raster's own)")
    p.add_argument("--chip-size", type=int, default=224, help="chip size in pixels (default 224)")
    p.add_argument("--min-valid", type=float, default=MIN_VALID_SHARE,
                   help=f"least valid share of a chip (default {MIN_VALID_SHARE})")
    p.add_argument("--max-chips-per-example", type=int, default=32, help="cap on the chips of one polygon")
    p.add_argument("--val-fraction", type=float, default=0.3, help="share of each class's polygons held out")
    p.add_argument("--skip-outside", action="store_true", help="leave out features outside the raster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="trained methods: epochs (default 10)")
    p.add_argument("--lr", type=float, help="trained methods: learning rate")
    p.add_argument("--batch-size", type=int, help="trained methods: batch size (default 16)")
    p.add_argument("--templates", default=ADAPT_TEMPLATES,
                   help=f"zero-shot template set (default {ADAPT_TEMPLATES}: one prompt per class; georsclip: 105)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name")
    p.add_argument("--resume", action="store_true", help="continue a cancelled or killed trained job")
    p.add_argument("--out", metavar="A.pt", help="also write the adapter file here")
    p.add_argument("--export-dataset", metavar="DIR", help="write the chips as an ImageFolder (DIR/train, DIR/val) "
                   "that 'python -m backend train' reads; without --method nothing is sent")
    p.set_defaults(func=run_adapt)

    p = subparsers.add_parser(
        "unsure", help="the tiles of a raster an adapter is least sure about (label next)",
        description="Classify RASTER on a grid with an adapter and write the COUNT tiles with the smallest margin "
                    "between the two best classes as polygons (GeoPackage or GeoJSON) to label next.")
    add_client_args(p, timeout=600.0)
    p.add_argument("--adapter", required=True, help="a loaded adapter (its classes are used)")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="classes (default: the adapter's)")
    p.add_argument("--grid", type=int, default=DEFAULT_TILE_SIZE, help="tile size in (resampled) pixels")
    p.add_argument("--resolution", type=float, help="ground size of a pixel (default: the raster's own)")
    p.add_argument("--count", type=int, default=20, help="how many tiles to return")
    p.add_argument("--min-valid", type=float, default=MIN_VALID_SHARE)
    p.add_argument("--out", required=True, help="output .gpkg or .geojson")
    p.add_argument("raster", metavar="RASTER")
    p.set_defaults(func=run_unsure)


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _print_progress(fraction: float, message: str) -> None:
    print(f"\r{fraction * 100:5.1f}% {message[:90]:90}", end="", file=sys.stderr, flush=True)


def counts_lines(examples) -> List[str]:
    lines = [f"{'class':20} {'examples':>8} {'train':>6} {'held-out':>8}"]
    for c, row in examples.counts().items():
        lines.append(f"{c:20} {row['examples']:>8} {row['train']:>6} {row['held_out']:>8}")
    return lines


def run_adapt(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    from backend.adapt.examples import ExampleError, build_examples, export_image_folder
    from backend.adapt.metrics import format_report
    from ._common import client_from_args
    from backend.files import atomic_write
    if not args.method and not args.export_dataset:
        return _fail("give --method and --name to adapt, or --export-dataset DIR to export the examples", 2)
    if args.method and not args.name:
        return _fail("--name is required with --method", 2)
    try:
        ex = build_examples(args.raster, args.labels, args.class_field, layer=args.layer,
                            labels_crs=args.labels_crs, resolution=args.resolution, chip_size=args.chip_size,
                            min_valid=args.min_valid, max_per_example=args.max_chips_per_example,
                            val_fraction=args.val_fraction, seed=args.seed, skip_outside=args.skip_outside)
    except (ExampleError, OSError) as exc:
        return _fail(str(exc), 2)
    out: Dict[str, Any] = {"classes": ex.classes, "counts": ex.counts(), "warnings": list(ex.warnings),
                           "chips": int(len(ex.chips))}
    if not args.json:
        for w in ex.warnings:
            print(f"warning: {w}")
        print(f"{len(ex.chips)} chips of {ex.chips.shape[1]} px from {len(ex.fids)} examples")
        print("\n".join(counts_lines(ex)), flush=True)
    if args.export_dataset:
        try:
            out["dataset"] = str(export_image_folder(ex, args.export_dataset))
        except (ExampleError, OSError) as exc:
            return _fail(str(exc), 2)
        if not args.json:
            print(f"dataset: {out['dataset']} (python -m backend train --data {out['dataset']}/train "
                  f"--val-data {out['dataset']}/val --shots 0 ...)")
    if args.method:
        params = {"name": args.name, "method": args.method, "classes": ex.classes, "overwrite": args.overwrite,
                  "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                  "resume": args.resume, "templates": args.templates, "return_file": bool(args.out),
                  "provenance": ex.provenance, "value_range": ex.value_range}
        arrays = {"chips": ex.chips, "labels": ex.labels, "groups": ex.groups,
                  "held_out": ex.held_out.astype(np.uint8)}
        cancel = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # Ctrl-C cancels the job on the server
        try:
            with client_from_args(args) as client:
                client.hello()
                reply = client.request("train", params, arrays, cancel=cancel,
                                       on_progress=None if args.json else _print_progress)
        except ProtocolError as exc:
            if not args.json:
                print(file=sys.stderr)
            return _fail(f"{exc.message} ({exc.code})")
        finally:
            signal.signal(signal.SIGINT, previous)
        result = reply.result
        out.update({k: result[k] for k in ("name", "method", "metrics", "path", "seconds", "examples_sha256",
                                           "tuning")})
        out["warnings"] += result.get("warnings", [])
        if args.out:
            try:
                atomic_write(args.out, reply.arrays["adapter_file"].tobytes())
            except OSError as exc:
                return _fail(f"cannot write {args.out}: {exc}")
            out["out"] = args.out
        if not args.json:
            print(file=sys.stderr)
            m = result["metrics"]
            print("\n".join(format_report(ex.classes, m["zero_shot"], m["adapted"])))
            print(f"adapter {result['name']!r} ({result['method']}) registered in {result['seconds']:.1f} s"
                  + (f", saved as {result['path']}" if result.get("path") else "")
                  + (f", written to {args.out}" if args.out else ""))
            print(f"use it: python -m backend classify --connect {args.connect} --adapter {result['name']} IMAGE")
    if args.json:
        print(json.dumps(out, default=float))
    return 0


# -- unsure ---------------------------------------------------------------------------------------------------
def read_raster(path: str, resolution: float | None):
    """(pixels H x W x C, valid mask H x W, affine list, CRS string) at ``resolution`` (default native)."""
    import rasterio
    from rasterio.enums import Resampling
    from backend.files import raster_valid
    with rasterio.open(path) as ds:
        t = ds.transform
        pixel = float(np.sqrt(abs(t.a * t.e - t.b * t.d)))
        factor = (resolution / pixel) if resolution else 1.0
        h, w = max(1, int(round(ds.height / factor))), max(1, int(round(ds.width / factor)))
        bands = [1, 2, 3] if ds.count >= 3 else [1]
        data = ds.read(bands, out_shape=(len(bands), h, w), resampling=Resampling.bilinear)
        mask = raster_valid(ds, bands, data, out_shape=(h, w)).astype(np.uint8)
        scaled = t * t.scale(ds.width / w, ds.height / h)
        crs = ds.crs.to_string() if ds.crs else None
    if data.dtype not in (np.uint8, np.uint16):
        lo, hi = np.percentile(data, (2, 98))
        data = (np.clip((data - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(data.transpose(1, 2, 0)), mask, list(scaled)[:6], crs


def write_polygons(path: str, rings: List[List[List[float]]], props: List[Dict[str, Any]], crs) -> None:
    """Polygons with attributes through OGR (GeoPackage or GeoJSON), written beside and renamed: complete or
    absent."""
    import os
    import secrets
    import pyogrio
    import shapely
    from pathlib import Path
    target = Path(path)
    driver = "GPKG" if target.suffix.lower() == ".gpkg" else "GeoJSON"
    tmp = target.with_name(f".{target.stem}.{secrets.token_hex(4)}.part{target.suffix}")
    geoms = shapely.to_wkb(np.array([shapely.Polygon(r) for r in rings], dtype=object))
    fields = list(props[0]) if props else ["rank"]
    data = [np.array([p[f] for p in props], dtype=object if isinstance(props[0][f], str) else None)
            for f in fields] if props else [np.zeros(0, np.int32)]
    try:
        pyogrio.raw.write(str(tmp), geoms, data, fields, driver=driver, geometry_type="Polygon", crs=crs,
                          layer="unsure")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_unsure(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    from ._common import client_from_args
    try:
        pixels, mask, transform, crs = read_raster(args.raster, args.resolution)
        with client_from_args(args) as client:
            classes = args.classes
            if not classes:
                known = {a["name"]: a for a in client.info().get("adapters", [])}
                if args.adapter not in known:
                    raise ValueError(f"no adapter named {args.adapter!r} on the server; it has {sorted(known)}")
                classes = known[args.adapter].get("classes")
                if not classes:
                    raise ValueError(f"adapter {args.adapter!r} does not list its classes: pass --class NAME ...")
            reply = client.classify(classes, canvas=pixels, tile_size=args.grid, top_k=2, adapter=args.adapter)
    except (ProtocolError, ValueError, OSError) as exc:
        return _fail(getattr(exc, "message", str(exc)))
    boxes = reply.arrays["boxes"]
    tiles = reply.result["tiles"]
    valid = np.array([(mask[y0:y1, x0:x1] > 0).mean() if y1 > y0 and x1 > x0 else 0.0 for x0, y0, x1, y1 in boxes])
    margins = np.array([t.get("margin", np.nan) if not t.get("skipped") else np.nan for t in tiles], float)
    order = [i for i in np.argsort(margins, kind="stable") if valid[i] >= args.min_valid and np.isfinite(margins[i])]
    picked = order[:args.count]
    a, b, c, d, e, f = transform
    rings, props = [], []
    for rank, i in enumerate(picked):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        ring = [[a * x + b * y + c, d * x + e * y + f] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
        top = tiles[i]["top"]
        rings.append(ring)
        props.append({"rank": rank + 1, "label": top[0]["label"], "second": top[1]["label"] if len(top) > 1 else "",
                      "margin": float(margins[i]), "tile": int(i)})
    try:
        write_polygons(args.out, rings, props, crs)
    except Exception as exc:  # OGR's errors
        return _fail(f"cannot write {args.out}: {exc}")
    summary = {"out": args.out, "tiles": len(tiles), "written": len(picked), "adapter": args.adapter,
               "least_sure": props}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{len(picked)} least sure of {len(tiles)} tiles -> {args.out}")
        for p in props[:10]:
            print(f"  #{p['rank']}: {p['label']} vs {p['second']} (margin {p['margin']:.3f})")
    return 0
