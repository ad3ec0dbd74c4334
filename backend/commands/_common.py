"""Helpers shared by the train, eval and params subcommands (no subcommand here: no ``add_parser``)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from typing import Any, Dict, Sequence


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """``--model/--model-config/--checkpoint/--pretrained/--device/--random-weights/--offline`` as ``serve``."""
    from backend.cli import add_model_args
    add_model_args(p)


def load_base(args: argparse.Namespace):
    from backend.cli import load_model_from_args
    return load_model_from_args(args)


def add_method_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting (repeatable), e.g. r=4, targets=attn,mlp, bottleneck=32, n_ctx=4; "
                        "see backend/adapters/METHOD/config.py")
    p.add_argument("--domain-model", help="GDPL: frozen domain model ('self', a preset/architecture, or timm:NAME)")
    p.add_argument("--domain-checkpoint", metavar="FILE", help="GDPL: the domain model's weights")


def _convert(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if isinstance(default, list):
        items = [v for v in value.split(",") if v != ""]
        return [int(v) if v.lstrip("-").isdigit() else v for v in items]
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if value.lower() in ("none", "null"):
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def method_config(spec, args: argparse.Namespace) -> Dict[str, Any]:
    """``--set KEY=VALUE`` pairs (typed like the config's defaults) plus the GDPL domain flags."""
    defaults = {}
    for f in fields(spec.config_cls):
        defaults[f.name] = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
    out: Dict[str, Any] = {}
    for pair in getattr(args, "settings", []) or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            raise ValueError(f"--set {pair!r}: {spec.name} settings are {sorted(defaults)}")
        out[key] = _convert(value, defaults[key])
    if spec.name == "gdpl":
        if getattr(args, "domain_model", None):
            out["domain_model"] = args.domain_model
        if getattr(args, "domain_checkpoint", None):
            out["domain_checkpoint"] = args.domain_checkpoint
    return out


def emit(args: argparse.Namespace, table_lines: Sequence[str], obj: Dict[str, Any]) -> None:
    """The readable table; with ``--json``, then one JSON object on the last line."""
    for line in table_lines:
        print(line)
    if getattr(args, "json", False):
        print(json.dumps(obj, default=float), flush=True)


def fail(message: str) -> int:
    print(f"backend: {message}", file=sys.stderr, flush=True)
    return 2
