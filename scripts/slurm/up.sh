#!/usr/bin/env bash
# Start a single-node Slurm cluster (with accounting) on localhost.
#
#   bash scripts/slurm/up.sh          # install what is missing, start, wait
#   bash scripts/slurm/down.sh        # stop what up.sh started
#
# Everything (configs, munge key, MariaDB data, Slurm state, logs, PID files)
# lives under $SWEEP_SLURM_DIR (default /tmp/sweep-slurm). /etc/slurm/slurm.conf
# is made a symlink to $SWEEP_SLURM_DIR/etc/slurm.conf so that plain `sinfo`,
# `sbatch`, `sacct` (and submitit) find the cluster without SLURM_CONF.
# Idempotent: when the cluster it started is already up it says so, exits 0.
set -euo pipefail

DIR=${SWEEP_SLURM_DIR:-/tmp/sweep-slurm}
CLUSTER=${SWEEP_SLURM_CLUSTER:-sweep}
PARTITION=${SWEEP_SLURM_PARTITION:-debug}
CTLD_PORT=${SWEEP_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SWEEP_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${SWEEP_SLURM_DBD_PORT:-6819}
DB_PORT=${SWEEP_SLURM_DB_PORT:-6820}
OVERSUBSCRIBE=${SWEEP_SLURM_OVERSUBSCRIBE:-4}   # jobs allowed per CPU
WAIT_S=${SWEEP_SLURM_WAIT_S:-120}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DB_PASS=sweep-slurm-local   # reachable only on 127.0.0.1

log() { printf '[slurm-up] %s\n' "$*" >&2; }
STARTED=0
die() {
    log "ERROR: $*"
    # Do not leave a half-started cluster behind (logs stay in $LOGD).
    if ((STARTED)); then stop_recorded_daemons; fi
    exit 1
}

[[ $(id -u) == 0 ]] || die "run as root (installs packages, runs the daemons as root)"

ETC=$DIR/etc RUN=$DIR/run LOGD=$DIR/log
export SLURM_CONF=$ETC/slurm.conf
mkdir -p "$DIR"
chmod 755 "$DIR"

# One up.sh at a time per directory.
exec 9>"$DIR/.lock"
flock -w 600 9 || die "another up.sh holds $DIR/.lock"

# --- helpers shared with down.sh -------------------------------------------
# shellcheck source=scripts/slurm/common.sh
source "$HERE/common.sh"

# Node usable (idle, or busy with jobs) and accounting answering.
cluster_responds() {
    local states
    states=$(timeout 10 sinfo -h -o '%t' 2>/dev/null) || return 1
    grep -qE '^(idle|mix|alloc|comp)' <<<"$states" || return 1
    timeout 10 sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1
}

# --- already up? -------------------------------------------------------------
if all_daemons_alive && cluster_responds; then
    log "cluster '$CLUSTER' is already up (state in $DIR); nothing to do"
    echo "Slurm cluster already up: partition '$PARTITION' on localhost; stop it with: bash $HERE/down.sh"
    exit 0
fi
if any_daemon_alive; then
    log "cluster is only partly up or unhealthy; restarting the daemons up.sh started before"
    stop_recorded_daemons
fi

# --- packages -----------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]} (log: $DIR/apt.log)"
    t0=$SECONDS
    # Debian's postinst scripts would start the system services: forbid that
    # (Docker-style images already have such a policy-rc.d; then it is kept).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    : >"$DIR/apt.log"
    install_pkgs() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}" >>"$DIR/apt.log" 2>&1
    }
    # `apt-get update` only when the package lists lack them or are stale.
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1 || ! install_pkgs; then
        log "apt-get update"
        apt-get update -q -o DPkg::Lock::Timeout=300 >>"$DIR/apt.log" 2>&1 || true
        install_pkgs || { tail -20 "$DIR/apt.log" >&2; die "apt-get install failed (log: $DIR/apt.log)"; }
    fi
    if [[ -e /usr/sbin/policy-rc.d ]] && trap -p EXIT | grep -q policy-rc.d; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    log "installed in $((SECONDS - t0)) s"
fi

t_start=$SECONDS
mkdir -p "$ETC" "$RUN" "$LOGD" "$DIR/state" "$DIR/spool/slurmd-localhost" "$DIR/munge"

# --- configs (regenerated on every start: hostname/CPUs may differ) ---------
ncpu=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

cat >"$ETC/slurm.conf" <<CONF
# Written by scripts/slurm/up.sh -- regenerated on each start.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job is eligible again after ~11 s.
AuthInfo=socket=$RUN/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
# Accounting through slurmdbd (sacct is what submitit polls).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For slurmdbd connections this names the munge socket (not a password).
AccountingStoragePass=$RUN/munge.socket
JobCompType=jobcomp/none
# Fast scheduling and fast kill/requeue for tests.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
JobRequeue=1
MaxArraySize=1001
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:$OVERSUBSCRIBE
CONF

cat >"$ETC/slurmdbd.conf" <<CONF
# Written by scripts/slurm/up.sh -- regenerated on each start.
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGD/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
chown root:root "$ETC/slurmdbd.conf"
chmod 600 "$ETC/slurmdbd.conf"
chmod 644 "$ETC/slurm.conf"

