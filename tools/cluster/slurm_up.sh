#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine (localhost), with job accounting, for the tests and
# for trying the Slurm launch path by hand (docs/launching.md, "Slurm on this machine").
#
#   tools/cluster/slurm_up.sh          # install (first time only), configure, start; ends when the node is idle
#   tools/cluster/slurm_up.sh --force  # also replace a slurm.conf / slurmdbd.conf it did not write (a copy is kept)
#   tools/cluster/slurm_down.sh        # stop every daemon this script starts
#
# Debian/Ubuntu, as root (or with password-less sudo). Pieces, in start order:
#   munged      authentication between the Slurm daemons and commands (Debian's /etc/munge/munge.key)
#   mariadbd    the accounting database (TorchX reads job states with `sacct`, which needs accounting)
#   slurmdbd    the accounting daemon, on the database (user `slurm` logs in through its unix socket: no password)
#   slurmctld   the controller; cluster `bahe`, partition `local` (the slurm-local profile of torchx.yaml)
#   slurmd      the one compute node: this host (`hostname -s`), all its CPUs, 90% of its memory
# Every daemon listens on this host's loopback address only (the one its name resolves to, 127.0.0.1 or
# Debian's 127.0.1.1: Slurm's CommunicationParameters=NoCtldInAddrAny,NoInAddrAny bind there, not to
# 0.0.0.0); the script checks ports 6817-6819 after the start. /etc/slurm/slurm.conf and slurmdbd.conf are
# written by this script: one it did not write is refused (--force replaces it), and every file it replaces
# is kept beside it as FILE.bak-DATE.
# Idempotent: a rerun with everything up changes nothing; a dead daemon is started again; a changed
# configuration restarts the daemons that read it. On failure it prints one line saying what failed and
# which log to read, stops what it started, and exits 1.
set -euo pipefail

CLUSTER=bahe
PARTITION=local
PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)
NODE=$(hostname -s)
CPUS=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
CONF=/etc/slurm
LOGS=/var/log/slurm
RUN=/run/slurm
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
FORCE=0

if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
if [[ $EUID -ne 0 ]]; then  # first, before anything is read: the one line a user without root sees
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then exec sudo -n bash "$0" "$@"; fi
    echo "slurm_up: FAILED: needs root (apt-get, daemons in /etc and /run): run it as root or with password-less sudo" >&2
    exit 1
fi
# shellcheck source=tools/cluster/slurm_lib.sh
[[ -r $SCRIPT_DIR/slurm_lib.sh ]] || { echo "slurm_up: FAILED: $SCRIPT_DIR/slurm_lib.sh is missing (run" \
    "the script from tools/cluster/ of the repository)" >&2; exit 1; }
source "$SCRIPT_DIR/slurm_lib.sh"
for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        *) fail "unknown argument $arg (known: --force, --help)" ;;
    esac
done

# ---- packages ---------------------------------------------------------------------------------------
missing=()
for cmd in munged mariadbd slurmdbd slurmctld slurmd sinfo sacct; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    install_packages "${PACKAGES[@]}"
fi

# The address every daemon listens on: the loopback address this host's name resolves to (Slurm's
# NoInAddrAny binds slurmd and slurmdbd to what gethostname() resolves to, so it must be this one).
ADDR=$(loopback_address "$NODE")
[[ -n $ADDR ]] || fail "this host's name $NODE resolves to $(getent ahostsv4 "$NODE" | awk 'NR == 1 {print $1}'), not" \
    "a loopback address, and the daemons would listen there: add '127.0.1.1 $NODE' to /etc/hosts (Debian's default)"

# ---- configuration ----------------------------------------------------------------------------------
install -d -o slurm -g slurm "$LOGS" "$RUN" /var/lib/slurm/slurmctld
install -d /var/lib/slurm/slurmd "$CONF"
install -d -o mysql -g mysql /run/mysqld
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge

write_conf "$CONF/slurm.conf" root 0644 <<EOF
$MARKER
# A one-node cluster on this host, with accounting in slurmdbd; every daemon listens on $ADDR only.
ClusterName=$CLUSTER
SlurmctldHost=$NODE($ADDR)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in containers: processes are tracked through /proc, tasks are not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ADDR
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
NodeName=$NODE NodeAddr=$ADDR CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

