"""``python -m backend weights --model PRESET [--download] [--json]``: which file a preset's weights are, where
to get it and where the backend looks for it (``$MAPQUERY_WEIGHTS``, default ``~/.cache/mapquery-rs/weights``);
``--download`` fetches it from the Hugging Face hub into that folder, printing ``progress FRACTION`` lines."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("weights", help="where a preset's weights come from; --download fetches them")
    p.add_argument("--model", required=True, help="a preset (python -m backend presets)")
    p.add_argument("--download", action="store_true", help="download them into the weights folder (online)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def describe(model: str) -> Dict[str, Any]:
    """The file, its address, the path the backend looks at and what to do by hand."""
    from backend.models.presets import get_preset, weights_dir
    preset = get_preset(model)
    if preset is None:
        return {"model": model, "downloadable": False,
                "instructions": f"{model!r} is not a preset: pass its weights with --checkpoint FILE"}
    if not preset.hf_filename:
        how = ("it has no published weights: use --random-weights (answers are meaningless)" if preset.random_only
               else f"open_clip downloads them (pretrained '{preset.pretrained_tag}') when the backend starts online"
               if preset.pretrained_tag else f"pass its checkpoint with --checkpoint FILE ({preset.description})")
        return {"model": preset.name, "downloadable": False, "instructions": how}
    target = weights_dir() / preset.weight_filename
    url = f"https://huggingface.co/{preset.hf_repo}/resolve/main/{preset.hf_filename}"
    return {"model": preset.name, "downloadable": True, "repo": preset.hf_repo, "file": preset.hf_filename,
            "url": url, "path": str(target), "present": target.is_file(),
            "instructions": f"download {url} and save it as {target} (or choose the file as the checkpoint in "
                            f"the MapQuery settings, or pass --checkpoint FILE)"}


def _progress_class():
    from tqdm.auto import tqdm

    class ProgressLines(tqdm):  # 'progress 0.420 (12.3 of 29.3 MB)' lines instead of a bar, for launchers
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["file"] = io.StringIO()
            kwargs.pop("disable", None)
            super().__init__(*args, **kwargs)
            self._said = -1

        def update(self, n: float = 1) -> Any:
            out = super().update(n)
            if self.total:
                permille = int(1000 * self.n / self.total)
                if permille != self._said:
                    self._said = permille
                    print(f"progress {self.n / self.total:.3f} ({self.n / 1e6:.1f} of {self.total / 1e6:.1f} MB)",
                          flush=True)
            return out
    return ProgressLines


def download(info: Dict[str, Any]) -> Path:
    """Fetch the file into a temporary folder beside the target, then move it into place (complete or absent)."""
    import inspect

    from huggingface_hub import hf_hub_download
    target = Path(info["path"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".download-{os.getpid()}"
    kwargs: Dict[str, Any] = {"local_dir": str(tmp)}
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = _progress_class()
    try:
        got = Path(hf_hub_download(info["repo"], info["file"], **kwargs))
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.download and info.get("downloadable") and not info.get("present"):
        try:
            info["path"] = str(download(info))
            info["present"] = True
        except Exception as exc:  # offline, refused, disk full ...
            said = str(exc).strip().rstrip(".")[:300]
            info["error"] = f"cannot download {info['url']}: {type(exc).__name__}: {said}"
    if args.json:
        print(json.dumps(info))
    else:
        if info.get("present"):
            print(f"{info['model']}: weights at {info['path']}")
        elif "error" in info:
            print(f"{info['error']}. Instead, {info['instructions']}", file=sys.stderr)
        else:
            print(f"{info['model']}: {info['instructions']}")
    if args.download and not info.get("present"):
        return 2
    return 0
