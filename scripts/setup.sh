#!/usr/bin/env bash
# Install tokendrop and what it needs into the current Python (use a virtualenv if you prefer:
# `python3 -m venv .venv && . .venv/bin/activate` first). Idempotent: a second run installs nothing.
# A PyTorch already installed in the tested range (pyproject.toml) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Offline data for the demo and the tests: Debian's Fashion-MNIST package (root only; optional).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's dataset-fashion-mnist (30 MB, offline data for the demo and tests)" >&2
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "setup: could not install dataset-fashion-mnist; the demo falls back to scikit-learn's digits" >&2
fi

have=$("$PY" -c "import torch, torchvision; print(torch.__version__)" 2>/dev/null || true)
if [ -z "$have" ]; then
  echo "setup: installing PyTorch and torchvision from PyPI (the Linux wheels bundle CUDA: about 3 GB to" \
       "download, 5.5 GB on disk; a few minutes) and then tokendrop's other dependencies" >&2
else
  echo "setup: keeping the installed PyTorch $have if it is in the tested range (pyproject.toml), else pip replaces it" >&2
fi
"$PY" -m pip install --progress-bar off -e ".[test]" 2>&1 | { grep -vE "^(Requirement already satisfied|WARNING: Location)" || true; }
"$PY" -c "import tokendrop, torch, torchvision, timm; print(f'setup: tokendrop {tokendrop.__version__} ready (torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__})')" >&2
