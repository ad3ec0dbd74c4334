"""`make plugin`: the zip that Plugin Manager's 'Install from ZIP' accepts, and that it imports on its own."""
from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import build_plugin  # noqa: E402


def test_zip_layout_and_metadata(tmp_path):
    path = build_plugin.build(tmp_path / "mapquery_rs.zip")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        meta = configparser.ConfigParser()
        meta.read_string(zf.read("mapquery_rs/metadata.txt").decode())
    assert {n.split("/")[0] for n in names} == {"mapquery_rs"}  # one top folder, as QGIS expects
    for needed in ("__init__.py", "plugin.py", "dock.py", "capture.py", "icon.svg", "processing/provider.py",
                   "_vendor/shared_protocol/client.py", "_vendor/shared_protocol/messages.py",
                   "_vendor/shared_protocol/endpoints.py", "_vendor/backend/__main__.py", "_vendor/backend/cli.py",
                   "_vendor/backend/models/configs/tiny-vit.json", "_vendor/pyproject.toml"):
        assert f"mapquery_rs/{needed}" in names
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n or "tests/" in n]
    assert not [n for n in names if n.startswith("mapquery_rs/backend/")]  # torch stays out of QGIS
    # the backend's whole source travels, for the first-run setup (its own venv, outside QGIS's Python)
    repo_backend = {p.relative_to(ROOT).as_posix() for p in (ROOT / "backend").rglob("*")
                    if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts}
    vendored = "mapquery_rs/_vendor/"
    assert repo_backend == {n[len(vendored):] for n in names if n.startswith(vendored + "backend/")}
    g = meta["general"]
    assert g["name"] == "MapQuery RS" and g["qgisMinimumVersion"] == "3.22" and g["hasProcessingProvider"] == "yes"
    assert f"mapquery_rs/{g['icon']}" in names
    # reproducible: same bytes twice
    again = build_plugin.build(tmp_path / "again.zip")
    assert again.read_bytes() == path.read_bytes()


def test_unpacked_zip_imports_without_the_repository(tmp_path):
    """Unzipped into a plugins folder, the plugin imports with its vendored protocol, shadowing nothing."""
    with zipfile.ZipFile(build_plugin.build(tmp_path / "p.zip")) as zf:
        zf.extractall(tmp_path / "plugins")
    code = (
        "import sys; sys.path = [p for p in sys.path if 'work/main' not in p and p != '']; "
        f"sys.path.insert(0, {str(tmp_path / 'plugins')!r}); sys.path.append('/usr/share/qgis/python/plugins'); "
        "import mapquery_rs, shared_protocol, processing; "
        "assert 'mapquery_rs/_vendor' in shared_protocol.__file__, shared_protocol.__file__; "
        "assert 'mapquery_rs' not in processing.__file__, processing.__file__; "
        "assert callable(mapquery_rs.classFactory); "
        "from qgis.core import QgsApplication; app = QgsApplication([], False); app.initQgis(); "
        "from mapquery_rs.processing.provider import MapQueryProvider; "
        "from mapquery_rs import dock, plugin, tasks; "
        "assert 'torch' not in sys.modules and 'backend' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=60, env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin",
                                           "HOME": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_cli_prints_the_zip(tmp_path):
    out = tmp_path / "x.zip"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_plugin.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and out.is_file() and str(out) in proc.stdout
