"""``python -m backend params --model ARCH --method METHOD``: trainable and total parameter counts."""
from __future__ import annotations

import argparse

from ._common import add_method_config_flags, add_model_flags, emit, fail, method_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("params", help="trainable and total parameter counts of an adaptation method")
    p.add_argument("--method", default="lora", help="lora | mrs-adapter | gdpl | coop | full (all weights)")
    p.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    add_method_config_flags(p)
    add_model_flags(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    from backend.errors import BackendError
    from backend.adapters import count_parameters, get_method
    from backend.models import load_model
    try:
        # counts depend on the architecture only: random weights, nothing to download
        loaded = load_model(args.model, model_config=args.model_config, device="cpu", random_weights=True)
        if args.method == "full":
            total = sum(p.numel() for p in loaded.model.parameters())
            rows, trainable, method = [], total, "full"
        else:
            spec = get_method(args.method)
            cfg = method_config(spec, args)
            if spec.name == "gdpl" and cfg.get("domain_model", "self") != "self":
                cfg["domain_random_weights"] = True
            adapted = spec.build(loaded, spec.config_cls(**cfg))
            trainable, total = count_parameters(adapted)
            rows = _breakdown(adapted)
            method = spec.name
    except (BackendError, ProtocolError) as exc:
        return fail(exc.message)
    except (ValueError, TypeError) as exc:
        return fail(str(exc))
    pct = 100.0 * trainable / total if total else 0.0
    lines = [f"model {loaded.name} ({loaded.arch}), method {method}"]
    lines += [f"  {name:40} {n:>12,}" for name, n in rows]
    lines += [f"trainable {trainable:,}  total {total:,}  ({pct:.3f}% trainable)"]
    emit(args, lines, {"model": loaded.name, "arch": loaded.arch, "method": method, "trainable": trainable,
                       "total": total, "trainable_percent": pct, "breakdown": dict(rows)})
    return 0


def _breakdown(adapted):
    groups = {}
    for name, p in adapted.adapter_named_parameters():
        parts = name.split(".")
        if adapted.method == "lora":
            key = "vision" if parts[0] == "visual" else "text"
        else:
            key = parts[0] if len(parts) < 3 else ".".join(parts[:2])
        groups[key] = groups.get(key, 0) + p.numel()
    return sorted(groups.items())

