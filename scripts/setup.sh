#!/usr/bin/env bash
# Set up napari-uga on a fresh Debian/Ubuntu machine: system libraries for a headless Qt/OpenGL
# display (Xvfb), a virtual environment in .venv/ and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4
libxcb-keysyms1 libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-image0 libfontconfig1 libdbus-1-3"
missing=$(dpkg-query -W -f='${Status} ${Package}\n' $APT_PACKAGES 2>&1 | grep -v "^install ok installed" || true)
if [ -n "$missing" ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $APT_PACKAGES >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Pinned torch first: the machine's local CPU wheel folder is used when it has one.
if [ -d /opt/wheels ]; then export PIP_FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"; fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test]"
echo "napari-uga is set up in .venv/ ($(.venv/bin/python -c 'import napari_uga; print(napari_uga.__version__)'))"
