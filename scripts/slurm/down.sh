#!/usr/bin/env bash
# Stop the single-node Slurm cluster that scripts/slurm/up.sh started: only the
# processes whose PIDs up.sh recorded under $SWEEP_SLURM_DIR/run. Idempotent.
# State (database, job history, munge key, logs) is kept for the next up.sh;
# delete $SWEEP_SLURM_DIR to start from scratch.
set -euo pipefail
DIR=${SWEEP_SLURM_DIR:-/tmp/sweep-slurm}
RUN=$DIR/run
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/slurm/common.sh
source "$HERE/common.sh"

if [[ ! -d $RUN ]]; then
    echo "Slurm cluster not running (nothing recorded in $RUN)"
    exit 0
fi
exec 9>"$DIR/.lock"
flock -w 600 9 || { echo "[slurm-down] another up.sh/down.sh holds $DIR/.lock" >&2; exit 1; }
if ! any_daemon_alive; then
    rm -f "$RUN"/*.up-pid
    echo "Slurm cluster not running (no recorded daemon alive)"
    exit 0
fi
stop_recorded_daemons
echo "Slurm cluster stopped (state kept in $DIR)"
