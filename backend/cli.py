"""``python -m backend``: serve a model, talk to a server, train, evaluate and reproduce published tables.

Subcommands: serve, ping, classify, rank, localize, keys, weights, presets, demo, train, eval, params,
reproduce, adapt, unsure, index.
This module is the parser only: each module in ``backend/commands/`` that defines ``add_parser(subparsers)``
adds its own subcommands (and nothing in ``commands/`` imports this module).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
from typing import Optional, Sequence

# the order of the subcommands in --help; command modules not listed here follow, by name
ORDER = ("serve", "client", "presets", "demo", "train", "eval", "params", "reproduce")


def _command_modules() -> list:
    from . import commands
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [importlib.import_module(f"{commands.__name__}.{n}") for n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("MAPQUERY_LOG", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _command_modules():
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)
