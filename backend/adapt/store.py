"""The server's adapter folder: ``NAME.pt`` adapter files (the usual format, with provenance in the header's
``extra``), loaded again at start-up; ``.jobs/`` holds the checkpoints of unfinished training jobs."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from shared_protocol import ErrorCode, ProtocolError
from shared_protocol.ops import ADAPTER_NAME_CHARS

log = logging.getLogger("backend.adapt.store")
ADAPTERS_ENV = "MAPQUERY_ADAPTERS"


def default_adapter_dir() -> Path:
    """``$MAPQUERY_ADAPTERS``, else ``adapters/`` beside the weights folder (``~/.cache/mapquery-rs``)."""
    if os.environ.get(ADAPTERS_ENV):
        return Path(os.environ[ADAPTERS_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mapquery-rs" / "adapters"


class AdapterStore:
    """Adapter files by name in one folder."""

    def __init__(self, root: os.PathLike | str):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if not name or not all(c in ADAPTER_NAME_CHARS for c in name) or not name[0].isalnum():
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"bad adapter name {name!r}", {"param": "name"})
        return self.root / f"{name}.pt"

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def job_dir(self, name: str, method: str, digest: str) -> Path:
        return self.root / ".jobs" / f"{name}-{method}-{digest[:16]}"

    def discard_job(self, name: str, method: str, digest: str) -> None:
        shutil.rmtree(self.job_dir(name, method, digest), ignore_errors=True)

    def load_all(self, loaded) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
        """Every adapter file made for this base architecture -> ({name: model}, {name: description}).

        Files for another architecture (the folder is shared by models), files adapted on random weights
        (meaningless on the next process's) and unreadable ones are skipped with a warning; temporary files
        of an interrupted write (``.NAME.pt.xxxx.part``) are removed.
        """
        from backend.adapters import AdapterError, describe_adapter, load_adapter
        models: Dict[str, Any] = {}
        info: Dict[str, Dict[str, Any]] = {}
        if not self.root.is_dir():
            return models, info
        for stale in self.root.glob(".*.pt.*.part"):
            log.warning("removing %s, left by an interrupted write", stale)
            stale.unlink(missing_ok=True)
        for path in sorted(self.root.glob("*.pt")):
            try:
                desc = describe_adapter(path)
                if desc.get("base_arch") != loaded.arch:
                    log.info("adapter %s is for %s, not %s: not loaded", path.name, desc.get("base_arch"),
                             loaded.arch)
                    continue
                if (desc.get("extra") or {}).get("adapt", {}).get("base_random_weights"):
                    log.warning("adapter %s was made on random weights, which a new process draws anew: not "
                                "loaded", path.name)
                    continue
                models[path.stem] = load_adapter(path, loaded)
                info[path.stem] = desc
            except (AdapterError, ProtocolError, OSError, ValueError, KeyError) as exc:
                log.warning("adapter %s not loaded: %s", path, getattr(exc, "message", exc))
        return models, info


def adapter_summary(desc: Dict[str, Any]) -> Dict[str, Any]:
    """What ``info`` lists for an adapter: its description with the adaptation's metrics lifted up."""
    extra = desc.get("extra") or {}
    out = dict(desc)
    for key in ("classes", "metrics"):
        if key in extra:
            out[key] = extra[key]
    return out


def free_name(store: Optional[AdapterStore], loaded_names, name: str, overwrite: bool) -> None:
    """Refuse a name that a loaded adapter or a file in the folder already has, unless ``overwrite``."""
    taken = name in loaded_names or (store is not None and store.exists(name))
    if taken and not overwrite:
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"an adapter named {name!r} exists; choose another name or "
                            "pass overwrite", {"param": "name", "reason": "adapter_exists"})


def serve_store(adapter_dir: Optional[str], loaded) -> Tuple[Optional[AdapterStore], Dict[str, Any],
                                                             Dict[str, Dict[str, Any]]]:
    """``serve --adapter-dir``: (store or None for 'none', its adapters for this model, their descriptions)."""
    if adapter_dir is not None and adapter_dir.lower() == "none":
        return None, {}, {}
    store = AdapterStore(Path(adapter_dir).expanduser() if adapter_dir else default_adapter_dir())
    from backend.adapters import get_method
    get_method("instant-cache")  # imports every method (peft ...) now, not in the first 'train' job
    models, info = store.load_all(loaded)
    return store, models, info
