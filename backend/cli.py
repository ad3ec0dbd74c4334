"""``python -m backend``: serve, ping, presets and the scripting client (classify, rank, localize, demo).

Every module in ``backend/commands/`` that defines ``add_parser(subparsers)`` adds its own subcommand
(train, eval, params). The client commands import no torch: they only talk to a running server.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence

from shared_protocol import ProtocolError
from shared_protocol.client import DEFAULT_ADDRESS, Client
from shared_protocol.ops import DEFAULT_MAX_CANVAS_PIXELS

TOKEN_ENV = "MAPQUERY_TOKEN"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-choosing flags shared by serve, train, eval and params."""
    from .models.presets import DEFAULT_PRESET
    p.add_argument("--model", default=DEFAULT_PRESET,
                   help=f"preset (python -m backend presets) or open_clip architecture (default {DEFAULT_PRESET})")
    p.add_argument("--model-config", metavar="FILE", help="an open_clip model-config JSON for a custom architecture")
    p.add_argument("--checkpoint", metavar="FILE", help="weights: a state_dict (plain, under 'state_dict', "
                   "or with 'module.' prefixes), loaded with weights_only=True")
    p.add_argument("--pretrained", metavar="TAG", help="an open_clip pretrained tag (e.g. openai)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--random-weights", action="store_true",
                   help="run with random weights (tests, offline demos): every answer says so")
    p.add_argument("--offline", action="store_true", help="do not try to download weights")


def load_model_from_args(args: argparse.Namespace):
    from .models.loading import load_model
    return load_model(args.model, model_config=args.model_config, checkpoint=args.checkpoint,
                      pretrained=args.pretrained, device=args.device, random_weights=args.random_weights,
                      offline=args.offline or None)


def add_client_args(p: argparse.ArgumentParser, timeout: float = 120.0) -> None:
    p.add_argument("--connect", default=DEFAULT_ADDRESS, help=f"backend address (default {DEFAULT_ADDRESS})")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"access token (default ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=timeout, help="seconds to wait for each reply")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def client_from_args(args: argparse.Namespace) -> Client:
    return Client(args.connect, token=args.token, timeout=args.timeout, retries=1, name="backend-cli")


