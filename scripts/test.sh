#!/usr/bin/env bash
# Set up (venv, and Slurm + munge from Debian when running as root) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The optional W&B logger is tested too (tests/test_wandb.py, offline: no network needed).
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints-cpu.txt "wandb>=0.17"
export PATH=$PATH:/usr/sbin:/sbin
if { ! command -v slurmctld || ! command -v slurmdbd || ! command -v mariadbd || ! command -v ip \
     || ! command -v nsenter; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing Slurm (with slurmdbd), MariaDB, munge and iproute2 from Debian" \
       "(the Slurm tests run a real 2-node local cluster with accounting)"
  apt-get update -qq >/dev/null
  # Packages only: their services must not start (the cluster script starts private instances).
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd mariadb-server \
    munge iproute2 util-linux >/dev/null
  if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
fi
if [ "${CI:-}" = "true" ]; then
  # In CI a missing Slurm is a failure, not a skip.
  export MAPANYTHING_EXT_REQUIRE_SLURM=1
fi
exec .venv/bin/python -m pytest -q -ra "$@"
