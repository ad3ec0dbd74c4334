"""``python -m backend presets``: the model presets (light: no torch)."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list the model presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from backend.models.presets import DEFAULT_PRESET, PRESETS
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
