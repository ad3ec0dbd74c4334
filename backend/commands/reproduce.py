"""``python -m backend reproduce georsclip --data DIR``: GeoRSCLIP's published table, ours beside theirs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import add_model_flags, fail, load_base


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reproduce", help="reproduce a published table (georsclip) on its test bundle",
        description="Zero-shot top-1 (AID, RESISC45, EuroSAT), retrieval R@1/5/10 and mR (RSITMD, RSICD) and "
                    "SeLo Rsu/Rda/Ras/Rmi (AIR-SLT, reference mode) on the RS5M test bundle, each printed beside "
                    "the published number with the difference. Missing parts are skipped, with a line saying "
                    "which. See backend/evaluation/reproduce.py for the layout.")
    p.add_argument("table", choices=["georsclip"], help="the published table to reproduce")
    p.add_argument("--data", required=True, metavar="DIR", help="the RS5M test bundle (rs5m_test_data)")
    p.add_argument("--download", action="store_true",
                   help="fetch the bundle (and the checkpoint) through the Hugging Face hub first")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object (last line), keyed by dataset")
    add_model_flags(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from shared_protocol import ProtocolError
    from backend.errors import BackendError
    from backend.evaluation import reproduce as rp
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    data = Path(args.data)
    try:
        if args.download:
            data = rp.download_bundle(data, log)
        else:
            args.offline = True  # nothing is fetched unless --download
            data = rp.bundle_root(data)
            if not any((data / d).exists() for d in ("AID", "RESISC45", "eurosat-rgb", "rsitmd", "rsicd", "AIR-SLT")):
                return fail(f"no part of the RS5M test bundle is under {data}.\n" + rp.layout_help(data))
        loaded = load_base(args)
        if loaded.random_weights:
            log("WARNING: random weights: the numbers are meaningless (a plumbing check)")
        results = rp.reproduce_georsclip(loaded, data, args.batch_size, log)
    except (BackendError, ProtocolError) as exc:
        return fail(exc.message)
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    lines, table = rp.compare(results, loaded.name)
    print(f"GeoRSCLIP table, model {loaded.name} ({loaded.weights}):")
    for line in lines:
        print(line)
    if args.json:
        print(json.dumps(table, default=float), flush=True)
    return 0