# -- serve --------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .engine import Engine, EngineConfig
    from .server import Server, ServerConfig
    from .service import ModelService
    from shared_protocol import Limits

    token = args.token
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    limits = Limits(max_array_bytes=args.max_array_mb << 20, max_total_bytes=(args.max_array_mb << 20) * 2)
    try:
        # check the address before the (slow) model load
        from .server import is_loopback
        if not is_loopback(args.bind) and not token:
            raise ValueError(f"refusing to bind {args.bind} without an access token: pass --token or set "
                             f"{TOKEN_ENV}, or bind tcp://127.0.0.1")
        loaded = load_model_from_args(args)
        from .adapt.store import serve_store
        store, adapters, adapter_info = serve_store(args.adapter_dir, loaded)
        named, named_info = load_adapters(args.adapter, loaded)
        adapters.update(named)
        adapter_info.update(named_info)
        engine = Engine(loaded, EngineConfig(batch_size=args.batch_size, precision=args.precision,
                                             cache_bytes=args.cache_mb << 20), adapters)
        if not adapters and store is None and engine.base_model is not loaded.model:
            loaded.model = engine.base_model  # nothing else needs the fp32 weights: free them
        server = Server(ModelService(engine, limits, max_canvas_pixels=args.max_canvas_pixels,
                                     adapter_info=adapter_info, adapter_store=store),
                        ServerConfig(bind=args.bind, token=token, limits=limits, max_queue=args.max_queue))
    except ProtocolError as exc:  # 'cannot start (REASON): ...' is what launchers (the plugin) read
        reason = exc.details.get("reason") or exc.code
        print(f"backend: cannot start ({reason}): {exc.message}", file=sys.stderr, flush=True)
        return 2
    except (ValueError, OSError) as exc:
        print(f"backend: cannot start (bad_config): {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # zmq errors (address in use ...) and the like
        print(f"backend: cannot start (error): {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    desc = loaded.describe()
    print(f"backend: model {desc['name']} ({desc['arch']}) on {desc['device']} in {engine.precision.name}; "
          f"weights: {desc['weights']}", flush=True)
    for name, meta in sorted(adapter_info.items()):
        print(f"backend: adapter {name}: {meta.get('method')} ({meta.get('trainable_parameters')} parameters)",
              flush=True)
    try:  # before 'ready', so that the first request does not pay for lazy initialisation
        print(f"backend: warmed up in {engine.warm_up():.2f} s", flush=True)
    except Exception as exc:  # requests will say what is wrong, one by one; the server still starts
        print(f"backend: WARNING: warm-up failed: {type(exc).__name__}: {exc}", flush=True)
    if loaded.random_weights:
        print("backend: WARNING: random weights, answers are meaningless", flush=True)
    print(f"backend: ready on {server.endpoint}", flush=True)
    server.serve_forever()
    return 0


def load_adapters(specs: Sequence[str], loaded) -> tuple:
    """``NAME=FILE`` pairs -> ({name: adapted model}, {name: description})."""
    models: Dict[str, Any] = {}
    info: Dict[str, Dict[str, Any]] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter wants NAME=FILE, got {spec!r}")
        from .adapters import describe_adapter, load_adapter
        models[name] = load_adapter(path, loaded)
        info[name] = describe_adapter(path)
    return models, info


# -- ping / presets -----------------------------------------------------------------------------------
def cmd_ping(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            info = client.hello()
    except ProtocolError as exc:
        print(f"backend at {args.connect} did not answer: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=None if args.json else 2))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .models.presets import DEFAULT_PRESET, PRESETS
    if args.json:
        print(json.dumps({"default": DEFAULT_PRESET, "presets": [p.to_dict() for p in PRESETS.values()]}))
        return 0
    print(f"{'preset':26} {'architecture':24} {'weights':52} description")
    for p in PRESETS.values():
        where = (f"hf-hub:{p.hf_repo}/{p.hf_filename}" if p.hf_repo else
                 f"open_clip '{p.pretrained_tag}'" if p.pretrained_tag else
                 "random only" if p.random_only else "--checkpoint FILE")
        mark = " (default)" if p.name == DEFAULT_PRESET else ""
        print(f"{p.name:26} {p.arch:24} {where:52} {p.description}{mark}")
    return 0


# -- scripting client ---------------------------------------------------------------------------------
def _read_images(paths: Sequence[str]):
    from .files import read_image
    return [read_image(p) for p in paths]


def _fail(exc: Exception) -> int:
    msg = exc.message if isinstance(exc, ProtocolError) else str(exc)
    code = f" ({exc.code})" if isinstance(exc, ProtocolError) else ""
    print(f"error{code}: {msg}", file=sys.stderr)
    return 1


def cmd_classify(args: argparse.Namespace) -> int:
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
                params: Dict[str, Any] = {"top_k": args.top_k, "templates": args.templates, "adapter": args.adapter}
                if args.grid:
                    reply = client.classify(classes, canvas=img.pixels, tile_size=args.grid, **params)
                else:
                    reply = client.classify(classes, img.pixels[None], **params)
                for t in reply.result["tiles"]:
                    probs = reply.arrays["probs"][t["index"]]
                    entry = {"file": img.path, "probs": {c: float(p) for c, p in zip(classes, probs)},
                             "top": t["top"]}
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
            print(f"{where}: " + ", ".join(f"{t['label']} {t['score']:.3f}" for t in e["top"]))
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    import numpy as np
    try:
        imgs = _read_images(args.images)
        size = args.size
        tiles = np.stack([_resize_tile(i.pixels, size) for i in imgs])
        with client_from_args(args) as client:
            reply = client.rank(tiles, args.texts, top_k=args.top_k)
    except (ProtocolError, ValueError, OSError) as exc:
        return _fail(exc)
    result = {
        "by_text": [{"text": t, "top": [{"file": imgs[m["index"]].path, "score": m["score"]} for m in ranks]}
                    for t, ranks in zip(args.texts, reply.result["by_query"])],
        "by_file": [{"file": imgs[i].path, "top": [{"text": args.texts[m["index"]], "score": m["score"]}
                                                   for m in ranks]}
                    for i, ranks in enumerate(reply.result["by_image"])],
        "warnings": reply.result.get("warnings", []),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for w in result["warnings"]:
            print(f"warning: {w}")
        for entry in result["by_text"]:
            print(f"{entry['text']!r}: " + ", ".join(f"{m['file']} {m['score']:.3f}" for m in entry["top"]))
    return 0


def _resize_tile(pixels, size: int):
    """Tiles of one rank request must share a shape: resize (PIL, bicubic) to size x size RGB."""
    import numpy as np
    from PIL import Image as PILImage
    if pixels.dtype != np.uint8:
        lo, hi = np.percentile(pixels, (2, 98))
        pixels = (np.clip((pixels - lo) / max(hi - lo, 1), 0, 1) * 255).astype(np.uint8)
    rgb = pixels[:, :, :3] if pixels.shape[2] >= 3 else np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.asarray(PILImage.fromarray(rgb).resize((size, size), PILImage.BICUBIC))


def cmd_localize(args: argparse.Namespace) -> int:
    import numpy as np
    from .files import GEOTIFF_SUFFIXES, atomic_write
    try:
        img = _read_images([args.image])[0]
        georef = img.transform is not None and args.out and args.out.lower().endswith(GEOTIFF_SUFFIXES)
        if georef and img.crs is None:
            print(f"warning: {img.path} has no CRS: the heatmap keeps its pixel grid but no CRS", file=sys.stderr)
        with client_from_args(args) as client:
            reply = client.localize(img.pixels, [args.query], window_sizes=args.window_sizes, smooth=args.smooth,
                                    transform=img.transform, crs=img.crs, geotiff=bool(georef),
                                    polygons=bool(args.polygons), threshold=args.threshold,
                                    on_progress=None if args.json else _print_progress)
        heat = reply.arrays["heatmaps"][0]
        if args.out:
            if args.out.lower().endswith(GEOTIFF_SUFFIXES):
                if georef:
                    data = reply.arrays["geotiff_0"].tobytes()
                else:
                    from .tasks.geo import heatmap_geotiff
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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args)


# -- parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("MAPQUERY_LOG", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve a model over ZeroMQ")
    add_model_args(p)
    p.add_argument("--bind", default=DEFAULT_ADDRESS, help="tcp://HOST:PORT or ipc://PATH (default loopback)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"access token (default ${TOKEN_ENV}); "
                   "required for a non-loopback bind")
    p.add_argument("--token-file", help="read the access token from this file")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE",
                   help="serve a saved adapter under NAME (repeatable)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="where 'train' saves adapters, loaded again at start-up (default $MAPQUERY_ADAPTERS or "
                        "~/.cache/mapquery-rs/adapters; 'none': adapters trained here live until the server stops)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: bf16 autocast on CUDA (fp16 where bf16 is missing); on a CPU, bf16 weights where "
                   "the CPU has native bf16 (AVX512-BF16, AMX, Arm BF16: ~2.5x faster), else fp32. fp32 is "
                   "exact; fp16 needs CUDA; adapters run in fp32 on a CPU")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (0: 256 on CUDA, 64 on CPU)")
    p.add_argument("--cache-mb", type=int, default=2048, help="embedding cache budget in MiB")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before 'busy'")
    p.add_argument("--max-array-mb", type=int, default=1024, help="largest array accepted, in MiB")
    p.add_argument("--max-canvas-pixels", type=int, default=DEFAULT_MAX_CANVAS_PIXELS,
                   help="largest canvas (height x width) accepted")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ping", help="print a running server's info")
    add_client_args(p, timeout=5.0)
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("presets", help="list the model presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("classify", help="zero-shot labels for image files")
    add_client_args(p)
    p.add_argument("--class", dest="classes", action="append", metavar="NAME", help="a class name (repeatable)")
    p.add_argument("--preset", help="add a class-list preset: aid, resisc45, eurosat, ucm, whu-rs19")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--templates", default="georsclip")
    p.add_argument("--grid", type=int, metavar="PIXELS", help="classify a grid of tiles of this size per image")
    p.add_argument("--adapter", help="a loaded adapter's name (its classes are used when no --class is given)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("rank", help="rank image files against texts")
    add_client_args(p)
    p.add_argument("--text", dest="texts", action="append", required=True, metavar="TEXT")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--size", type=int, default=256, help="tiles are resized to this square size first")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("localize", help="semantic localization heatmap for one image")
    add_client_args(p, timeout=600.0)
    p.add_argument("--query", required=True)
    p.add_argument("--out", help="heatmap file: .tif (GeoTIFF, georeferenced like the input) or .npy")
    p.add_argument("--polygons", metavar="FILE", help="also write regions above --threshold as GeoJSON")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--window-sizes", type=int, nargs="+", default=[256, 512, 768])
    p.add_argument("--smooth", type=int, default=251, help="median kernel in pixels, odd (0: off)")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_localize)

    p = sub.add_parser("demo", help="start a backend and run a scripted session against it")
    p.add_argument("--model", default=None, help="preset to try first (default: the default preset)")
    p.add_argument("--image", help="raster to use (default: ../shared/data/RGB.byte.tif or a synthetic one)")
    p.add_argument("--out", default="out", help="output folder")
    p.set_defaults(func=cmd_demo)

    from . import commands
    for mod in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{mod.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)
