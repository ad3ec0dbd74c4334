"""Whole-scene localize (issue 14): ``mapquery:localizeraster``'s fast mode on a large GeoTIFF vs encoding its
SeLo windows alone, and the peak memory of both processes.

Run with QGIS's Python (the plugin's side), which starts a backend from the venv (``BACKEND_PYTHON``)::

    BACKEND_PYTHON=.venv/bin/python /usr/bin/python3 bench/bench_scene_localize.py [--size 6000] [--pairs 2]

1. A synthetic tiled GeoTIFF of ``--size`` px a side (RGB, textured; every pixel valid, so every window counts).
2. The whole scene: ``LocalizeProcessor`` over ``RasterBlocks`` (the Processing algorithm's path), blocks of
   2048 px, the heatmap written to a GeoTIFF.
3. The windows alone: the same windows (every SeLo window of the scene, 256/512/768 px) in one ``localize``
   request with explicit windows over the whole raster already in memory: the encoding, plus 3 bytes a pixel
   over loopback. The server's own time for it (``elapsed_s``) is given too.
   The two alternate, ``--pairs`` times; the backend caches nothing (``--cache-mb 0``), so each run encodes.
Target: whole scene <= 1.5 x the windows alone. Peak memory: VmHWM of each process, reset before each run
(``/proc/PID/clear_refs``), so earlier peaks do not hide it; for the plugin's side also the peak of what its
Python and numpy allocate (tracemalloc), without GDAL's block cache of the rasters read and written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERY = "a harbour with many boats"


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def make_raster(path: Path, size: int) -> None:
    """A tiled RGB GeoTIFF with structure (stripes, blobs, noise), written a strip at a time."""
    from osgeo import gdal, osr
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, 3, gdal.GDT_Byte,
                                              ["TILED=YES", "BLOCKXSIZE=512", "BLOCKYSIZE=512"])
    ds.SetGeoTransform((500000.0, 0.5, 0.0, 4200000.0, 0.0, -0.5))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32618)
    ds.SetProjection(srs.ExportToWkt())
    rng = np.random.default_rng(0)
    for r0 in range(0, size, 512):
        rows = min(512, size - r0)
        yy, xx = np.mgrid[r0:r0 + rows, 0:size]
        water = (np.sin(xx / 90.0) + np.cos(yy / 70.0)) > 0.8
        for b, base in enumerate((90, 120, 70)):
            band = (base + 60 * np.sin(xx / (13.0 + 5 * b)) * np.cos(yy / 17.0)).astype(np.int16)
            band += rng.integers(-30, 30, band.shape, dtype=np.int16)
            band[water] = (40, 90, 160)[b]
            ds.GetRasterBand(b + 1).WriteArray(np.clip(band, 0, 255).astype(np.uint8), 0, r0)
    ds = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=6000)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--model", default="georsclip-vit-b-32")
    ap.add_argument("--block", type=int, default=2048)
    args = ap.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication, QgsRasterLayer
    app = QgsApplication([], False)
    app.initQgis()
    from osgeo import gdal

    from backend.process import start_server
    from qgis_plugin.sources import RasterBlocks
    from qgis_plugin.tools.base import Common, Feedback
    from qgis_plugin.tools.localize import LocalizeParams, LocalizeProcessor
    from shared_protocol.client import Client
    from shared_protocol.defaults import DEFAULT_WINDOW_SIZES
    from shared_protocol.selo import selo_windows

    python = os.environ.get("BACKEND_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_scene_"))
    raster = tmp / "scene.tif"
    t = time.perf_counter()
    make_raster(raster, args.size)
    print(f"scene localize: {args.size} x {args.size} synthetic tiled GeoTIFF ({time.perf_counter() - t:.1f} s to "
          f"write), {args.model} (random weights), blocks of {args.block} px")
    boxes = np.concatenate([selo_windows(args.size, args.size, s) for s in DEFAULT_WINDOW_SIZES]).astype(np.int32)
    result = {"bench": "scene_localize", "size": args.size, "model": args.model, "windows": int(len(boxes)),
              "block": args.block, "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "load_before": os.getloadavg(), "scene": [], "windows_alone": []}
    server = start_server(["--model", args.model, "--random-weights", "--cache-mb", "0"], python=python,
                          timeout=600)
    spid = server.proc.pid
    me = os.getpid()
    try:
        with Client(server.address, timeout=3600, reuse_canvas=False) as client:
            info = client.hello()
            result["device"] = info.get("device")
            layer = QgsRasterLayer(str(raster), "scene")
            whole = gdal.Open(str(raster)).ReadAsArray()  # the windows-alone side: the pixels already in memory
            canvas = np.ascontiguousarray(whole.transpose(1, 2, 0))
            del whole
            for pair in range(args.pairs):
                for side in ("scene", "windows_alone"):
                    reset_peak(me)
                    reset_peak(spid)
                    rss0, srss0 = status_kb(me, "VmRSS:"), status_kb(spid, "VmRSS:")
                    t = time.perf_counter()
                    if side == "scene":
                        tracemalloc.start()  # what the plugin's Python and numpy hold (not GDAL's block cache)
                        out = tmp / f"heat_{pair}.tif"
                        proc = LocalizeProcessor(RasterBlocks(layer), LocalizeParams([QUERY], block_px=args.block),
                                                 Common(tmp))
                        res = proc.compute(client, Feedback())
                        res.write([out])
                        wall = time.perf_counter() - t
                        rec = {"s": wall, "windows_encoded": res.windows, "windows_total": res.total_windows,
                               "plugin_python_peak_mb": tracemalloc.get_traced_memory()[1] / 2 ** 20}
                        tracemalloc.stop()
                        out.unlink()
                    else:
                        reply = client.localize(canvas, [QUERY], windows=boxes)
                        wall = time.perf_counter() - t
                        rec = {"s": wall, "server_s": reply.result.get("elapsed_s"),
                               "windows_encoded": reply.result.get("windows")}
                    rec.update(plugin_rss_before_mb=rss0 / 1024, plugin_peak_mb=status_kb(me, "VmHWM:") / 1024,
                               backend_rss_before_mb=srss0 / 1024, backend_peak_mb=status_kb(spid, "VmHWM:") / 1024)
                    result[side].append(rec)
                    print(f"  pair {pair + 1} {side:13}: {wall:7.1f} s  "
                          + (f"(server {rec['server_s']:.1f} s) " if side != "scene" else
                             f"(numpy/Python peak {rec['plugin_python_peak_mb']:.0f} MB) ")
                          + f"windows encoded {rec['windows_encoded']}; peak RSS plugin {rec['plugin_peak_mb']:.0f} MB "
                          f"(from {rec['plugin_rss_before_mb']:.0f}), backend {rec['backend_peak_mb']:.0f} MB "
                          f"(from {rec['backend_rss_before_mb']:.0f})")
                    time.sleep(2)
    finally:
        server.stop()
    best_scene = min(r["s"] for r in result["scene"])
    best_alone = min(r["s"] for r in result["windows_alone"])
    result.update(ratio_best=best_scene / best_alone,
                  ratio_pairs=[a["s"] / b["s"] for a, b in zip(result["scene"], result["windows_alone"], strict=True)],
                  target_ratio=1.5, load_after=os.getloadavg())
    print(f"  whole scene / windows alone: best {result['ratio_best']:.2f}, pairwise "
          f"{', '.join(f'{r:.2f}' for r in result['ratio_pairs'])} (target <= 1.5)")
    print("RESULT " + json.dumps(result))
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    sys.stdout.flush()
    os._exit(0)  # not app.exitQgis(): tearing QGIS down with the layer alive crashed it after the results


if __name__ == "__main__":
    main()
