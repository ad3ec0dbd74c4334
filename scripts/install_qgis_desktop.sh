#!/usr/bin/env bash
# Install the QGIS desktop and a virtual X server (Debian/Ubuntu), for `make qgis` and the desktop screenshot test.
set -euo pipefail
PKGS="qgis python3-qgis xvfb xauth"
if command -v qgis >/dev/null && command -v xvfb-run >/dev/null; then
  echo "QGIS desktop and xvfb are installed"; exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends $PKGS
