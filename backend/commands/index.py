"""``python -m backend index build|add|info|search|export``: a reusable index of whole rasters.

Against a running backend (``--connect ADDR``) or in-process (``--model ... --random-weights`` and the
other model flags of ``serve``). Both run the same operations (``index_build``, ``index_search``,
``index_info``); ``export`` reads the index folder directly. ``--engine ray`` builds on Ray Data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, Optional

from backend.models.precision_names import PRECISIONS

from ._common import add_model_flags, fail


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("index", help="index whole rasters once, then search them in milliseconds")
    sub = p.add_subparsers(dest="index_command", required=True)

    b = sub.add_parser("build", help="create an index (or resume one) from rasters")
    b.add_argument("--out", required=True, metavar="DIR", help="the index folder")
    b.add_argument("--window-sizes", type=int, nargs="+", metavar="PX", help="window sizes (default 256 512 768)")
    b.add_argument("--crop-size", type=int, help="each window is resized to this first (default 256)")
    b.add_argument("--min-valid", type=float, help="least share of valid pixels a window needs (default 0.5)")
    b.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data (pip install '.[scale]'), in-process only")
    b.add_argument("--ray-address", help="a Ray cluster to join (default: a local Ray)")
    b.add_argument("rasters", nargs="+", metavar="RASTER")
    _backend_flags(b)
    b.set_defaults(func=cmd_build, create=True)

    a = sub.add_parser("add", help="add rasters to an existing index (a changed file replaces its rows)")
    a.add_argument("index", metavar="DIR")
    a.add_argument("rasters", nargs="+", metavar="RASTER")
    a.add_argument("--engine", choices=("local", "ray"), default="local")
    a.add_argument("--ray-address")
    _backend_flags(a)
    a.set_defaults(func=cmd_build, create=False, window_sizes=None, crop_size=None, min_valid=None)

    i = sub.add_parser("info", help="what an index holds (or, with --connect and no DIR, the server's indexes)")
    i.add_argument("index", nargs="?", metavar="DIR")
    _backend_flags(i, model=False)
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("search", help="the best windows for a text, an image chip or example polygons")
    s.add_argument("index", metavar="DIR")
    s.add_argument("--text", dest="texts", action="append", default=[], metavar="TEXT")
    s.add_argument("--image", dest="images", action="append", default=[], metavar="CHIP",
                   help="an image file as a positive (PNG, JPEG, GeoTIFF)")
    s.add_argument("--examples", metavar="FILE", help="positive polygons (GeoPackage, GeoJSON, Shapefile ...)")
    s.add_argument("--negatives", metavar="FILE", help="negative polygons")
    s.add_argument("--negative-text", dest="negative_texts", action="append", default=[], metavar="TEXT")
    s.add_argument("--layer", help="the layer of --examples/--negatives (default: the first)")
    s.add_argument("--keep-examples", action="store_true", help="keep the examples' own windows in the results")
    s.add_argument("--top-k", type=int, default=10)
    s.add_argument("--extent", type=float, nargs=4, metavar=("XMIN", "YMIN", "XMAX", "YMAX"))
    s.add_argument("--extent-crs", default="EPSG:4326")
    s.add_argument("--surface", metavar="DIR", help="write each raster's score surface (GeoTIFF) into DIR")
    s.add_argument("--surface-max-size", type=int, default=4096, help="long side of a surface in pixels")
    s.add_argument("--gpkg", metavar="FILE", help="write the ranked footprints as a GeoPackage")
    _backend_flags(s)
    s.set_defaults(func=cmd_search)

    e = sub.add_parser("export", help="write an index's windows as GeoParquet")
    e.add_argument("index", metavar="DIR")
    e.add_argument("--out", required=True, metavar="FILE.parquet")
    e.add_argument("--embeddings", action="store_true", help="include the embedding column")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)
    return p


def _backend_flags(p: argparse.ArgumentParser, model: bool = True) -> None:
    from shared_protocol.endpoints import TOKEN_ENV
    p.add_argument("--connect", metavar="ADDR", help="a running backend (default: run in this process)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"access token (default ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for a reply")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    if model:
        p.add_argument("--adapter", metavar="NAME[=FILE]",
                       help="the adapter to embed with: NAME on a backend, NAME=FILE in this process")
        p.add_argument("--precision", default="auto", choices=PRECISIONS)
        p.add_argument("--batch-size", type=int, default=0)
        add_model_flags(p)


# -- running an operation here or on a backend ----------------------------------------------------------
class _LocalJob:
    """What the index operations need of a server job, in this process (the local user's own paths)."""
    local = True

    def __init__(self, request: Any, progress: Callable[[float, str], None]):
        self.request = request
        self._progress = progress

    def progress(self, fraction: float, message: str = "") -> None:
        self._progress(fraction, message)

    def check_cancelled(self) -> None:
        pass


def _local_ops(args: argparse.Namespace, with_model: bool = True):
    from ._common import load_base
    from .serve import load_adapters
    from backend.engine import Engine, EngineConfig
    from backend.index.service import IndexOps
    loaded = load_base(args)
    specs = [args.adapter] if getattr(args, "adapter", None) and "=" in args.adapter else []
    adapters, _ = load_adapters(specs, loaded)
    engine = Engine(loaded, EngineConfig(batch_size=args.batch_size, precision=args.precision, cache_bytes=256 << 20),
                    adapters)
    return IndexOps(engine)


def _call(args: argparse.Namespace, op: str, params: Dict[str, Any], arrays: Optional[Dict[str, Any]] = None,
          ops: Any = None):
    """Run ``op`` on the backend (``--connect``) or in this process, with a progress bar unless ``--json``."""
    from shared_protocol import Request
    from shared_protocol.messages import new_request_id
    from shared_protocol.ops import OPS
    from shared_protocol.schema import validate_params
    bar = _Bar(not args.json and op == "index_build")
    try:
        if args.connect:
            from shared_protocol.client import Client
            with Client(args.connect, token=args.token, timeout=args.timeout, retries=0, name="backend-index") as c:
                return c.request(op, params, arrays or {}, on_progress=bar.update)
        request = Request(op=op, id=new_request_id(), params=validate_params(OPS[op].params, params, op),
                          arrays=dict(arrays or {}))
        return (ops or _local_ops(args)).handlers()[op](_LocalJob(request, bar.update))
    finally:
        bar.close()


class _Bar:
    """A tqdm progress bar fed with (fraction, message)."""

    def __init__(self, show: bool):
        self.bar = None
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=1000, unit="‰", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(self, fraction: float, message: str = "") -> None:
        if self.bar is not None:
            self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
            self.bar.set_postfix_str(message[:60], refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ref(value: str) -> str:
    """An index named on the command line: an existing folder as an absolute path, else as given (a name the
    backend gave an index it has open)."""
    return os.path.abspath(value) if os.path.exists(value) else value


def _adapter_name(args: argparse.Namespace) -> Optional[str]:
    return args.adapter.partition("=")[0] if getattr(args, "adapter", None) else None


# -- subcommands ----------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    index = args.out if args.create else args.index
    params = {"index": os.path.abspath(index), "rasters": [os.path.abspath(r) for r in args.rasters],
              "window_sizes": args.window_sizes, "crop_size": args.crop_size, "min_valid": args.min_valid,
              "create": args.create, "adapter": _adapter_name(args)}
    try:
        if args.engine == "ray":
            if args.connect:
                raise ValueError("--engine ray runs in this process: leave out --connect")
            result = _ray_build(args, params)
        else:
            result = _call(args, "index_build", params).result
    except (ProtocolError, ValueError, OSError) as exc:
        return _failed(exc)
    if args.json:
        print(json.dumps(result))
    else:
        for w in result.get("warnings", []):
            print(f"warning: {w}")
        for r in result["rasters"]:
            print(f"{r['raster']}: {r['status']}, {r['windows']} windows ({r['added']} added, "
                  f"{r['skipped_nodata']} left out as nodata)")
        print(f"{result['index']}: {result['rows']} windows" + (" (IVF index)" if result.get("ann") else "")
              + f" in {result['elapsed_s']:.1f} s")
    return 0


def _ray_build(args: argparse.Namespace, params: Dict[str, Any]) -> Dict[str, Any]:
    from backend.index.layout import WindowSettings
    from backend.index.ray_build import ray_build_index
    settings = None
    if params["window_sizes"] or params["crop_size"] or params["min_valid"] is not None:
        d = WindowSettings()
        settings = WindowSettings(tuple(params["window_sizes"] or d.sizes), params["crop_size"] or d.crop_size,
                                  d.min_valid if params["min_valid"] is None else params["min_valid"])
    model_args = {"model": args.model, "model_config": args.model_config, "checkpoint": args.checkpoint,
                  "pretrained": args.pretrained, "device": args.device, "random_weights": args.random_weights,
                  "offline": args.offline or None, "precision": args.precision, "batch_size": args.batch_size,
                  "adapter": args.adapter}
    bar = _Bar(not args.json)
    try:
        return ray_build_index(model_args, params["index"], params["rasters"], settings, create=params["create"],
                               progress=bar.update, address=args.ray_address)
    finally:
        bar.close()


def cmd_info(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    try:
        if args.connect:
            result = _call(args, "index_info", {"index": _ref(args.index) if args.index else None}).result
        elif not args.index:
            raise ValueError("name an index folder (or --connect ADDR to list a backend's indexes)")
        else:
            from backend.index.layout import IndexStore
            from backend.index.service import describe
            result = describe(IndexStore.open(args.index))
    except (ProtocolError, ValueError, OSError) as exc:
        return _failed(exc)
    if args.json:
        print(json.dumps(result))
    elif "indexes" in result:
        for i in result["indexes"]:
            print(f"{i['name']}: {i['path']} ({i['rows']} windows)")
    else:
        m = result["model"]
        print(f"{result['path']}: format {result['format_version']}, {result['rows']} windows"
              + (" (IVF index)" if result["ann"] else ""))
        print(f"  model {m['name']} ({m['arch']}, {m['embed_dim']}-d), adapter {m.get('adapter')}, "
              f"weights {m['weights']}")
        print(f"  windows {result['windows']}")
        for r in result["rasters"]:
            print(f"  {r['raster']}: {r['windows']} windows ({r['skipped']} nodata), {r['crs']}, {r['date']}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    try:
        params: Dict[str, Any] = {"index": _ref(args.index), "texts": args.texts or None,
                                  "negative_texts": args.negative_texts or None, "top_k": args.top_k,
                                  "exclude_examples": not args.keep_examples,
                                  "surface": bool(args.surface), "surface_max_size": args.surface_max_size}
        if args.extent:
            params.update(extent=list(args.extent), extent_crs=args.extent_crs)
        crs = None
        if args.examples or args.negatives:
            from backend.index.export import read_features
            from rasterio.crs import CRS
            if args.examples:
                params["examples"], crs = read_features(args.examples, args.layer)
            if args.negatives:
                params["negatives"], ncrs = read_features(args.negatives, args.layer)
                if crs is not None and CRS.from_user_input(ncrs) != CRS.from_user_input(crs):
                    raise ValueError("--examples and --negatives are in different CRSs: reproject one")
                crs = crs or ncrs
            params["examples_crs"] = CRS.from_user_input(crs).to_wkt()
        arrays = {"images": _chips(args.images)} if args.images else None
        if not (args.texts or args.images or args.examples):
            raise ValueError("give --text, --image or --examples (negatives alone are not a query)")
        reply = _call(args, "index_search", params, arrays)
        result = reply.result
        if args.surface:
            from backend.files import atomic_write
            for s in result.get("surfaces", []):
                name = os.path.splitext(os.path.basename(s["raster"]))[0] + ".score.tif"
                s["file"] = str(atomic_write(os.path.join(args.surface, name), reply.arrays[s["array"]].tobytes()))
        if args.gpkg:
            from backend.index.export import write_hits_gpkg
            write_hits_gpkg(result["rows"], args.gpkg)
    except (ProtocolError, ValueError, OSError) as exc:
        return _failed(exc)
    if args.json:
        print(json.dumps(result))
        return 0
    for w in result.get("warnings", []):
        print(f"warning: {w}")
    for rank, r in enumerate(result["rows"], 1):
        print(f"{rank:3d}. {r['score']:.4f}  {r['raster']} window {r['window']}  {r['footprint']['wkt'][:60]}...")
    for s in result.get("surfaces", []):
        print(f"score surface: {s['file']}")
    return 0


def _chips(paths):
    import numpy as np
    from backend.files import read_image
    images = [read_image(p).pixels for p in paths]
    shapes = {i.shape for i in images}
    if len(shapes) != 1 or len({i.dtype for i in images}) != 1:
        raise ValueError("--image chips of one search must share a size and type: resize them or search one by one")
    return np.stack(images)


def cmd_export(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    from backend.index.export import export_geoparquet
    from backend.index.layout import IndexStore
    try:
        result = export_geoparquet(IndexStore.open(args.index), args.out, embeddings=args.embeddings)
    except (ProtocolError, ValueError, OSError) as exc:
        return _failed(exc)
    print(json.dumps(result) if args.json else f"{result['out']}: {result['rows']} windows")
    return 0


def _failed(exc: Exception) -> int:
    from shared_protocol import ProtocolError
    if isinstance(exc, ProtocolError):
        reason = exc.details.get("reason")
        return fail(f"error ({exc.code}{', ' + reason if reason else ''}): {exc.message}")
    return fail(f"error: {exc}")
