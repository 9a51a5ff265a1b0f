#!/usr/bin/env bash
# Set up .venv, then run the demo: synthetic OPV2V data -> Stage 1 (compact model, CPU) -> evaluation.
# Extra arguments go to `python -m mapanything_ext.demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mapanything_ext.demo "$@"
