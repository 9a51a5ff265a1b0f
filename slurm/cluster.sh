#!/usr/bin/env bash
# The project's own local Slurm cluster (munge + slurmctld + slurmd), for tests and demos.
#
#   slurm/cluster.sh start [--nodes N] [--no-accounting]
#                                        start it, wait until every node is idle, print the lines to
#                                        `eval` (export SLURM_CONF=..., and with N > 1 SLURM_NETNS=...)
#   slurm/cluster.sh stop                stop exactly what it started; remove every namespace, link
#                                        and /etc/hosts line it added
#   slurm/cluster.sh status              say whether it runs, and show sinfo
#
# --nodes 1 (default): one slurmd on this host, everything on 127.0.0.1.
# --nodes N > 1: N simulated hosts on this machine. The controller and each node get a network
# namespace of their own (maext-<tag>-ctl, maext-<tag>-n1 ...), joined by a bridge that lives in
# the controller's namespace, with private addresses 10.213.<k>.0/24 that exist only inside those
# namespaces; names go into /etc/hosts (marked, removed by stop). Each slurmd runs as
#   nsenter --net=<node ns> unshare --uts sh -c 'hostname <node>; slurmd -f <conf>'
# (`ip netns exec` remounts /sys, and slurmd then misses its cgroup mount). Slurm clients (sbatch,
# squeue, our launchers) must run inside the controller's namespace:
#   nsenter --net=/var/run/netns/$SLURM_NETNS <command>
#
# Accounting, as real clusters keep it (unless --no-accounting): a private MariaDB server
# (mariadb-install-db into the state dir, mariadbd on a free port of the controller's loopback) and
# slurmdbd, which reads the slurmdbd.conf (mode 600) beside $SLURM_CONF; sacct then reports job
# states (COMPLETED, FAILED, REQUEUED, TIMEOUT, ...) and requeues. Needs Debian's mariadb-server and
# slurmdbd.
#
# State lives in $MAPANYTHING_EXT_SLURM_DIR (default /tmp/mapanything-ext-slurm-<uid>), created
# mode 700 and marked as ours; a directory we did not create, or a munge key we did not make,
# is never used. Needs Debian's slurmctld, slurmd, slurm-client, munge (and iproute2,
# util-linux for N > 1), run as root. Ports are chosen free at start.
set -euo pipefail
STATE=${MAPANYTHING_EXT_SLURM_DIR:-/tmp/mapanything-ext-slurm-$(id -u)}
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=$STATE/slurm.conf
MARK=$STATE/.made-by-mapanything-ext-cluster
TAG=$(printf '%s' "$STATE" | sha1sum | cut -c1-4)
NET=10.213.$(( 16#$TAG % 200 + 20 ))
CTL_NS=maext-$TAG-ctl
export PATH=$PATH:/usr/sbin:/sbin

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || {
      echo "cluster.sh: '$tool' not found. Install: apt-get install -y slurmctld slurmd slurm-client munge iproute2 util-linux" >&2
      exit 1
    }
  done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

running() { [ -f "$STATE/$1.pid" ] && ours "$(cat "$STATE/$1.pid")"; }

# A pid is ours when that process runs with this state folder in its command line or environment
# (every daemon here is started so): a pid file can name any process, and stop must kill only ours.
ours() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && grep -qaF -- "$STATE" "/proc/$1/cmdline" "/proc/$1/environ" 2>/dev/null; }

# The state folder holds the munge key and the database password, and its pid files say what stop
# kills: it must be this user's alone. Refuse one reached through a symbolic link, owned by someone
# else, or writable by group or others, and a munge key this script did not make (ours: mode 400).
check_state_dir() {
  [ -e "$STATE" ] || [ -L "$STATE" ] || return 0
  local why="" key=$STATE/munge/munge.key
  if [ -L "$STATE" ]; then why="it is a symbolic link"
  elif [ "$(stat -c %u "$STATE")" != "$(id -u)" ]; then why="it belongs to uid $(stat -c %u "$STATE"), not to you"
  elif [ $((0$(stat -c %a "$STATE") & 022)) -ne 0 ]; then why="group or others may write it (mode $(stat -c %a "$STATE"))"
  elif [ -f "$MARK" ] && [ "$(stat -c %u "$MARK")" != "$(id -u)" ]; then why="its marker file is not yours"
  elif [ -e "$key" ] && { [ -L "$key" ] || [ "$(stat -c %u "$key")" != "$(id -u)" ] || [ "$(stat -c %a "$key")" != 400 ]; }; then
    why="its munge key was not made by this script (owner $(stat -c %U "$key"), mode $(stat -c %a "$key"))"
  fi
  if [ -n "$why" ]; then
    echo "cluster.sh: refusing the state folder $STATE: $why. Remove it (as its owner) or set" \
         "MAPANYTHING_EXT_SLURM_DIR to a new folder." >&2
    exit 1
  fi
}

nodes_of() { [ -f "$STATE/nodes" ] && cat "$STATE/nodes" || echo 1; }

node_name() { if [ "$(nodes_of)" -gt 1 ]; then echo "maext-$TAG-n$1"; else hostname -s; fi; }

# Run a Slurm client where it reaches the controller.
client() {
  if [ "$(nodes_of)" -gt 1 ]; then nsenter --net="/var/run/netns/$CTL_NS" "$@"; else "$@"; fi
}

make_state_dir() {
  # slurmstepd makes Unix sockets named <spool>/<node>/<node>_<job>.<step> (at most 108 bytes).
  local longest="$STATE/spool/maext-$TAG-n99/maext-$TAG-n99_9999999.4294967291"
  if [ "${#longest}" -gt 107 ]; then
    echo "cluster.sh: the state folder path $STATE is too long for Slurm's socket names (${#longest} > 107" \
         "bytes); set MAPANYTHING_EXT_SLURM_DIR to a shorter path" >&2
    exit 1
  fi
  if [ -e "$STATE" ] && [ ! -f "$MARK" ]; then
    echo "cluster.sh: $STATE exists but was not made by this script; refusing to use it (or its munge key)." \
         "Remove it or set MAPANYTHING_EXT_SLURM_DIR to a new folder." >&2
    exit 1
  fi
  (umask 077; mkdir -p "$STATE"/{ctld,spool,munge})
  chmod 700 "$STATE"
  touch "$MARK"
  if [ ! -f "$STATE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
  fi
}

make_network() {
  local n=$1 i
  need ip nsenter unshare
  ip netns add "$CTL_NS"
  ip -n "$CTL_NS" link set lo up
  ip -n "$CTL_NS" link add "mx$TAG-br" type bridge
  ip -n "$CTL_NS" addr add "$NET.1/24" dev "mx$TAG-br"
  ip -n "$CTL_NS" link set "mx$TAG-br" up
  echo "$NET.1 maext-$TAG-ctl # maext-$TAG" >> /etc/hosts
  for i in $(seq 1 "$n"); do
    ip netns add "maext-$TAG-n$i"
    ip -n "maext-$TAG-n$i" link set lo up
    # Both ends are made inside namespaces of ours: nothing is added to the host's own network.
    ip -n "$CTL_NS" link add "mx$TAG-p$i" type veth peer name "mx$TAG-e$i" netns "maext-$TAG-n$i"
    ip -n "$CTL_NS" link set "mx$TAG-p$i" master "mx$TAG-br" up
    ip -n "maext-$TAG-n$i" addr add "$NET.$((10 + i))/24" dev "mx$TAG-e$i"
    ip -n "maext-$TAG-n$i" link set "mx$TAG-e$i" up
    echo "$NET.$((10 + i)) maext-$TAG-n$i # maext-$TAG" >> /etc/hosts
  done
}

remove_network() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^maext-$TAG-" || true); do
    ip netns delete "$ns" 2>/dev/null || true
  done
  if grep -q "# maext-$TAG\$" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file.
    grep -v "# maext-$TAG\$" /etc/hosts > "$STATE/hosts.kept" || true
    cat "$STATE/hosts.kept" > /etc/hosts
    rm -f "$STATE/hosts.kept"
  fi
}

write_conf() {
  local n=$1 accounting=$2 ctld_host ctld_addr node_lines i dbd_port acct
  if [ "$n" -gt 1 ]; then
    ctld_host=$CTL_NS; ctld_addr=$NET.1
    node_lines=""
    for i in $(seq 1 "$n"); do
      node_lines+="NodeName=maext-$TAG-n$i NodeAddr=$NET.$((10 + i)) CPUs=8 RealMemory=16000 State=UNKNOWN"$'\n'
    done
    nodes="maext-$TAG-n[1-$n]"
  else
    ctld_host=$(hostname -s); ctld_addr=127.0.0.1
    node_lines="NodeName=$ctld_host NodeAddr=127.0.0.1 CPUs=8 RealMemory=16000 State=UNKNOWN"$'\n'
    nodes=$ctld_host
  fi
  if [ "$accounting" = 1 ]; then
    dbd_port=$(free_port)
    acct="AccountingStorageType=accounting_storage/slurmdbd"$'\n'"AccountingStorageHost=$ctld_host"
    acct+=$'\n'"AccountingStoragePort=$dbd_port"$'\n'"JobAcctGatherType=jobacct_gather/linux"
    acct+=$'\n'"JobAcctGatherFrequency=30"
    # For slurmdbd connections, AccountingStoragePass names the munge socket (ours, not the system's).
    acct+=$'\n'"AccountingStoragePass=$STATE/munge/munge.socket"
    write_dbd_conf "$ctld_host" "$ctld_addr" "$dbd_port"
  else
    acct="AccountingStorageType=accounting_storage/none"$'\n'"JobAcctGatherType=jobacct_gather/none"
  fi
  python3 - "$HERE/slurm.conf.template" "$CONF" <<EOF
import sys
text = open(sys.argv[1]).read()
for key, value in {"@STATE@": "$STATE", "@CTLD_HOST@": "$ctld_host", "@CTLD_ADDR@": "$ctld_addr",
                   "@CTLD_PORT@": "$(free_port)", "@SLURMD_PORT@": "$(free_port)", "@NODES@": "$nodes",
                   "@NODE_LINES@": """$node_lines""".rstrip("\n"), "@ACCOUNTING@": """$acct"""}.items():
    text = text.replace(key, value)
open(sys.argv[2], "w").write(text)
EOF
}

DB_USER=slurm
DB_NAME=slurm_acct_db

write_dbd_conf() {
  local host=$1 addr=$2 port=$3
  free_port > "$STATE/mariadb.port"
  # A password of this cluster's own: the server listens only on the controller's loopback.
  [ -f "$STATE/mariadb.pass" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$STATE/mariadb.pass")
  (umask 077; cat > "$STATE/slurmdbd.conf" <<EOF
# Written by slurm/cluster.sh: slurmdbd of the local test cluster (it reads this file beside SLURM_CONF).
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
DbdHost=$host
DbdAddr=$addr
DbdPort=$port
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$(cat "$STATE/mariadb.port")
StorageUser=$DB_USER
StoragePass=$(cat "$STATE/mariadb.pass")
StorageLoc=$DB_NAME
EOF
)
  chmod 600 "$STATE/slurmdbd.conf"
}

# A daemon that checks its host name (slurmctld, slurmdbd): with N > 1 inside the controller's
# namespace, with the controller's host name.
as_controller() {
  if [ "$(nodes_of)" -gt 1 ]; then
    nsenter --net="/var/run/netns/$CTL_NS" unshare --uts sh -c "hostname $CTL_NS; exec $*"
  else
    sh -c "exec $*"
  fi
}

start_accounting() {
  need mariadbd mariadb-install-db mariadb slurmdbd sacctmgr
  local port sock=$STATE/mariadb.sock
  port=$(cat "$STATE/mariadb.port")
  if [ ! -d "$STATE/mariadb" ]; then
    mariadb-install-db --user=root --datadir="$STATE/mariadb" --auth-root-authentication-method=socket \
      --skip-test-db > "$STATE/mariadb-install.log" 2>&1 || {
      echo "cluster.sh: mariadb-install-db failed; see $STATE/mariadb-install.log" >&2; exit 1; }
  fi
  client mariadbd --user=root --datadir="$STATE/mariadb" --socket="$sock" --port="$port" \
    --bind-address=127.0.0.1 --pid-file="$STATE/mariadbd.pid" --log-error="$STATE/mariadbd.log" \
    --skip-name-resolve > /dev/null 2>&1 &
  for _ in $(seq 1 120); do [ -S "$sock" ] && break; sleep 0.25; done
  [ -S "$sock" ] || { echo "cluster.sh: MariaDB did not start; see $STATE/mariadbd.log" >&2; exit 1; }
  mariadb --socket="$sock" -u root <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$(cat "$STATE/mariadb.pass")';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
EOF
  as_controller "env SLURM_CONF=$CONF slurmdbd"
  for _ in $(seq 1 120); do
    SLURM_CONF=$CONF client sacctmgr -n list cluster >/dev/null 2>&1 && break
    sleep 0.25
  done
  SLURM_CONF=$CONF client sacctmgr -i add cluster maext >/dev/null 2>&1 || true
}

start_daemons() {
  local n=$1 i node
  munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/munged.log" --seed-file="$STATE/munge/munged.seed"
  export SLURM_CONF=$CONF
  if [ -f "$STATE/slurmdbd.conf" ]; then start_accounting; fi
  # -c: a fresh controller state every start, so no job of an earlier run is recovered.
  as_controller "slurmctld -f $CONF -c -i"
  if [ "$n" -gt 1 ]; then
    for i in $(seq 1 "$n"); do
      node=maext-$TAG-n$i
      mkdir -p "$STATE/spool/$node"
      nsenter --net="/var/run/netns/$node" unshare --uts sh -c "hostname $node; exec slurmd -f $CONF"
    done
  else
    mkdir -p "$STATE/spool/$(hostname -s)"
    slurmd -f "$CONF"
  fi
}

env_lines() {
  echo "export SLURM_CONF=$CONF"
  if [ "$(nodes_of)" -gt 1 ]; then echo "export SLURM_NETNS=$CTL_NS"; fi
}

start() {
  local n=1 accounting=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) n=$2; shift 2 ;;
      --nodes=*) n=${1#--nodes=}; shift ;;
      --no-accounting) accounting=0; shift ;;
      *) echo "cluster.sh start: unknown option $1" >&2; exit 2 ;;
    esac
  done
  need munged slurmctld slurmd sbatch sinfo scontrol
  if running slurmctld && running munged && [ "$(nodes_of)" = "$n" ]; then
    env_lines
    return 0
  fi
  [ -d "$STATE" ] && stop >/dev/null 2>&1 || true
  make_state_dir
  echo "$n" > "$STATE/nodes"
  rm -f "$STATE/slurmdbd.conf"
  if [ "$n" -gt 1 ]; then make_network "$n"; fi
  write_conf "$n" "$accounting"
  start_daemons "$n"
  for _ in $(seq 1 90); do
    # One line per node and partition: count nodes, not lines.
    idle=$(SLURM_CONF=$CONF client sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | grep -c ' idle$' || true)
    if [ "$idle" = "$n" ]; then
      env_lines
      return 0
    fi
    SLURM_CONF=$CONF client sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | awk '$2 ~ /down|drain/ {print $1}' | while read -r node; do
      SLURM_CONF=$CONF client scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
    done
    sleep 1
  done
  echo "cluster.sh: $n node(s) did not become idle within 90 s; see $STATE/slurmctld.log and $STATE/slurmd.*.log" >&2
  exit 1
}

