#!/usr/bin/env bash
# Set up raydpo in ./.venv. `scripts/setup.sh` installs the package; `scripts/setup.sh dev` adds
# the test tools. Where no NVIDIA GPU is visible, the CPU build of torch goes in first, so the
# package's `torch` requirement is already satisfied and pip never pulls a multi-GB CUDA build.
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
if [ "${1:-}" = "dev" ]; then
  $VPIP install -q -e ".[dev]"
else
  $VPIP install -q -e .
fi
echo "setup: done (.venv)"
