#!/usr/bin/env bash
# Set up raydpo in ./.venv. `scripts/setup.sh` installs the package; `scripts/setup.sh dev` adds
# the test tools. Where no NVIDIA GPU is visible, the CPU build of torch goes in first, so the
# package's `torch` requirement is already satisfied and pip never pulls a multi-GB CUDA build.
# Everything is installed by uv where it can be installed (the same versions as pip resolves, in
# seconds instead of minutes: torch's CPU wheel in about 3 s against pip's 14), else by pip;
# RAYDPO_SETUP_PIP=1 uses pip only. uv compiles the bytecode at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set, nothing is cached later, and every new process (each Ray worker)
# would compile torch, Ray and transformers from source on import, about twice the import time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_VERSION=${RAYDPO_TORCH_VERSION:-2.13.0}
TARGET="."
[ "${1:-}" = "dev" ] && TARGET=".[dev]"

# uv reads none of pip's configuration: hand it pip's find-links, constraints and certificate.
pip_setting() { $VPIP config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | head -1; }
UV=()
if [ -z "${RAYDPO_SETUP_PIP:-}" ] && { [ -x .venv/bin/uv ] || $VPIP install -q uv >/dev/null 2>&1; }; then
  UV=(.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python)
  links=$(pip_setting find-links); constraint=$(pip_setting constraint); cert=$(pip_setting cert)
  for l in $links; do UV+=(--find-links "$l"); done
  [ -n "$constraint" ] && [ -f "$constraint" ] && UV+=(--constraint "$constraint")
  [ -n "$cert" ] && export SSL_CERT_FILE="$cert"
fi
# install ARGS...: with uv when it is there (falling back to pip if uv fails), else with pip
install() {
  if [ ${#UV[@]} -gt 0 ] && "${UV[@]}" "$@"; then return 0; fi
  $VPIP install -q "$@"
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found; torch comes with its CUDA build from the package index"
  else
    echo "setup: no GPU; installing the CPU build of torch $TORCH_VERSION"
    # A local wheel (pip's find-links) first; else the CPU wheel index. Its dependencies come with
    # the package below.
    install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null \
      || install --no-deps "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
echo "setup: installing raydpo$([ ${#UV[@]} -gt 0 ] && echo " with uv" || echo " with pip")"
install -e "$TARGET"
echo "setup: done (.venv)"