# Our job steps: slurmstepd processes that inherited this cluster's SLURM_CONF.
our_stepds() {
  for pid in $(pgrep -f '^slurmstepd' || true); do
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF" && echo "$pid"
  done
}

stop() {
  if running slurmctld; then
    # Jobs go first, so that no task outlives the cluster that ran it.
    SLURM_CONF=$CONF client scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 40); do
      [ -z "$(SLURM_CONF=$CONF client squeue -h -t running,completing 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  for pid in $(our_stepds); do kill -9 -- "-$pid" "$pid" 2>/dev/null || true; done
  for pidfile in "$STATE"/slurmd.*.pid "$STATE/slurmctld.pid" "$STATE/slurmdbd.pid" "$STATE/mariadbd.pid" \
                 "$STATE/munged.pid"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if ! ours "$pid"; then rm -f "$pidfile"; continue; fi  # gone, or not a process of this cluster
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  remove_network
  echo "stopped"
}

status() {
  echo "state: $STATE ($(nodes_of) node(s))"
  for daemon in munged slurmctld slurmdbd mariadbd; do
    if running "$daemon"; then echo "$daemon: running (pid $(cat "$STATE/$daemon.pid"))"; else echo "$daemon: stopped"; fi
  done
  for pidfile in "$STATE"/slurmd.*.pid; do
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && echo "$(basename "$pidfile" .pid): running"
  done
  if [ -f "$STATE/slurmdbd.conf" ]; then echo "accounting: slurmdbd + MariaDB"; else echo "accounting: none"; fi
  if running slurmctld; then SLURM_CONF=$CONF client sinfo -N; fi
}

cmd=${1:-}
shift || true
check_state_dir
case "$cmd" in
  start) start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [--nodes N] [--no-accounting]|stop|status" >&2; exit 2 ;;
esac
