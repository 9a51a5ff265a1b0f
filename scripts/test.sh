#!/usr/bin/env bash
# Set up (venv, and Slurm + munge from Debian when running as root) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH=$PATH:/usr/sbin:/sbin
if { ! command -v slurmctld || ! command -v ip || ! command -v nsenter; } >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing Slurm, munge and iproute2 from Debian (the Slurm tests run a real 2-node local cluster)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
fi
if [ "${CI:-}" = "true" ]; then
  # In CI a missing Slurm is a failure, not a skip.
  export MAPANYTHING_EXT_REQUIRE_SLURM=1
fi
exec .venv/bin/python -m pytest -q -ra "$@"
