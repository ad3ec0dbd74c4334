#!/usr/bin/env bash
# `make qgis`: open the QGIS desktop with the MapQuery plugin installed (in a project-local profile) and the
# sample raster loaded. The plugin starts the backend itself with the repository's .venv (see Settings).
#   BACKEND_PYTHON  backend interpreter (default .venv/bin/python)
#   MAPQUERY_MODEL  preset (default georsclip-vit-b-32; use "tiny" plus MAPQUERY_EXTRA=--random-weights offline)
#   PROFILES        QGIS profiles folder (default out/qgis_profiles)
#   MAPQUERY_STARTUP  the Python run at start (default scripts/qgis_startup.py)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
QGIS_BIN="${QGIS_BIN:-$(command -v qgis || true)}"
if [ -z "$QGIS_BIN" ]; then
  echo "QGIS desktop is not installed: run scripts/install_qgis_desktop.sh (Debian: apt-get install qgis)" >&2
  exit 1
fi
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
  echo "no display: 'make qgis' needs a desktop session (or run it under xvfb-run for a smoke test)" >&2
  exit 1
fi
PROFILES="${PROFILES:-$ROOT/out/qgis_profiles}"
PROFILE_DIR="$PROFILES/profiles/default"
PLUGINS="$PROFILE_DIR/python/plugins"
mkdir -p "$PLUGINS" "$PROFILE_DIR/QGIS"
/usr/bin/python3 "$ROOT/scripts/build_plugin.py" --stage "$PLUGINS" >/dev/null
INI="$PROFILE_DIR/QGIS/QGIS3.ini"
BACKEND_PYTHON="${BACKEND_PYTHON:-$ROOT/.venv/bin/python}"
/usr/bin/python3 - "$INI" "$BACKEND_PYTHON" "$ROOT" "${MAPQUERY_MODEL:-georsclip-vit-b-32}" "${MAPQUERY_EXTRA:-}" \
  "${MAPQUERY_MODE:-start}" "${MAPQUERY_ADDRESS:-}" "${MAPQUERY_OUTPUT_DIR:-}" <<'PY'
import configparser, sys
ini, python, root, model, extra, mode, address, outputs = sys.argv[1:9]
sys.path.insert(0, root)
from shared_protocol.endpoints import DEFAULT_ADDRESS
address = address or DEFAULT_ADDRESS
cfg = configparser.RawConfigParser()
cfg.optionxform = str
cfg.read(ini)
for section, values in {
    "PythonPlugins": {"mapquery_rs": "true"},
    "mapquery_rs": {"mode": mode, "address": address, "backend_python": python, "backend_dir": root,
                    "model": model, "extra_args": extra, "offline": "true", "output_dir": outputs},
    "qgis": {"checkVersion": "false", "showTips": "false"},
}.items():
    if not cfg.has_section(section):
        cfg.add_section(section)
    for k, v in values.items():
        cfg.set(section, k, v)
with open(ini, "w") as f:
    cfg.write(f)
PY
SAMPLE="${MAPQUERY_SAMPLE:-$ROOT/../shared/data/RGB.byte.tif}"
export MAPQUERY_SAMPLE="$SAMPLE"
exec "$QGIS_BIN" --profiles-path "$PROFILES" --nologo --noversioncheck --code "${MAPQUERY_STARTUP:-$ROOT/scripts/qgis_startup.py}" "$@"
