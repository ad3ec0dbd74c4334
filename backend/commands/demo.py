"""``python -m backend demo``: start a backend and run a scripted session against it (``backend.demo``)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="start a backend and run a scripted session against it")
    p.add_argument("--model", default=None, help="preset to try first (default: the default preset)")
    p.add_argument("--image", help="raster to use (default: ../shared/data/RGB.byte.tif or a synthetic one)")
    p.add_argument("--out", default="out", help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from backend.demo import run_demo
    return run_demo(args)
