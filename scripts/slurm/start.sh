#!/usr/bin/env bash
# Start a local single-node Slurm cluster (munged, private MariaDB, slurmdbd, slurmctld, slurmd) for the
# tests in tests/slurm, so that submitit can submit real jobs and read their states from sacct.
#
# Idempotent: when the cluster started by this script is already up with the same configuration, it only
# says so. Installs the Debian packages when they are missing (needs root and apt-get).
#
# Environment:
#   HKDBENCH_SLURM_DIR      state directory (default /tmp/hkdbench-slurm): database, spool, logs, pid files
#   HKDBENCH_SLURM_CPUS     CPUs the node advertises (default 4; may exceed the real count)
#   HKDBENCH_SLURM_MEM_MB   RealMemory of the node in MB (default: MemTotal)
#   HKDBENCH_SLURM_FRESH    1 (default): wipe job state and accounting database on a (re)start; 0: keep both
#   HKDBENCH_SLURM_TIMEOUT  seconds to wait for each daemon to be ready (default 60)
#   HKDBENCH_SLURM_KEEP_ON_FAILURE  1: leave the daemons running when start-up fails (default: stop them)
#
# The daemons only listen on 127.0.0.1: 6817 (slurmctld), 6818 (slurmd), 6819 (slurmdbd), 3307 (MariaDB).
# slurm.conf and slurmdbd.conf are written to /etc/slurm, where the daemons and clients (sbatch, sacct,
# scontrol, as called by submitit) find them without any environment variable.
set -euo pipefail

STATE=${HKDBENCH_SLURM_DIR:-/tmp/hkdbench-slurm}
CPUS=${HKDBENCH_SLURM_CPUS:-4}
FRESH=${HKDBENCH_SLURM_FRESH:-1}
TIMEOUT=${HKDBENCH_SLURM_TIMEOUT:-60}
CLUSTER=hkdbench
CONF_DIR=/etc/slurm
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

RUN=$STATE/run
LOG=$STATE/log
DB=$STATE/db
MUNGE_PID=/run/munge/munged.pid
DB_SOCK=$RUN/mariadb.sock
DB_USER=slurm
DB_PASS=hkdbench-local

exec 4>&2  # stderr of the script, also for die() inside readiness checks whose stderr is discarded
die() { echo "start.sh: error: $*" >&4; exit 1; }
now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

