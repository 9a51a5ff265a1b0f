#!/usr/bin/env bash
# Create .venv in the checkout and install the package with its pinned dependencies.
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.installed-$(cat pyproject.toml scripts/constraints-cpu.txt | sha1sum | cut -c1-12)
if [ -f "$stamp" ] && .venv/bin/python -c "import mapanything_ext, torch, hydra, submitit" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating .venv and installing mapanything-ext (torch 2.13.0 CPU build, hydra, submitit, ...)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch pinned by a constraints file (not by the package): an unpinned resolver run may choose a
# multi-GB CUDA build. On a GPU cluster, install the package into the site's environment instead
# (pip install -e .): its torch range keeps the site's CUDA torch.
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints-cpu.txt -e ".[dev]"
rm -f .venv/.installed-*
touch "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
