#!/usr/bin/env python3
"""Build ``dist/mapquery_rs.zip`` for QGIS's Plugin Manager > Install from ZIP.

The zip holds one folder, ``mapquery_rs/``: the plugin (``qgis_plugin/``), ``metadata.txt`` and, under
``_vendor/``, the backend's source as laid out in the repository: ``shared_protocol/`` (the plugin's ``__init__``
puts ``_vendor`` on ``sys.path`` when needed), ``backend/`` and ``pyproject.toml`` (its dependencies). QGIS never
imports ``backend``: the plugin's first-run setup installs those dependencies into a virtualenv of their own
and starts ``python -m backend serve`` there with ``_vendor`` on its ``PYTHONPATH``.
Also usable as a module: :func:`build` or :func:`stage` (an unpacked plugin folder, for ``make qgis``).
"""
from __future__ import annotations

import argparse
import configparser
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Iterator, Tuple

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_NAME = "mapquery_rs"
VENDOR = "_vendor"  # the backend's source tree inside the plugin folder
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def _files(root: Path = ROOT) -> Iterator[Tuple[Path, str]]:
    """(source file, path inside the plugin folder)."""
    for base, prefix in ((root / "qgis_plugin", ""), (root / "shared_protocol", f"{VENDOR}/shared_protocol/"),
                         (root / "backend", f"{VENDOR}/backend/")):
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.suffix in SKIP_SUFFIXES:
                    continue
                yield path, prefix + path.relative_to(base).as_posix()
    yield root / "metadata.txt", "metadata.txt"
    yield root / "pyproject.toml", f"{VENDOR}/pyproject.toml"
    for extra in ("LICENSE", "README.md"):
        if (root / extra).is_file():
            yield root / extra, extra


def check_metadata(path: Path) -> configparser.ConfigParser:
    meta = configparser.ConfigParser()
    meta.read(path, encoding="utf-8")
    missing = [k for k in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                           "repository") if not meta.has_option("general", k)]
    if missing:
        raise SystemExit(f"metadata.txt lacks required key(s): {', '.join(missing)}")
    return meta


def build(out: Path = ROOT / "dist" / f"{PLUGIN_NAME}.zip", root: Path = ROOT) -> Path:
    check_metadata(root / "metadata.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for src, rel in _files(root):
            info = zipfile.ZipInfo(f"{PLUGIN_NAME}/{rel}", date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, src.read_bytes())
    os.replace(tmp, out)
    return out


def stage(dest_plugins_dir: Path, root: Path = ROOT) -> Path:
    """Copy the plugin folder (as the zip would unpack) into a QGIS profile's ``python/plugins``."""
    target = dest_plugins_dir / PLUGIN_NAME
    if target.exists():
        shutil.rmtree(target)
    for src, rel in _files(root):
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist" / f"{PLUGIN_NAME}.zip")
    p.add_argument("--stage", type=Path, metavar="PLUGINS_DIR", help="copy the unpacked plugin here instead")
    args = p.parse_args(argv)
    if args.stage:
        print(stage(args.stage))
    else:
        path = build(args.out)
        with zipfile.ZipFile(path) as zf:
            print(f"{path} ({path.stat().st_size} bytes, {len(zf.namelist())} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
