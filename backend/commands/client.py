"""The scripting client: ``ping``, ``classify``, ``rank`` and ``localize`` against a running server.

These commands import no torch: they only talk to the server.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Sequence

from shared_protocol import ProtocolError
from shared_protocol.defaults import DEFAULT_SMOOTH, DEFAULT_WINDOW_SIZES
from shared_protocol.ops import SELO_MODES

from ._common import add_client_args, add_min_valid_arg, client_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ping", help="print a running server's info")
    add_client_args(p, timeout=5.0)
    p.set_defaults(func=run_ping)

    p = subparsers.add_parser("classify", help="zero-shot labels for image files")
    add_client_args(p)
    p.add_argument("--class", dest="classes", action="append", metavar="NAME", help="a class name (repeatable)")
    p.add_argument("--preset", help="add a class-list preset: aid, resisc45, eurosat, ucm, whu-rs19")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--templates", default="georsclip")
    p.add_argument("--grid", type=int, metavar="PIXELS", help="classify a grid of tiles of this size per image")
    p.add_argument("--adapter", help="a loaded adapter's name (its classes are used when no --class is given)")
    add_min_valid_arg(p, "tiles")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=run_classify)

    p = subparsers.add_parser("rank", help="rank image files against texts")
    add_client_args(p)
    p.add_argument("--text", dest="texts", action="append", required=True, metavar="TEXT")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--size", type=int, default=256, help="tiles are resized to this square size first")
    add_min_valid_arg(p, "images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=run_rank)

    p = subparsers.add_parser("localize", help="semantic localization heatmap for one image")
    add_client_args(p, timeout=600.0)
    p.add_argument("--query", required=True)
    p.add_argument("--out", help="heatmap file: .tif (GeoTIFF, georeferenced like the input) or .npy")
    p.add_argument("--polygons", metavar="FILE", help="also write regions above --threshold as GeoJSON")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--window-sizes", type=int, nargs="+", default=list(DEFAULT_WINDOW_SIZES))
    p.add_argument("--smooth", type=int, default=DEFAULT_SMOOTH, help="median kernel in pixels, odd (0: off)")
    add_min_valid_arg(p, "windows")
    p.add_argument("--selo-mode", choices=SELO_MODES, default="fast",
                   help="fast (default) or reference: the original SeLo pipeline step by step (slow; see README)")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=run_localize)


def run_ping(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            info = client.hello()
    except ProtocolError as exc:
        print(f"backend at {args.connect} did not answer: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=None if args.json else 2))
    return 0


def _read_images(paths: Sequence[str]):
    from backend.files import read_image
    return [read_image(p) for p in paths]


def _fail(exc: Exception) -> int:
    msg = exc.message if isinstance(exc, ProtocolError) else str(exc)
    code = f" ({exc.code})" if isinstance(exc, ProtocolError) else ""
    print(f"error{code}: {msg}", file=sys.stderr)
    return 1


def run_classify(args: argparse.Namespace) -> int:
    classes: List[str] = list(args.classes or [])
    try:
        with client_from_args(args) as client:
            if args.preset:
                presets = client.info()["capabilities"]["class_presets"]
                if args.preset not in presets:
                    raise ValueError(f"unknown class preset {args.preset!r}; known: {', '.join(sorted(presets))}")
                classes += presets[args.preset]
            if not classes and args.adapter:  # an adapted classifier knows its classes
                found = {a["name"]: a for a in client.info().get("adapters", [])}.get(args.adapter) or {}
                classes += found.get("classes") or []
            if not classes:
                raise ValueError("give classes with --class NAME (repeatable) or --preset NAME")
            out = []
            for img in _read_images(args.images):
                params: Dict[str, Any] = {"top_k": args.top_k, "templates": args.templates,
                                          "min_valid": args.min_valid, "adapter": args.adapter}
                if args.grid:
                    reply = client.classify(classes, canvas=img.pixels, tile_size=args.grid, **params,
                                            **img.masks("canvas"))
                else:
                    reply = client.classify(classes, img.pixels[None], **params, **img.masks("tiles"))
                for t in reply.result["tiles"]:
                    probs = reply.arrays["probs"][t["index"]]
                    entry = {"file": img.path, "skipped": t["skipped"], "top": t["top"],
                             "probs": None if t["skipped"] else {c: float(p) for c, p in zip(classes, probs)}}
                    if "boxes" in reply.arrays:
                        entry["box"] = [int(v) for v in reply.arrays["boxes"][t["index"]]]
                    out.append(entry)
                warnings = reply.result.get("warnings", [])
    except (ProtocolError, ValueError, OSError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({"tiles": out, "warnings": warnings}))
    else:
        for w in warnings:
            print(f"warning: {w}")
        for e in out:
            where = e["file"] + (f" {e['box']}" if "box" in e else "")
            print(f"{where}: " + (", ".join(f"{t['label']} {t['score']:.3f}" for t in e["top"]) if not e["skipped"]
                                  else "skipped (too few valid pixels)"))
    return 0


def run_rank(args: argparse.Namespace) -> int:
    import numpy as np
    from backend.files import square_tile
    try:
        imgs = _read_images(args.images)
        size = args.size
        tiles, masks = zip(*[square_tile(i, size) for i in imgs])
        with client_from_args(args) as client:
            reply = client.rank(np.stack(tiles), args.texts, top_k=args.top_k, min_valid=args.min_valid,
                                images_mask=np.stack(masks))
    except (ProtocolError, ValueError, OSError) as exc:
        return _fail(exc)
    result = {
        "by_text": [{"text": t, "top": [{"file": imgs[m["index"]].path, "score": m["score"]} for m in ranks]}
                    for t, ranks in zip(args.texts, reply.result["by_query"])],
        "by_file": [{"file": imgs[i].path, "top": [{"text": args.texts[m["index"]], "score": m["score"]}
                                                   for m in ranks]}
                    for i, ranks in enumerate(reply.result["by_image"])],
        "skipped": [imgs[i].path for i in reply.result["skipped"]],
        "warnings": reply.result.get("warnings", []),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for w in result["warnings"]:
            print(f"warning: {w}")
        for path in result["skipped"]:
            print(f"{path}: skipped (too few valid pixels)")
        for entry in result["by_text"]:
            print(f"{entry['text']!r}: " + ", ".join(f"{m['file']} {m['score']:.3f}" for m in entry["top"]))
    return 0


def run_localize(args: argparse.Namespace) -> int:
    import numpy as np
    from pathlib import Path

    from backend.files import GEOTIFF_SUFFIXES, atomic_write, refuse_special
    try:
        for out in (args.out, args.polygons):  # before any work: never a device, FIFO or symlink
            if out:
                refuse_special(Path(out))
        img = _read_images([args.image])[0]
        georef = img.transform is not None and args.out and args.out.lower().endswith(GEOTIFF_SUFFIXES)
        if georef and img.crs is None:
            print(f"warning: {img.path} has no CRS: the heatmap keeps its pixel grid but no CRS", file=sys.stderr)
        with client_from_args(args) as client:
            reply = client.localize(img.pixels, [args.query], window_sizes=args.window_sizes, smooth=args.smooth,
                                    selo_mode=args.selo_mode,
                                    transform=img.transform, crs=img.crs, geotiff=bool(georef),
                                    polygons=bool(args.polygons), threshold=args.threshold,
                                    min_valid=args.min_valid, **img.masks("canvas"),
                                    on_progress=None if args.json else _print_progress)
        heat = reply.arrays["heatmaps"][0]
        if args.out:
            if args.out.lower().endswith(GEOTIFF_SUFFIXES):
                if georef:
                    data = reply.arrays["geotiff_0"].tobytes()
                else:
                    from backend.tasks.geo import heatmap_geotiff
                    data = heatmap_geotiff(heat, None, None)
                atomic_write(args.out, data)
            else:
                import io
                buf = io.BytesIO()
                np.save(buf, heat)
                atomic_write(args.out, buf.getvalue())
        if args.polygons:
            atomic_write(args.polygons, json.dumps(reply.result["polygons"][0]).encode())
    except (ProtocolError, ValueError, OSError) as exc:
        return _fail(exc)
    summary = {"file": img.path, "query": args.query, "shape": list(heat.shape), "out": args.out,
               "windows": reply.result["windows"], "stats": reply.result["queries"][0],
               "crs": reply.result.get("crs"), "warnings": reply.result.get("warnings", [])}
    if args.json:
        print(json.dumps(summary))
    else:
        print(file=sys.stderr)  # end the progress line
        for w in summary["warnings"]:
            print(f"warning: {w}")
        print(f"{img.path}: heatmap {heat.shape[1]} x {heat.shape[0]} from {summary['windows']} windows"
              + (f" -> {args.out}" if args.out else ""))
    return 0


def _print_progress(fraction: float, message: str) -> None:
    print(f"\r{fraction * 100:5.1f}% {message[:60]:60}", end="", file=sys.stderr, flush=True)
