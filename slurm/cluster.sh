#!/usr/bin/env bash
# The project's own local single-node Slurm cluster (munge + slurmctld + slurmd), for tests and demos.
#
#   slurm/cluster.sh start    start it in $MAPANYTHING_EXT_SLURM_DIR (default /tmp/mapanything-ext-slurm),
#                             wait until the node is idle, print the `export SLURM_CONF=...` line
#   slurm/cluster.sh stop     stop exactly the processes it started (pid files in the state dir)
#   slurm/cluster.sh status   say whether it runs, and show sinfo
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge (as root: apt-get install -y slurmctld slurmd
# slurm-client munge). Ports are chosen free at start, so it can run beside another cluster.
set -euo pipefail
STATE=${MAPANYTHING_EXT_SLURM_DIR:-/tmp/mapanything-ext-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=$STATE/slurm.conf

need() {
  for tool in munged slurmctld slurmd sbatch sinfo scontrol; do
    command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$tool" >/dev/null 2>&1 || {
      echo "cluster.sh: '$tool' not found. Install Slurm and munge: apt-get install -y slurmctld slurmd slurm-client munge" >&2
      exit 1
    }
  done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start() {
  need
  export PATH=$PATH:/usr/sbin
  if running slurmctld && running slurmd && running munged; then
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  stop >/dev/null 2>&1 || true
  mkdir -p "$STATE"/{ctld,spool,munge}
  chmod 700 "$STATE/munge"
  [ -f "$STATE/munge/munge.key" ] || { dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$STATE/munge/munge.key"; }
  munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/munged.log" --seed-file="$STATE/munge/munged.seed"
  host=$(hostname -s)
  sed -e "s#@STATE@#$STATE#g" -e "s#@HOST@#$host#g" -e "s#@CTLD_PORT@#$(free_port)#g" \
      -e "s#@SLURMD_PORT@#$(free_port)#g" "$HERE/slurm.conf.template" > "$CONF"
  export SLURM_CONF=$CONF
  # -c: a fresh controller state every start, so no job of an earlier run is recovered.
  slurmctld -f "$CONF" -c -i
  slurmd -f "$CONF"
  for _ in $(seq 1 60); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
    if [ "$state" = "idle" ]; then
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    [ "$state" = "down" ] || [ "$state" = "drained" ] && scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "cluster.sh: node did not become idle within 60 s; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
  exit 1
}

# Our job steps: slurmstepd processes that inherited this cluster's SLURM_CONF.
our_stepds() {
  for pid in $(pgrep -f '^slurmstepd' || true); do
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF" && echo "$pid"
  done
}

stop() {
  export PATH=$PATH:/usr/sbin
  if running slurmctld; then
    # Jobs go first, so that no task outlives the cluster that ran it.
    SLURM_CONF=$CONF scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 40); do
      [ -z "$(SLURM_CONF=$CONF squeue -h -t running,completing 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  for pid in $(our_stepds); do kill -9 -- "-$pid" "$pid" 2>/dev/null || true; done
  for daemon in slurmd slurmctld munged; do
    if running "$daemon"; then
      pid=$(cat "$STATE/$daemon.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$daemon.pid"
  done
  echo "stopped"
}

status() {
  for daemon in munged slurmctld slurmd; do
    if running "$daemon"; then echo "$daemon: running (pid $(cat "$STATE/$daemon.pid"))"; else echo "$daemon: stopped"; fi
  done
  if running slurmctld; then SLURM_CONF=$CONF sinfo; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