write_conf "$CONF/slurmdbd.conf" slurm 0600 <<EOF
$MARKER
# The database user \`slurm\` logs in through MariaDB's unix socket; slurmdbd listens on $ADDR only.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=$ADDR
CommunicationParameters=NoInAddrAny
SlurmUser=slurm
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF

# ---- daemons ----------------------------------------------------------------------------------------
# running PIDFILE NAME: the pid file names a live process called NAME.
running() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}
# wait_for SECONDS COMMAND...: retry COMMAND every 0.2 s until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) || return 1; sleep 0.2; done
}
# restart_if_changed NAME CONFIG...: stop daemon NAME when one of its configuration files was rewritten.
restart_if_changed() {
    local name=$1; shift
    for f in "$@"; do
        if [[ $CHANGED == *" $f "* ]]; then bash "$SCRIPT_DIR/slurm_down.sh" "$name" >/dev/null; return; fi
    done
}

[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key >/dev/null \
    || fail "creating /etc/munge/munge.key"
chown munge:munge /etc/munge/munge.key && chmod 0600 /etc/munge/munge.key
if ! running /run/munge/munged.pid munged; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force </dev/null || fail "munged did not start (see /var/log/munge/munged.log)"
    STARTED+=(munged)
fi
wait_for 10 bash -c 'munge -n | unmunge' || fail "munge does not answer (see /var/log/munge/munged.log)"

[[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOGS/mariadb.log" 2>&1 \
    || fail "initialising the database in /var/lib/mysql (see $LOGS/mariadb.log)"
if ! running /run/mysqld/mysqld.pid mariadbd; then
    say "starting mariadbd"
    setsid mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --innodb-buffer-pool-size=32M \
        --log-error="$LOGS/mariadb.log" </dev/null >/dev/null 2>&1 &
    STARTED+=(mariadbd)
fi
wait_for 60 mariadb-admin ping || fail "mariadbd does not answer (see $LOGS/mariadb.log)"
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || fail "creating the database user slurm"

restart_if_changed slurmdbd slurmdbd.conf
if ! running "$RUN/slurmdbd.pid" slurmdbd; then
    say "starting slurmdbd"
    slurmdbd </dev/null >/dev/null 2>&1 || fail "slurmdbd did not start (see $LOGS/slurmdbd.log)"
    STARTED+=(slurmdbd)
fi
wait_for 60 sacctmgr -n list cluster || fail "slurmdbd does not answer (see $LOGS/slurmdbd.log)"
if [[ -z $(sacctmgr -n -P list cluster where name="$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "registering cluster $CLUSTER with slurmdbd"
fi

restart_if_changed slurmctld slurm.conf
restart_if_changed slurmd slurm.conf
if ! running "$RUN/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    slurmctld </dev/null >/dev/null 2>&1 || fail "slurmctld did not start (see $LOGS/slurmctld.log)"
    STARTED+=(slurmctld)
fi
wait_for 30 scontrol ping || fail "slurmctld does not answer (see $LOGS/slurmctld.log)"
if ! running "$RUN/slurmd.pid" slurmd; then
    say "starting slurmd"
    slurmd </dev/null >/dev/null 2>&1 || fail "slurmd did not start (see $LOGS/slurmd.log)"
    STARTED+=(slurmd)
fi

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null; }
node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
if ! wait_for 30 node_ready; then
    # A node marked down or drained by an earlier run of the daemons: it is healthy now, so resume it.
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    wait_for 30 node_ready || fail "node $NODE is '$(node_state)', not idle (see $LOGS/slurmd.log and $LOGS/slurmctld.log)"
fi
sacct -n -X -S now >/dev/null 2>&1 || fail "sacct cannot read the accounting (see $LOGS/slurmdbd.log)"
check_loopback_only "${SLURM_PORTS[@]}"
say "cluster $CLUSTER up on $ADDR: node $NODE ($CPUS CPUs, ${MEM_MB} MB) $(node_state) in partition $PARTITION${STARTED:+; started ${STARTED[*]}}"
