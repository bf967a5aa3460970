#!/usr/bin/env bash
# Set up a virtual environment in .venv with CryoMamba, its napari plugin and everything the
# tests need, plus the Debian packages a headless napari needs (Xvfb, Mesa, xcb libraries).
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian packages for napari under Xvfb (docs: ENVIRONMENT "napari, headless"). Installed only
# when missing, with --no-upgrade so the system's Mesa is left alone. Without root or apt-get
# the napari tests skip instead of failing.
APT_PACKAGES=(
  xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libegl-mesa0 libxkbcommon-x11-0
  libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-randr0
  libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libfontconfig1 libdbus-1-3
  fonts-dejavu-core
)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in "${APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != "installed" ]; then
      missing+=("$pkg")
    fi
  done
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages for headless napari: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends --no-upgrade "${missing[@]}" >/dev/null; }
    then
      echo "warning: apt-get could not install them; the napari tests will skip." >&2
    fi
  else
    echo "warning: missing Debian packages for headless napari (${missing[*]}); not root" \
      "or no apt-get, so they are not installed and the napari tests will skip." >&2
  fi
elif ! command -v dpkg-query >/dev/null 2>&1; then
  echo "warning: not a Debian system; install Xvfb, Mesa (libGL/EGL) and the xcb libraries" \
    "yourself, or the napari tests will skip." >&2
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.cryomamba-setup
want=$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh \
  plugins/napari-cryomamba/pyproject.toml plugins/cryomamba-dask/pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run only; a few minutes)..." >&2
"$VPY" -m pip install --quiet --upgrade pip
# CPU torch first, then the project under a constraint that keeps it (see docs/install.md).
"$VPY" -m pip install --quiet torch==2.13.0
"$VPY" -m pip install --quiet -c scripts/constraints.txt -e ".[dev,server,napari,napari-dev,dask]" \
  -e plugins/napari-cryomamba -e plugins/cryomamba-dask
echo "$want" > "$stamp"
echo "set-up done" >&2
