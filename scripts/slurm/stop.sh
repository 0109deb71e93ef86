#!/usr/bin/env bash
# Stop the local Slurm cluster started by scripts/slurm/start.sh: cancel every job, wait (bounded) until the
# queue is empty, then stop slurmd, slurmctld, slurmdbd, mariadbd and (if start.sh started it) munged by their
# PID files. Idempotent: does nothing harmful when nothing runs.
#
# Environment: HKDBENCH_SLURM_DIR (default /tmp/hkdbench-slurm), as for start.sh;
#              HKDBENCH_SLURM_STOP_TIMEOUT seconds to wait for the queue to drain (default 30).
set -uo pipefail

STATE=${HKDBENCH_SLURM_DIR:-/tmp/hkdbench-slurm}
RUN=$STATE/run
QUEUE_TIMEOUT=${HKDBENCH_SLURM_STOP_TIMEOUT:-30}
export PATH=$PATH:/usr/sbin:/sbin

now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
T_ALL=$(now)

# Alive = exists and is not a zombie: PID 1 on this machine kind reaps orphans late (1.5-2 s).
pid_alive() {
    local pid=$1 st
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    st=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $st && $st != Z ]]
}

# ------------------------------------------------------------------------------------------ jobs
# slurmstepd outlives slurmd, so running jobs must be cancelled while the controller still answers.
if [[ -r $RUN/slurmctld.pid ]] && pid_alive "$(tr -dc 0-9 <"$RUN/slurmctld.pid")" &&
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(timeout 10 squeue -h -o %F 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        T=$(now)
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null
        deadline=$(($(date +%s) + QUEUE_TIMEOUT))
        while [[ -n $(timeout 5 squeue -h -o %i 2>/dev/null) ]]; do
            if (($(date +%s) >= deadline)); then
                echo "stop.sh: warning: jobs still in the queue after ${QUEUE_TIMEOUT} s:" >&2
                timeout 5 squeue >&2
                break
            fi
            sleep 0.2
        done
        echo "jobs       cancelled ($jobs) in $(elapsed "$T") s"
    fi
fi

# ------------------------------------------------------------------------------------------ daemons
# stop_pidfile NAME PIDFILE: SIGTERM, wait up to 15 s, then SIGKILL.
stop_pidfile() {
    local name=$1 pidfile=$2 pid t0 i
    [[ -r $pidfile ]] || return 0
    pid=$(tr -dc 0-9 <"$pidfile")
    if ! pid_alive "$pid"; then
        rm -f "$pidfile"
        return 0
    fi
    t0=$(now)
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 300; i++)); do
        pid_alive "$pid" || break
        sleep 0.05
    done
    if pid_alive "$pid"; then
        echo "stop.sh: warning: $name (pid $pid) ignored SIGTERM for 15 s, sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null
        for ((i = 0; i < 100; i++)); do
            pid_alive "$pid" || break
            sleep 0.05
        done
    fi
    rm -f "$pidfile"
    printf '%-10s stopped in %s s\n' "$name" "$(elapsed "$t0")"
}

stop_pidfile slurmd "$RUN/slurmd.pid"
stop_pidfile slurmctld "$RUN/slurmctld.pid"
stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
stop_pidfile mariadbd "$RUN/mariadb.pid"
if [[ -e $RUN/munged.ours ]]; then
    stop_pidfile munged /run/munge/munged.pid
    rm -f "$RUN/munged.ours"
fi
echo "slurm cluster stopped in $(elapsed "$T_ALL") s"
exit 0