# Make plain client commands find this cluster (SWEEP_SLURM_LINK_CONF=0: don't;
# then clients need SLURM_CONF=$ETC/slurm.conf, e.g. for a second cluster).
if [[ ${SWEEP_SLURM_LINK_CONF:-1} == 0 ]]; then
    log "not linking /etc/slurm/slurm.conf; use: export SLURM_CONF=$ETC/slurm.conf"
elif [[ -L /etc/slurm/slurm.conf || ! -e /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
else
    log "WARNING: /etc/slurm/slurm.conf is a real file, left alone; export SLURM_CONF=$ETC/slurm.conf to use this cluster"
fi

# Start a daemon in the foreground, detached in its own session; record its PID.
start_daemon() { # name logfile cmd...
    local name=$1 out=$2
    shift 2
    STARTED=1
    setsid "$@" </dev/null >>"$out" 2>&1 9>&- &
    local pid=$!
    record_pid "$name" "$pid"
    sleep 0.2
    pid_alive "$pid" || { tail -20 "$out" >&2; die "$name exited at once (log: $out)"; }
}

wait_for() { # description seconds command...
    local what=$1 secs=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || { log "gave up waiting for $what after ${secs}s"; return 1; }
        sleep 0.3
    done
}

# --- munge ------------------------------------------------------------------
getent passwd munge >/dev/null || die "no munge user (is the munge package installed?)"
chown munge:munge "$DIR/munge"
chmod 700 "$DIR/munge"
chown munge:munge "$RUN"
chmod 755 "$RUN"
if [[ ! -s $DIR/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$DIR/munge/munge.key" --force
    else
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
fi
chown munge:munge "$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
rm -f "$RUN/munge.socket" "$RUN/munge.socket.lock"
start_daemon munged "$LOGD/munged.out" \
    setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --key-file="$DIR/munge/munge.key" --socket="$RUN/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
    --log-file="$LOGD/munged.log" --num-threads=2
wait_for munge 15 bash -c "munge -n --socket='$RUN/munge.socket' | unmunge --socket='$RUN/munge.socket'" ||
    die "munged does not answer (log: $LOGD/munged.log)"

# --- MariaDB (private instance, TCP on 127.0.0.1:$DB_PORT) --------------------
DATA=$DIR/mysql
if [[ ! -d $DATA/mysql ]]; then
    log "initialising MariaDB in $DATA"
    rm -rf "$DATA"
    mariadb-install-db --no-defaults --datadir="$DATA" --user=root \
        --auth-root-authentication-method=socket --skip-test-db >"$LOGD/mariadb-install.log" 2>&1 ||
        { tail -20 "$LOGD/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
fi
start_daemon mariadbd "$LOGD/mariadb.out" \
    mariadbd --no-defaults --user=root --datadir="$DATA" \
    --socket="$RUN/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$RUN/mariadbd.pid" --log-error="$LOGD/mariadb.log" \
    --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
    --innodb-log-file-size=64M --max-connections=100 --skip-name-resolve
# shellcheck disable=SC2120  # called with -e ... through wait_for
mysql_root() { mariadb --no-defaults --socket="$RUN/mysqld.sock" -u root "$@"; }
wait_for mariadb 60 mysql_root -e 'SELECT 1' || { tail -20 "$LOGD/mariadb.log" >&2; die "MariaDB did not come up"; }
mysql_root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# --- slurmdbd -------------------------------------------------------------------
start_daemon slurmdbd "$LOGD/slurmdbd.out" slurmdbd -D
wait_for slurmdbd 90 timeout 10 sacctmgr -n show cluster format=cluster ||
    { tail -20 "$LOGD/slurmdbd.log" >&2; die "slurmdbd does not answer"; }
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# --- slurmctld + slurmd -----------------------------------------------------------
start_daemon slurmctld "$LOGD/slurmctld.out" slurmctld -D -i
wait_for slurmctld 30 timeout 5 scontrol ping ||
    { tail -20 "$LOGD/slurmctld.log" >&2; die "slurmctld does not answer"; }
start_daemon slurmd "$LOGD/slurmd.out" slurmd -D -N localhost

# --- wait until the node is idle and sacct answers -------------------------------
end=$((SECONDS + WAIT_S))
resumed=0
until cluster_responds; do
    state=$(timeout 5 sinfo -h -n localhost -o '%t' 2>/dev/null || true)
    # A node left drained/down by an earlier run: give slurmd a few seconds to
    # register (ReturnToService=2 clears plain "down"), then resume it once.
    if [[ $state =~ ^(down|drain|drng|fail) ]] && ((!resumed && SECONDS > end - WAIT_S + 5)) && all_daemons_alive; then
        log "node is '$state'; resuming it"
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
        resumed=1
    fi
    if ((SECONDS >= end)); then
        sinfo -R >&2 || true
        tail -10 "$LOGD/slurmd.log" "$LOGD/slurmctld.log" >&2 || true
        die "node not idle after ${WAIT_S}s (logs in $LOGD)"
    fi
    all_daemons_alive || die "a daemon died while starting (logs in $LOGD)"
    sleep 0.5
done

max_array=$(scontrol show config | awk -F= '/^MaxArraySize/ {gsub(/ /, "", $2); print $2}')
log "started in $((SECONDS - t_start)) s; partition '$PARTITION' (default), $ncpu CPUs x $OVERSUBSCRIBE jobs each, MaxArraySize=$max_array; logs in $LOGD"
echo "Slurm cluster up: partition '$PARTITION' on localhost (state and logs in $DIR); stop it with: bash $HERE/down.sh"
