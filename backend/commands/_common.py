"""Helpers shared by the subcommands (no subcommand here: no ``add_parser``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from typing import Any, Dict, Sequence

from shared_protocol.defaults import MIN_VALID_SHARE
from shared_protocol.endpoints import DEFAULT_ADDRESS, TOKEN_ENV


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model-choosing flags shared by serve, train, eval, params and reproduce."""
    from backend.models.presets import DEFAULT_PRESET
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


def load_base(args: argparse.Namespace):
    """The base model the ``add_model_flags`` flags name."""
    from backend.models.loading import load_model
    return load_model(args.model, model_config=args.model_config, checkpoint=args.checkpoint,
                      pretrained=args.pretrained, device=args.device, random_weights=args.random_weights,
                      offline=args.offline or None)


def add_client_args(p: argparse.ArgumentParser, timeout: float = 120.0) -> None:
    """The flags of the commands that talk to a running server."""
    p.add_argument("--connect", default=DEFAULT_ADDRESS, help=f"backend address (default {DEFAULT_ADDRESS})")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"access token (default ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=timeout, help="seconds to wait for each reply")
    p.add_argument("--server-key", metavar="KEY", help="CURVE: the server's public key (its server.key file or "
                   "40 Z85 characters)")
    p.add_argument("--client-key", metavar="FILE", help="CURVE: this client's NAME.key_secret (its public key "
                   "must be in the server's allow-list)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_min_valid_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--min-valid", type=float, default=MIN_VALID_SHARE, metavar="SHARE",
                   help=f"skip {what} with a smaller share of valid pixels (the raster's nodata, alpha or mask; "
                   f"default {MIN_VALID_SHARE})")


def client_from_args(args: argparse.Namespace):
    from shared_protocol.client import Client
    return Client(args.connect, token=args.token, timeout=args.timeout, retries=1, name="backend-cli",
                  server_public_key=args.server_key, client_secret_file=args.client_key)


def add_method_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting (repeatable), e.g. r=4, targets=attn,mlp, bottleneck=32, n_ctx=4; "
                        "see backend/adapters/METHOD/config.py")
    p.add_argument("--domain-model", help="GDPL: frozen domain model ('self', a preset/architecture, or timm:NAME)")
    p.add_argument("--domain-checkpoint", metavar="FILE", help="GDPL: the domain model's weights (an MAE's "
                   "{'model': ...} file with --domain-model mae)")
    p.add_argument("--variant", choices=("paper", "released", "satellite"), help="GDPL: paper (default) or "
                   "released (the released code's behaviours); CoOp: satellite (default, 'a satellite image of a') "
                   "or paper (16 random N(0, 0.02) context tokens, class token at the end)")


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
    if spec.name in ("gdpl", "coop") and getattr(args, "variant", None):
        out["variant"] = args.variant
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
