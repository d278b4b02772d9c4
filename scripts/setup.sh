#!/usr/bin/env bash
# Set up raydpo in ./.venv. `scripts/setup.sh` installs the package; `scripts/setup.sh dev` adds
# the test tools. Where no NVIDIA GPU is visible, the CPU build of torch goes in first, so the
# package's `torch` requirement is already satisfied and pip never pulls a multi-GB CUDA build.
# The rest is installed by uv where it can be installed (the same versions as pip resolves, in
# seconds instead of minutes), else by pip; RAYDPO_SETUP_PIP=1 uses pip only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_VERSION=${RAYDPO_TORCH_VERSION:-2.13.0}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found; torch comes with its CUDA build from the package index"
  else
    echo "setup: no GPU; installing the CPU build of torch $TORCH_VERSION"
    # A local wheel (pip's find-links) first; else the CPU wheel index.
    $VPIP install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null \
      || $VPIP install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
TARGET="."
[ "${1:-}" = "dev" ] && TARGET=".[dev]"

# uv reads none of pip's configuration: hand it pip's find-links, constraints and certificate.
pip_setting() { $VPIP config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | head -1; }
with_uv() {
  [ -n "${RAYDPO_SETUP_PIP:-}" ] && return 1
  [ -x .venv/bin/uv ] || $VPIP install -q uv >/dev/null 2>&1 || return 1
  local args=(pip install -q --python .venv/bin/python)
  local links constraint cert
  links=$(pip_setting find-links); constraint=$(pip_setting constraint); cert=$(pip_setting cert)
  for l in $links; do args+=(--find-links "$l"); done
  [ -n "$constraint" ] && [ -f "$constraint" ] && args+=(--constraint "$constraint")
  [ -n "$cert" ] && export SSL_CERT_FILE="$cert"
  echo "setup: installing with uv"
  .venv/bin/uv "${args[@]}" -e "$TARGET"
}
with_uv || { echo "setup: installing with pip"; $VPIP install -q -e "$TARGET"; }
echo "setup: done (.venv)"
