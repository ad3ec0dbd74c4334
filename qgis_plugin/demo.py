"""``make demo``: the plugin's own code, headless, against a backend it starts itself.

Starts the backend (the default preset offline; when its weights are missing, says so and falls back to
the tiny random-weight model), opens the sample raster, runs classify, search and localize as QGIS tasks,
adds the styled layers to a project and writes GeoTIFF/GeoPackage layers, the project and a rendered PNG
of the map to the output folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "RGB.byte.tif"
CLASSES = ["forest", "river", "farmland", "dense residential", "bare land", "sea or lake"]
SEARCH = "a river winding through farmland"
LOCALIZE = "dense forest"


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def start_backend(python: str, preset: str, backend_dir: str):
    """(process, settings, used preset): the preset offline, else the tiny random model, said plainly."""
    from .backend_process import free_port, start_and_wait
    from .settings import Settings
    settings = Settings(mode="start", address=f"tcp://127.0.0.1:{free_port()}", backend_python=python,
                        backend_dir=backend_dir, model=preset, offline=True, timeout_s=600.0)
    say(f"starting the backend: preset {preset} (offline) with {python} ...")
    proc = start_and_wait(settings.serve_command(), settings.backend_env(), timeout=300.0)
    if proc.state() == "ready":
        return proc, settings, preset
    reason = proc.failure_reason()
    if proc.weights_missing():
        say(f"the weights of {preset} are not available: {reason}")
    else:
        say(f"the backend did not start with {preset}: {reason}")
    say("FALLBACK: the tiny test model with random weights (--model tiny --random-weights): the plumbing is real, "
        "the answers are meaningless. Put the weights where the message above says to get real answers.")
    settings.model, settings.offline, settings.extra_args = "tiny", False, "--random-weights"
    settings.address = f"tcp://127.0.0.1:{free_port()}"
    proc = start_and_wait(settings.serve_command(), settings.backend_env(), timeout=300.0)
    if proc.state() != "ready":
        raise RuntimeError(f"the fallback backend did not start either: {proc.failure_reason()}")
    return proc, settings, "tiny"


def sample_layer(image: Optional[str], out: Path):
    from qgis.core import QgsRasterLayer
    path = Path(image) if image else SAMPLE
    if not path.is_file():
        say(f"{path} not found; writing a synthetic georeferenced sample instead")
        import numpy as np
        from .outputs import write_geotiff
        rng = np.random.default_rng(0)
        path = out / "synthetic_sample.tif"
        write_geotiff(path, rng.random((3, 512, 512)).astype("float32") * 255, (30.0, 0, 500000.0, 0, -30.0,
                      4000000.0), _wkt("EPSG:32618"))
    layer = QgsRasterLayer(str(path), path.stem, "gdal")
    if not layer.isValid():
        raise RuntimeError(f"QGIS cannot open {path}")
    return layer


def _wkt(authid: str) -> str:
    from qgis.core import QgsCoordinateReferenceSystem
    return QgsCoordinateReferenceSystem(authid).toWkt()


def render_png(layers: Sequence, extent, crs, path: Path, width: int = 1200) -> Path:
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor
    ms = QgsMapSettings()
    ms.setLayers(list(layers))
    ms.setDestinationCrs(crs)
    height = max(1, int(width * extent.height() / extent.width()))
    ms.setOutputSize(QSize(width, height))
    ms.setExtent(extent)
    ms.setBackgroundColor(QColor("white"))
    ms.setFlag(QgsMapSettings.DrawLabeling, True)
    ms.setFlag(QgsMapSettings.Antialiasing, True)
    job = QgsMapRendererParallelJob(ms)
    job.start()
    job.waitForFinished()
    tmp = path.with_name(".tmp_" + path.name)
    if not job.renderedImage().save(str(tmp), "PNG"):
        raise RuntimeError(f"cannot write {path}")
    os.replace(tmp, path)
    return path


def run(args: argparse.Namespace) -> int:
    from qgis.core import QgsApplication, QgsProject
    app = QgsApplication([], False)
    app.initQgis()
    from .capture import render_extent
    from .connection import describe, make_client
    from .sources import CaptureSource
    from .tools.base import Common
    from .tools.classify import ClassifyParams, ClassifyProcessor
    from .tools.localize import LocalizeParams, LocalizeProcessor
    from .tools.search import SearchParams, SearchProcessor
    from .tasks import MapQueryTask, add_outcome, run_and_wait

    out = Path(args.out).resolve()
    layers_dir = out / "layers"
    layers_dir.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        proc, settings, used = start_backend(args.backend_python, args.model, args.backend_dir)
        with make_client(settings, timeout=10) as client:
            info = client.hello()
        d = describe(info)
        say(f"connected to {settings.address}: model {d['model']}, weights: {d['weights']}, device {d['device']}, "
            f"protocol {d['protocol']}")
        project = QgsProject.instance()
        project.setFileName(str(out / "demo_project.qgz"))
        raster = sample_layer(args.image, out)
        project.addMapLayer(raster)
        res = args.resolution or raster.rasterUnitsPerPixelX()
        t = time.perf_counter()
        cap = render_extent([raster], raster.extent(), raster.crs(), res)
        say(f"captured {raster.name()}: {cap.width} x {cap.height} px at {res:g} map units/px, "
            f"{cap.crs_authid or 'custom CRS'} ({time.perf_counter() - t:.2f} s)")
        common = Common(layers_dir, None, [raster.source()])
        tile = max(32, min(224, min(cap.width, cap.height) // 4))
        source = CaptureSource(cap)
        jobs = [ClassifyProcessor(source, ClassifyParams(CLASSES, tile, top_k=3), common),
                SearchProcessor(source, SearchParams(SEARCH, tile, top_k=5), common),
                LocalizeProcessor(source, LocalizeParams([LOCALIZE]), common)]
        drawn: List = []
        for processor in jobs:
            t = time.perf_counter()
            task = run_and_wait(MapQueryTask(processor, settings), timeout=1800)
            if task.error is not None:
                say(f"FAILED: {task.message()}")
                return 1
            outcome = task.outcome
            _, layers = add_outcome(outcome, project, settings.heatmap_opacity)
            drawn = layers + drawn
            say(f"[{outcome.title}] {outcome.summary} ({time.perf_counter() - t:.2f} s)")
            for spec in outcome.layers:
                say(f"  wrote {spec.path}")
            for w in outcome.warnings:
                say(f"  warning: {w}")
        png = render_png(drawn + [raster], raster.extent(), raster.crs(), out / "demo_map.png")
        say(f"rendered the map to {png}")
        project.write()
        say(f"saved the project {project.fileName()} (open it in QGIS)")
        say(f"done with model {used}")
        return 0
    finally:
        if proc is not None:
            proc.stop()
        QgsProject.instance().clear()
        app.exitQgis()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the MapQuery QGIS plugin headless against a backend it starts.")
    p.add_argument("--backend-python", default=str(ROOT / ".venv" / "bin" / "python"),
                   help="the backend's Python (with torch); default .venv/bin/python")
    p.add_argument("--backend-dir", default=str(ROOT), help="folder holding the backend package")
    p.add_argument("--model", default="georsclip-vit-b-32", help="preset to try first (offline)")
    p.add_argument("--image", help="raster to use (default ../shared/data/RGB.byte.tif)")
    p.add_argument("--resolution", type=float, default=0.0, help="capture resolution in map units (0: native)")
    p.add_argument("--out", default=str(ROOT / "out"), help="output folder")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
