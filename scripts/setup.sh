#!/usr/bin/env bash
# Set up a virtual environment in .venv with CryoMamba, its napari plugin and everything the
# tests need, plus the Debian packages a headless napari needs (Xvfb, Mesa, xcb libraries).
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
#
# `bash scripts/setup.sh core` (what scripts/demo.sh runs) installs only what the command line
# needs: CPU PyTorch and CryoMamba with its core dependencies, no extras, no Debian packages.
# The full set-up later adds the rest to the same .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-all}
case $MODE in all | core) ;; *) echo "usage: bash scripts/setup.sh [core]" >&2; exit 2 ;; esac
full_stamp=.venv/.cryomamba-setup
core_stamp=.venv/.cryomamba-core
want_full=$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh \
  plugins/napari-cryomamba/pyproject.toml plugins/cryomamba-dask/pyproject.toml | sha256sum | cut -c1-16)
want_core=$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
done_already() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

if [ "$MODE" = core ]; then
  if done_already "$full_stamp" "$want_full" || done_already "$core_stamp" "$want_core"; then
    exit 0
  fi
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  echo "setting up .venv for the demo (first run only; a minute or two)..." >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0
  .venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e .
  echo "$want_core" >"$core_stamp"
  exit 0
fi

# Debian packages for napari under Xvfb (docs: ENVIRONMENT "napari, headless"). Installed only
# when missing, with --no-upgrade so the system's Mesa is left alone. Without root or apt-get
# the napari tests skip instead of failing.
APT_PACKAGES=(
  xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libegl-mesa0 libxkbcommon-x11-0
  libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-randr0
  libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libfontconfig1 libdbus-1-3
  fonts-dejavu-core
)

# install_missing WHAT PACKAGE...: apt-get install the packages that are not installed yet
# (root only, --no-upgrade); otherwise warn that the tests needing WHAT will skip.
install_missing() {
  local what=$1 pkg
  shift
  local missing=()
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "warning: not a Debian system; install $* yourself, or the $what tests will skip." >&2
    return 0
  fi
  for pkg in "$@"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != "installed" ]; then
      missing+=("$pkg")
    fi
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages for the $what tests: ${missing[*]}" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --no-upgrade "${missing[@]}" >/dev/null; }; then
      echo "warning: apt-get could not install them; the $what tests will skip." >&2
    fi
  else
    echo "warning: missing Debian packages (${missing[*]}); not root or no apt-get, so they" \
      "are not installed and the $what tests will skip." >&2
  fi
}

install_missing "napari (headless Qt)" "${APT_PACKAGES[@]}"
# Debian's nginx, for tests/test_nginx.py (a real TLS proxy in front of a real server; docs:
# server.md "Behind nginx").
install_missing nginx nginx

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if done_already "$full_stamp" "$want_full"; then
  exit 0
fi
echo "setting up .venv (first run only; a few minutes)..." >&2
"$VPY" -m pip install --quiet --upgrade pip
# CPU torch first, then the project under a constraint that keeps it (see docs/install.md).
"$VPY" -m pip install --quiet torch==2.13.0
"$VPY" -m pip install --quiet -c scripts/constraints.txt -e ".[dev,server,napari,napari-dev,dask,zarr,copick]" \
  -e plugins/napari-cryomamba -e plugins/cryomamba-dask
echo "$want_full" > "$full_stamp"
echo "set-up done" >&2
