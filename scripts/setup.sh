#!/usr/bin/env bash
# Install tokendrop and what it needs into the current Python (use a virtualenv if you prefer:
# `python3 -m venv .venv && . .venv/bin/activate` first). Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Offline data for the demo and the tests: Debian's Fashion-MNIST package (root only; optional).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "note: could not install dataset-fashion-mnist; the demo falls back to scikit-learn's digits" >&2
fi

# PyTorch first (keeps a torch you already have; otherwise the registry's default build).
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  "$PY" -m pip install -q torch torchvision
fi
"$PY" -m pip install -q -e ".[test]"
