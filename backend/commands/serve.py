"""``python -m backend serve``: load a model (and adapters) and serve it over ZeroMQ."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Dict, Sequence

from shared_protocol import ProtocolError
from shared_protocol.endpoints import DEFAULT_ADDRESS, TOKEN_ENV
from shared_protocol.ops import DEFAULT_MAX_CANVAS_PIXELS

from backend.errors import BackendError
from backend.models.precision_names import PRECISIONS

from ._common import add_model_flags, load_base


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over ZeroMQ")
    add_model_flags(p)
    p.add_argument("--bind", default=DEFAULT_ADDRESS, help="tcp://HOST:PORT or ipc://PATH (default loopback)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"access token (default ${TOKEN_ENV}); "
                   "a non-loopback bind needs --curve-keys or a token")
    p.add_argument("--token-file", help="read the access token from this file")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE",
                   help="serve a saved adapter under NAME (repeatable)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="where 'train' saves adapters, loaded again at start-up (default $MAPQUERY_ADAPTERS or "
                        "~/.cache/mapquery-rs/adapters; 'none': adapters trained here live until the server stops)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA (fp16 where bf16 is missing); on a CPU, bf16 weights where "
                   "the CPU has native bf16 (AVX512-BF16, AMX, Arm BF16: ~2.5x faster), else fp32. fp32 is "
                   "exact; fp16 needs CUDA; int8 (CPU only, opt-in): the Linear layers dynamically quantised, "
                   "faster where the CPU has no native bf16, embeddings close to fp32's but not equal; "
                   "adapters run in fp32 on a CPU")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (0: 256 on CUDA, 64 on CPU)")
    p.add_argument("--cache-mb", type=int, default=2048, help="embedding cache budget in MiB")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before 'busy'")
    p.add_argument("--max-queue-mb", type=int, default=2048, help="bytes of queued requests before 'busy', MiB")
    p.add_argument("--memory-budget-mb", type=int, default=None, help="a request whose estimated peak memory is "
                   "over this is refused (too_large) before it starts (default: half the machine's memory)")
    p.add_argument("--max-connections", type=int, default=1000, help="open connections; over it the one idle "
                   "longest is closed")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="close a connection that sent nothing for "
                   "this many seconds (0: never)")
    p.add_argument("--curve-keys", metavar="DIR", help="CURVE encryption and client allow-list: DIR holds "
                   "server.key_secret and clients/*.key (python -m backend keys)")
    p.add_argument("--max-array-mb", type=int, default=1024, help="largest array accepted, in MiB")
    p.add_argument("--max-canvas-pixels", type=int, default=DEFAULT_MAX_CANVAS_PIXELS,
                   help="largest canvas (height x width) accepted")
    p.add_argument("--data-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose indexes and rasters remote clients may name (repeatable; loopback "
                   "clients name their own paths)")
    p.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    from backend.engine import Engine, EngineConfig
    from backend.server import Server, ServerConfig
    from backend.service import ModelService, protocol_error
    from shared_protocol import Limits

    token = args.token
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    limits = Limits(max_array_bytes=args.max_array_mb << 20, max_total_bytes=(args.max_array_mb << 20) * 2)
    try:
        from backend.connections import raise_fd_limit
        from backend.server import check_access
        config = ServerConfig(bind=args.bind, token=token, limits=limits, max_queue=args.max_queue,
                              max_queue_bytes=args.max_queue_mb << 20, max_connections=args.max_connections,
                              idle_timeout_s=args.idle_timeout, curve_keys=args.curve_keys)
        warning = check_access(config)  # the address and the keys before the (slow) model load
        if args.curve_keys:
            from backend.curve import load_server_keys
            load_server_keys(args.curve_keys)
        raise_fd_limit()
        loaded = load_base(args)
        from backend.adapt.store import serve_store
        store, adapters, adapter_info = serve_store(args.adapter_dir, loaded)
        named, named_info = load_adapters(args.adapter, loaded)
        adapters.update(named)
        adapter_info.update(named_info)
        engine = Engine(loaded, EngineConfig(batch_size=args.batch_size, precision=args.precision,
                                             cache_bytes=args.cache_mb << 20), adapters)
        if not adapters and store is None and engine.base_model is not loaded.model and not engine.precision.int8:
            loaded.model = engine.base_model  # nothing else needs the fp32 weights: free them (an int8 copy
            # shares its unquantised tensors with them and the index fingerprint is theirs: kept)
        budget = args.memory_budget_mb << 20 if args.memory_budget_mb is not None else None
        server = Server(ModelService(engine, limits, max_canvas_pixels=args.max_canvas_pixels,
                                     adapter_info=adapter_info, memory_budget=budget,
                                     data_dirs=args.data_dir, adapter_store=store), config)
    except (BackendError, ProtocolError) as exc:  # 'cannot start (REASON): ...' is what launchers read
        exc = protocol_error(exc)
        reason = exc.details.get("reason") or exc.code
        print(f"backend: cannot start ({reason}): {exc.message}", file=sys.stderr, flush=True)
        return 2
    except (ValueError, OSError) as exc:
        print(f"backend: cannot start (bad_config): {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # zmq errors (address in use ...) and the like
        print(f"backend: cannot start (error): {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    desc = loaded.describe()
    print(f"backend: model {desc['name']} ({desc['arch']}) on {desc['device']} in {engine.precision.name}; "
          f"weights: {desc['weights']}", flush=True)
    for name, meta in sorted(adapter_info.items()):
        print(f"backend: adapter {name}: {meta.get('method')} ({meta.get('trainable_parameters')} parameters)",
              flush=True)
    try:  # before 'ready', so that the first request does not pay for lazy initialisation
        print(f"backend: warmed up in {engine.warm_up():.2f} s", flush=True)
        from backend.adapters.base import ensure_registered
        ensure_registered()  # the adaptation methods' imports, so that the first train job does not pay them
    except Exception as exc:  # requests will say what is wrong, one by one; the server still starts
        print(f"backend: WARNING: warm-up failed: {type(exc).__name__}: {exc}", flush=True)
    if loaded.random_weights:
        print("backend: WARNING: random weights, answers are meaningless", flush=True)
    if warning:
        print(f"backend: WARNING: {warning}", flush=True)
    if args.curve_keys:
        print(f"backend: CURVE on, {server.info()['server']['curve_clients']} allowed client key(s) in "
              f"{args.curve_keys}", flush=True)
    print(f"backend: ready on {server.endpoint}", flush=True)
    server.serve_forever()
    return 0


def load_adapters(specs: Sequence[str], loaded) -> tuple:
    """``NAME=FILE`` pairs -> ({name: adapted model}, {name: description})."""
    models: Dict[str, Any] = {}
    info: Dict[str, Dict[str, Any]] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter wants NAME=FILE, got {spec!r}")
        from backend.adapters import describe_adapter, load_adapter
        models[name] = load_adapter(path, loaded)
        info[name] = describe_adapter(path)
    return models, info