[[ $STATE == /* && $STATE != / ]] || die "HKDBENCH_SLURM_DIR must be an absolute path other than / (got '$STATE')"
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "HKDBENCH_SLURM_CPUS must be a positive integer (got '$CPUS')"
[[ $(id -u) == 0 ]] || die "must be run as root (the daemons run as root, and munged is started as user munge)"

T_ALL=$(now)

# ---------------------------------------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and apt-get is not available"
    T=$(now)
    echo "installing ${missing[*]} (apt-get) ..."
    # Package postinst scripts would start munge, mariadb (on port 3306), slurmdbd, ...: forbid it.
    TMP_POLICY=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        TMP_POLICY=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$TMP_POLICY"
        chmod 0755 "$TMP_POLICY"
        trap 'rm -f "$TMP_POLICY"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    aptlog=$(mktemp)
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } \
        </dev/null >"$aptlog" 2>&1; then
        tail -n 30 "$aptlog" >&2
        die "apt-get failed to install ${PACKAGES[*]} (full log: $aptlog)"
    fi
    rm -f "$aptlog"
    if [[ -n $TMP_POLICY ]]; then rm -f "$TMP_POLICY"; trap - EXIT; fi
    echo "packages   installed in $(elapsed "$T") s"
fi
export PATH=$PATH:/usr/sbin:/sbin
for b in munged munge unmunge mariadbd mariadb-install-db mariadb-admin mariadb slurmdbd slurmctld slurmd \
    sacctmgr scontrol sinfo sbatch sacct; do
    command -v "$b" >/dev/null || die "'$b' not found although the packages are installed"
done

# ---------------------------------------------------------------------------------------------- configs
NODE=$(hostname -s 2>/dev/null || true)
[[ -n $NODE ]] || NODE=localhost
MEM_MB=${HKDBENCH_SLURM_MEM_MB:-$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo)}

mkdir -p "$STATE/etc"
cat >"$STATE/etc/slurm.conf.new" <<EOF
# Written by scripts/slurm/start.sh (hkdbench): local single-node test cluster. State in $STATE.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire (default 120 s) before it may start again.
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# No cgroups on this machine kind: proctrack/cgroup cannot launch steps.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
Waittime=0
# submitit ignores SIGTERM: a cancelled job lives until SIGKILL after KillWait (default 30 s).
KillWait=5
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# sacct (hence submitit's job states) needs slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# CPUs and RealMemory come from this file, even beyond the hardware.
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
cat >"$STATE/etc/slurmdbd.conf.new" <<EOF
# Written by scripts/slurm/start.sh (hkdbench). Private MariaDB on 127.0.0.1:3307.
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 0600 "$STATE/etc/slurmdbd.conf.new"

# ---------------------------------------------------------------------------------------------- helpers
# A process counts as alive when it exists and is not a zombie (PID 1 here reaps orphans late).
pid_alive() {
    local pid=$1 st
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    st=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $st && $st != Z ]]
}
pidfile_alive() { [[ -r $1 ]] && pid_alive "$(tr -dc 0-9 <"$1")"; }

FAILED_LOG=
on_fail() {
    local rc=$?
    ((rc)) || return 0
    if [[ -n $FAILED_LOG && -r $FAILED_LOG ]]; then
        echo "---- last lines of $FAILED_LOG ----" >&4
        tail -n 25 "$FAILED_LOG" >&4
        echo "----" >&4
    fi
    if [[ ${HKDBENCH_SLURM_KEEP_ON_FAILURE:-0} != 1 ]]; then
        echo "start.sh: stopping what was started (set HKDBENCH_SLURM_KEEP_ON_FAILURE=1 to keep it)" >&4
        bash "$SCRIPT_DIR/stop.sh" >/dev/null 2>&1 || true
    fi
    [[ -z ${TMP_POLICY:-} ]] || rm -f "$TMP_POLICY"
}

# wait_for NAME LOGFILE PIDFILE CHECK...: polls CHECK until it succeeds; fails on timeout or daemon death.
wait_for() {
    local name=$1 log=$2 pidfile=$3 t0 deadline hint=
    shift 3
    [[ $name != mariadbd ]] || hint=${DB_HINT:-}
    t0=$(now)
    deadline=$(awk -v a="$t0" -v t="$TIMEOUT" 'BEGIN { printf "%d", a + t }')
    until "$@" >/dev/null 2>&1; do
        if [[ -n $pidfile && -r $pidfile ]] && ! pidfile_alive "$pidfile"; then
            FAILED_LOG=$log
            die "$name exited during start-up (log: $log)${hint:-}"
        fi
        if (($(date +%s) >= deadline)); then
            FAILED_LOG=$log
            die "$name not ready after ${TIMEOUT} s (log: $log)${hint:-}"
        fi
        sleep 0.05
    done
    printf '%-10s ready in %s s\n' "$name" "$(elapsed "$t0")"
}

munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping; }
dbd_ok() { timeout 5 sacctmgr -n -P list cluster format=cluster; }
ctld_ok() { timeout 5 scontrol ping | grep -q 'is UP'; }
node_state() { timeout 5 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }
node_idle() {
    local s
    s=$(node_state)
    case $s in
        idle) return 0 ;;
        drain* | down* | fail*)
            FAILED_LOG=$LOG/slurmd.log
            die "node $NODE is '$s': $(scontrol show node "$NODE" | grep -o 'Reason=.*')" ;;
    esac
    return 1
}

# ---------------------------------------------------------------------------------------------- already up?
all_ours_up() {
    pidfile_alive "$RUN/mariadb.pid" && pidfile_alive "$RUN/slurmdbd.pid" && pidfile_alive "$RUN/slurmctld.pid" &&
        pidfile_alive "$RUN/slurmd.pid" && munge_ok 2>/dev/null &&
        cmp -s "$STATE/etc/slurm.conf.new" "$CONF_DIR/slurm.conf" &&
        cmp -s "$STATE/etc/slurmdbd.conf.new" "$CONF_DIR/slurmdbd.conf"
}
if all_ours_up && ctld_ok 2>/dev/null; then
    trap on_fail EXIT
    wait_for "slurmd" "$LOG/slurmd.log" "$RUN/slurmd.pid" node_idle
    echo "slurm cluster '$CLUSTER' already running (node $NODE, state in $STATE)"
    exit 0
fi
# Anything of ours half up, or with another configuration: stop it and start afresh.
for f in mariadb slurmdbd slurmctld slurmd; do
    if pidfile_alive "$RUN/$f.pid"; then
        echo "restarting: a previous cluster is partly running or has another configuration"
        bash "$SCRIPT_DIR/stop.sh"
        break
    fi
done

trap on_fail EXIT
if [[ $FRESH == 1 ]]; then
    # The MariaDB datadir is kept (mariadb-install-db takes 1.3-6 s here); its slurm database is dropped below.
    rm -rf "$STATE/slurmctld" "$STATE/slurmd" "$STATE/run" "$STATE/log"
fi
mkdir -p "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd" "$CONF_DIR"
install -m 0644 "$STATE/etc/slurm.conf.new" "$CONF_DIR/slurm.conf"
install -m 0600 "$STATE/etc/slurmdbd.conf.new" "$CONF_DIR/slurmdbd.conf"

# ---------------------------------------------------------------------------------------------- munged
# munged refuses to run as root with the key owned by munge; /run/munge would come from systemd.
if munge_ok 2>/dev/null; then
    echo "munged     already running"
else
    [[ -r /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null 2>&1 ||
        die "/etc/munge/munge.key is missing and could not be created"
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ -r $MUNGE_PID ]] && ! pidfile_alive "$MUNGE_PID"; then rm -f "$MUNGE_PID"; fi
    T=$(now)
    runuser -u munge -- munged </dev/null >/dev/null 2>&1 4>&- || {
        FAILED_LOG=/var/log/munge/munged.log
        die "munged failed to start"
    }
    touch "$RUN/munged.ours"
    wait_for "munged" /var/log/munge/munged.log "$MUNGE_PID" munge_ok
fi

# ---------------------------------------------------------------------------------------------- mariadbd
if [[ ! -d $DB/mysql ]]; then
    T=$(now)
    mkdir -p "$DB"
    mariadb-install-db --no-defaults --user=root --datadir="$DB" --auth-root-authentication-method=socket \
        --skip-test-db </dev/null >"$LOG/mariadb-install-db.log" 2>&1 || {
        FAILED_LOG=$LOG/mariadb-install-db.log
        die "mariadb-install-db failed"
    }
    printf '%-10s initialised in %s s\n' "database" "$(elapsed "$T")"
fi
setsid mariadbd --no-defaults --user=root --datadir="$DB" --socket="$DB_SOCK" --port=3307 \
    --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" \
    --skip-log-bin --innodb-buffer-pool-size=256M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --innodb-flush-method=nosync --innodb-file-per-table=0 \
    </dev/null >/dev/null 2>&1 4>&- &
disown
DB_HINT="; if its datadir is damaged, remove $DB and run start.sh again"
wait_for "mariadbd" "$LOG/mariadb.log" "$RUN/mariadb.pid" db_ok
mariadb --no-defaults --socket="$DB_SOCK" -u root -e "
    CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL PRIVILEGES ON *.* TO '$DB_USER'@'127.0.0.1';
    GRANT ALL PRIVILEGES ON *.* TO '$DB_USER'@'localhost';" </dev/null ||
    die "could not create the database user for slurmdbd"
if [[ $FRESH == 1 ]]; then
    # Job ids restart at 1 with the wiped slurmctld state: sacct must not know older jobs with the same ids.
    mariadb --no-defaults --socket="$DB_SOCK" -u root -e "DROP DATABASE IF EXISTS slurm_acct_db" </dev/null ||
        die "could not drop the old accounting database"
fi

# ---------------------------------------------------------------------------------------------- slurmdbd
slurmdbd </dev/null >/dev/null 2>&1 4>&- || { FAILED_LOG=$LOG/slurmdbd.log; die "slurmdbd failed to start"; }
wait_for "slurmdbd" "$LOG/slurmdbd.log" "$RUN/slurmdbd.pid" dbd_ok
if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    timeout 10 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
fi

# ---------------------------------------------------------------------------------------------- slurmctld
slurmctld </dev/null >/dev/null 2>&1 4>&- || { FAILED_LOG=$LOG/slurmctld.log; die "slurmctld failed to start"; }
wait_for "slurmctld" "$LOG/slurmctld.log" "$RUN/slurmctld.pid" ctld_ok

# ---------------------------------------------------------------------------------------------- slurmd
slurmd -N "$NODE" </dev/null >/dev/null 2>&1 4>&- || { FAILED_LOG=$LOG/slurmd.log; die "slurmd failed to start"; }
wait_for "slurmd" "$LOG/slurmd.log" "$RUN/slurmd.pid" node_idle

trap - EXIT
echo "slurm cluster '$CLUSTER' up in $(elapsed "$T_ALL") s: node $NODE idle, $CPUS CPUs, partitions debug (default) and urgent; state in $STATE"
