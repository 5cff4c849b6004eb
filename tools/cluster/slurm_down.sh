#!/usr/bin/env bash
# Stop the daemons of tools/cluster/slurm_up.sh, each by the process id in its pid file.
#
#   tools/cluster/slurm_down.sh                  # all of them: slurmd slurmctld slurmdbd mariadbd munged
#   tools/cluster/slurm_down.sh slurmd slurmctld # only these
#
# Configuration, the database and the logs (/var/log/slurm) stay; slurm_up.sh starts everything again.
set -euo pipefail

declare -A PIDFILE=(
    [slurmd]=/run/slurm/slurmd.pid [slurmctld]=/run/slurm/slurmctld.pid [slurmdbd]=/run/slurm/slurmdbd.pid
    [mariadbd]=/run/mysqld/mysqld.pid [munged]=/run/munge/munged.pid
)
(($#)) || set -- slurmd slurmctld slurmdbd mariadbd munged

for name in "$@"; do
    [[ -n ${PIDFILE[$name]:-} ]] || { echo "slurm_down: unknown daemon $name (known: ${!PIDFILE[*]})" >&2; exit 2; }
    pid=$(cat "${PIDFILE[$name]}" 2>/dev/null) || continue
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || continue
    kill -TERM "$pid"
    for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    if [[ -d /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
    echo "slurm_down: stopped $name ($pid)"
done
