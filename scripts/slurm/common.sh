# Sourced by up.sh and down.sh. Needs $RUN (directory of the *.up-pid files).
# shellcheck shell=bash

# Daemons in start order; down.sh stops them in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

# True if process $1 exists and is not a zombie (an exited daemon stays a
# zombie until PID 1 reaps it, and `kill -0` still succeeds on it).
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != [ZX] ]]
}

# Start time of process $1 (clock ticks since boot): with the PID it names
# one process for good, even once the PID is reused.
pid_start_time() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    # after "comm)": state is field 3, starttime field 22
    awk '{print $20}' <<<"$stat"
}

# Record that up.sh started daemon $1 as PID $2.
record_pid() {
    echo "$2 $(pid_start_time "$2")" >"$RUN/$1.up-pid"
}

# PID recorded for daemon $1, printed only if that process is still the one
# up.sh started (same PID, start time and name).
recorded_pid() {
    local name=$1 f="$RUN/$1.up-pid" pid start comm
    [[ -s $f ]] || return 1
    read -r pid start <"$f" || true
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    pid_alive "$pid" || return 1
    [[ $(pid_start_time "$pid") == "$start" ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    # munged is started through setpriv, which execs it (same PID).
    [[ $comm == "$name" || ($name == munged && $comm == setpriv) ]] || return 1
    echo "$pid"
}

all_daemons_alive() {
    local d
    for d in "${DAEMONS[@]}"; do recorded_pid "$d" >/dev/null || return 1; done
}

any_daemon_alive() {
    local d
    for d in "${DAEMONS[@]}"; do recorded_pid "$d" >/dev/null && return 0; done
    return 1
}

# Stop the recorded daemons (reverse start order): TERM, wait, then KILL.
stop_recorded_daemons() {
    local i d pid t
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        if pid=$(recorded_pid "$d"); then
            kill -TERM "$pid" 2>/dev/null || true
            for ((t = 0; t < 100; t++)); do
                pid_alive "$pid" || break
                sleep 0.1
            done
            if pid_alive "$pid"; then
                kill -KILL "$pid" 2>/dev/null || true
                printf '[slurm] %s (pid %s) killed\n' "$d" "$pid" >&2
            else
                printf '[slurm] %s (pid %s) stopped\n' "$d" "$pid" >&2
            fi
        fi
        rm -f "$RUN/$d.up-pid"
    done
}
