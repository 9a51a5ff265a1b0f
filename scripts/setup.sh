#!/usr/bin/env bash
# Create .venv in the checkout and install the package with its pinned dependencies.
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ -f "$stamp" ] && .venv/bin/python -c "import mapanything_ext, torch, hydra, submitit" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating .venv and installing mapanything-ext (torch 2.13.0 CPU build, hydra, submitit, ...)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: an unpinned resolver run may choose a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
rm -f .venv/.installed-*
touch "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
