"""What every run of a sweep is doing, from its files and the scheduler's word; works after the launcher is gone.

States:
  completed  result.json says so
  pruned     result.json says so: a `sweep tune` trial's pruner stopped the run early
  failed     result.json says so (with the trainer's reason), or the scheduler ended the run's job (cancelled,
             timed out, out of memory, node failure) before a result was written
  running    the scheduler runs the run's job, or (no scheduler job) the run's heartbeat is fresh
  requeued   the scheduler holds a job that was preempted / timed out / requeued and will resume it
  stale      it was running, but its heartbeat stopped and no scheduler job is alive: relaunch to resume
  pending    submitted and queued, or not started yet (also a failed or stale run that a local launch, still
             going on this machine, is to train again)

When a run has a Slurm job, the scheduler decides before the heartbeat does, so a cancelled job shows as failed
at the next `sweep status`, not once its heartbeat goes stale. The scheduler is asked once per call: `squeue`
(the controller's current view, which includes jobs that ended in the last minutes) and, for jobs it no longer
knows, `sacct` (the accounting history). When either gives no answer, `sweep status` warns and reads the run
folders alone; `sweep launch` launches nothing while squeue is silent (a queued job would look like none).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sweep.record import one_line, read_status, result_mtime
from sweep.results import LOCK_FILE, held_elsewhere
from sweep.settings import ConfigError

STALE_AFTER_S = 60.0  # heartbeats come every 10 s; six missed ones mean the process is gone
STATES = ("completed", "failed", "pruned", "running", "requeued", "stale", "pending")
SCHEDULER_FAILED = ("CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                    "PREEMPTED", "REVOKED")
SCHEDULER_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                   "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED")


# ------------------------------------------------------------------------------------------------- the manifest

def find_manifests(path: Path) -> list[Path]:
    """PATH is a sweep directory (with manifest.json) or a results directory holding sweeps."""
    if (path / "manifest.json").exists():
        return [path / "manifest.json"]
    return sorted(p for p in path.glob("*/manifest.json"))


def read_manifest(path: Path) -> dict[str, Any]:
    """A sweep's manifest.json (written atomically by `sweep launch`); ConfigError if it is not one."""
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError("manifest.json", f"unreadable ({one_line(err, 80)}); move it aside and relaunch the grid "
                          f"to write a new one", path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), dict):
        raise ConfigError("manifest.json", "is not a sweep manifest (no 'runs' mapping)", path)
    if not isinstance(manifest.setdefault("launches", []), list):
        raise ConfigError("launches", "is not a list; move manifest.json aside and relaunch the grid to write a new "
                          "one", path)
    for run_id, entry in manifest["runs"].items():
        if isinstance(entry, dict) and not isinstance(entry.get("jobs", []), list):
            raise ConfigError(f"runs.{run_id}.jobs", "is not a list; move manifest.json aside and relaunch the "
                              "grid to write a new one", path)
    manifest.setdefault("sweep", path.parent.name)
    return manifest


def jobs_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every job ever submitted for a run of the manifest, oldest first (manifests before job histories kept
    only the latest, under `job`)."""
    jobs = entry.get("jobs")
    if jobs is None:
        jobs = [entry["job"]] if entry.get("job") else []
    return [j for j in jobs if isinstance(j, dict) and j.get("job_id")]


def latest_slurm_job(entry: dict[str, Any]) -> str | None:
    jobs = jobs_of(entry)
    return jobs[-1]["job_id"] if jobs and jobs[-1].get("executor") == "slurm" else None


# ------------------------------------------------------------------------------------------------ the scheduler

def _expand_tasks(array: str, spec: str) -> list[str]:
    """'0-9:2,12%4' -> ['<array>_0', '<array>_2', ..., '<array>_12'] (task ranges with optional steps)."""
    tasks = []
    for part in spec.split("%")[0].split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if not match:
            continue
        lo, hi, step = int(match.group(1)), int(match.group(2) or match.group(1)), int(match.group(3) or 1)
        tasks += [f"{array}_{t}" for t in range(lo, hi + 1, max(1, step))]
    return tasks


def parse_scheduler_lines(text: str, columns: tuple[str, ...] = ("job", "state", "exit_code", "reason")
                          ) -> dict[str, dict[str, str]]:
    """'|'-separated lines (squeue --format, sacct --parsable2) with `columns` -> job id -> state info.

    A pending array may come as one line for many tasks (`12_[0-9:2,15%4]`); it is expanded. Later lines replace
    earlier ones (sacct lists a requeued job's runs oldest first)."""
    states: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|", len(columns) - 1)
        if len(parts) < len(columns):
            continue
        row = dict(zip(columns, (p.strip() for p in parts)))
        if not row["state"]:
            continue
        info = {"state": row["state"].split()[0].rstrip("+"), "detail": row["state"],
                "reason": row.get("reason", ""), "exit_code": row.get("exit_code", ""),
                "ended": bool(re.match(r"\d{4}-", row.get("end", "")))}
        pending = re.fullmatch(r"(\d+)_\[(.+)\]", row["job"])
        for task in _expand_tasks(pending.group(1), pending.group(2)) if pending else [row["job"]]:
            states[task] = info
    return states


def _call(cmd: list[str]) -> tuple[str | None, str]:
    """(its output, "") or (None, why it gave none, in one line)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, f"{cmd[0]} did not answer in 60 s"
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{cmd[0]}: {one_line(str(err))}"
    said = next((line.strip() for line in out.stderr.splitlines() if line.strip()), f"exit code {out.returncode}")
    if out.returncode == 0 or "Invalid job id" in said:  # older squeue: every job asked about has left its memory
        return out.stdout, ""
    return None, f"{cmd[0]} failed: {said}"


def scheduler_states(job_ids: list[str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """job id -> {state, detail, reason, exit_code} for the given Slurm jobs (array tasks `123_4` or plain ids), and
    command -> why it gave no answer (`squeue`: the controller is down; `sacct`: accounting is).

    One squeue call (every task of the jobs' arrays, including those that ended minutes ago, straight from the
    controller); one sacct call only for jobs squeue no longer knows. Jobs neither knows are absent."""
    if not job_ids or not shutil.which("squeue"):
        return {}, {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    out, failed = _call(["squeue", "--noheader", "--array", "--states=all", "--jobs", ",".join(arrays),
                         "--format=%i|%T|%e|%r"])
    unanswered = {"squeue": failed} if failed else {}
    states = parse_scheduler_lines(out or "", ("job", "state", "end", "reason"))
    missing = sorted({j.split("_")[0] for j in job_ids if j not in states})
    if missing and shutil.which("sacct"):
        out, failed = _call(["sacct", "--allocations", "--noheader", "--parsable2", "--jobs", ",".join(missing),
                             "--format=JobID,State,ExitCode,Reason"])
        unanswered.update({"sacct": failed} if failed else {})
        for job, info in parse_scheduler_lines(out or "").items():
            states.setdefault(job, info)
    return states, unanswered


# reasons a pending job gives that no wait clears: the request itself does not fit (too many CPUs for a node, a
# time or size over the partition's or QOS's per-job limit, an account or QOS not allowed)
NEVER_STARTS = re.compile(r"BadConstraints|PartitionConfig|PartitionNodeLimit|PartitionTimeLimit|InvalidAccount|"
                          r"InvalidQOS|AccountNotAllowed|QOSNotAllowed|(Assoc|QOS)Max\w*PerJob\w*")


class SchedulerSilent(RuntimeError):
    """Slurm's controller did not answer where a wrong guess would train a run twice."""


def job_state_line(job_id: str, info: dict[str, str]) -> str:
    """A live job's state and what it waits for, as status and launch say it."""
    reason = info.get("reason", "")
    said = f"slurm job {job_id} {info['state'].lower()}" + (f" ({reason})" if reason not in ("", "None") else "")
    if NEVER_STARTS.fullmatch(reason):
        said += f"; it cannot start as submitted: scancel {job_id.split('_')[0]} and relaunch with other resources"
    return said


# ------------------------------------------------------------------------------------------------- a run's state

def live_local_launches(manifest: dict[str, Any]) -> dict[str, float]:
    """Run id -> start (seconds since the epoch) of the local launch, still going on this machine, that is to train
    it."""
    queued = {}
    for launch in manifest["launches"]:
        if isinstance(launch, dict) and "ended" in launch and launch["ended"] is None \
                and launch.get("host") == socket.gethostname() and _alive(launch.get("pid")):
            try:
                started = time.mktime(time.strptime(launch["time"], "%Y-%m-%dT%H:%M:%S"))
                queued.update({run_id: started for run_id in launch["runs"]})
            except (KeyError, TypeError, ValueError):  # a damaged record tells nothing
                continue
    return queued


def yet_to_train(run_dir: str | Path, since: float | None) -> bool:
    """Whether the live local launch started at `since` (`live_local_launches`) has yet to reach the run: it has
    written no record since (a run it has ended, it does not train again)."""
    return since is not None and (result_mtime(run_dir) or 0) < since


def local_launch(since: float) -> str:
    """A local launch as messages name it: by its start."""
    return f"the local launch of {time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(since))}"


def _alive(pid: Any) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # someone else's process
        return True
    except (OSError, TypeError, ValueError, OverflowError):
        return False
    return True


def run_state(run_dir: str | Path, job_id: str | None, scheduler: dict[str, dict[str, str]], now: float,
              since: float | None = None) -> tuple[str, str]:
    """(state, one-line reason) of one run: its record, then its Slurm job's state, then its heartbeat. `since`:
    the start of a live local launch that is to train the run (`live_local_launches`); a record, heartbeat or
    ended Slurm job older than that is of an earlier try."""
    run_dir = str(run_dir)
    done = read_status(run_dir)
    try:
        beat = os.stat(os.path.join(run_dir, "heartbeat")).st_mtime
    except OSError:
        beat = None
    info = scheduler.get(job_id) if job_id else None
    job_alive = bool(info and info["state"] in SCHEDULER_ALIVE)
    if done:
        # a failed record with a rerun alive (a job in the queue, a heartbeat newer than the record, or a live
        # local launch started after it) is that rerun
        rerun_alive = job_alive or yet_to_train(run_dir, since) or (
            not info and beat is not None and now - beat < STALE_AFTER_S and beat > (result_mtime(run_dir) or 0))
        if done[0] == "completed" or not rerun_alive:
            return done
    if since is not None and not job_alive and (beat is None or beat < since):
        return "pending", f"waiting for a worker of {local_launch(since)}"
    if info and not job_alive and held_elsewhere(Path(run_dir)):  # a local launch took it over since
        return "running", f"by a process on this machine (slurm job {job_id} has ended)"
    if info:
        state = info["state"]
        if state == "COMPLETING" and info.get("ended"):
            # the job's processes are being stopped and it wrote no result: scancel (the usual case), a time
            # limit or a kill; the controller names which only once the processes are gone
            return "failed", f"slurm job {job_id} ended without a result: cancelled or killed (stopping now)"
        if state in ("RUNNING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"):
            return "running", ""
        if state.startswith("REQUEUE") or state == "COMPLETING" or (
                state == "PENDING" and os.path.exists(os.path.join(run_dir, "checkpoint.pt"))):
            # a completing job with no end time is being requeued (Slurm restarts its clock)
            return "requeued", f"slurm job {job_id} requeued; resumes from its checkpoint"
        if state in SCHEDULER_ALIVE:
            return "pending", job_state_line(job_id, info)
        if state in SCHEDULER_FAILED:
            what = "cancelled (scancel)" if state == "CANCELLED" else info["detail"].lower()
            code = f", exit code {info['exit_code']}" if info.get("exit_code") else ""
            return "failed", f"slurm job {job_id} {what}{code}; relaunch to {_resume(run_dir)}"
        if state == "COMPLETED":
            return "failed", f"slurm job {job_id} completed without writing result.json"
    if beat is not None and now - beat < STALE_AFTER_S:
        if not info and os.path.exists(os.path.join(run_dir, LOCK_FILE)) and not held_elsewhere(Path(run_dir)):
            # a local trainer holds the run's lock while it trains (the OS drops it when the process ends): the
            # heartbeat is younger than STALE_AFTER_S, but nobody trains the run, as `sweep launch` also sees it
            return "stale", f"its trainer has stopped (nobody holds the run); relaunch to {_resume(run_dir)}"
        return "running", ""
    if beat is not None:
        return "stale", f"no heartbeat for {now - beat:.0f} s and no live job; relaunch to {_resume(run_dir)}"
    return "pending", ""


def _resume(run_dir: str) -> str:
    """What a relaunch of a stale run does."""
    has = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    return "resume from the checkpoint" if has else "start it again"


RUN_KEYS = ("model", "image_strategy", "image_tokens", "text_strategy", "text_tokens", "seed")  # what status shows


def _check_entries(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """ConfigError for a run entry that status cannot show (hand-edited, or damaged); a relaunch rewrites it."""
    for run_id, entry in manifest["runs"].items():
        if not isinstance(entry, dict):  # a relaunch rewrites only the entries of its grid's runs
            raise ConfigError(f"runs.{run_id}", "is not a run entry; remove it from manifest.json", path)
        config = entry.get("config")
        lacking = [k for k in RUN_KEYS if k not in config] if isinstance(config, dict) else ["config"]
        if lacking:
            raise ConfigError(f"runs.{run_id}", f"has no {lacking[0]!r}; relaunch the grid to write it again", path)
    return manifest


def collect(path: str | Path) -> list[dict[str, Any]]:
    """One row per run of every sweep under `path`, asking the scheduler once."""
    path = Path(path)
    manifests = [(p.parent, _check_entries(read_manifest(p), p)) for p in find_manifests(path)]
    job_ids = [j for _, m in manifests for entry in m["runs"].values() if (j := latest_slurm_job(entry))]
    scheduler, unanswered = scheduler_states(job_ids)
    for why in unanswered.values():
        print(f"warning: {why}; the states below come from the run folders alone", file=sys.stderr)
    now = time.time()
    rows = []
    for sweep_path, manifest in manifests:
        sweep = sweep_path.resolve().name  # its folder: a copied sweep keeps its manifest's name, yet is another
        queued = live_local_launches(manifest)
        for run_id, entry in manifest["runs"].items():
            cfg, jobs = entry["config"], jobs_of(entry)
            job_id = latest_slurm_job(entry)
            state, reason = run_state(os.path.join(sweep_path, run_id), job_id, scheduler, now, queued.get(run_id))
            rows.append({"sweep": sweep, "run_id": run_id, "state": state, "reason": one_line(reason),
                         **{key: cfg[key] for key in RUN_KEYS},
                         "job_id": jobs[-1]["job_id"] if jobs else None, "jobs": [j["job_id"] for j in jobs],
                         "trials": entry.get("trials", [])})  # `sweep tune`: the trials (study#number) it served
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per run, most urgent first; runs of a tuning sweep also name their trials, and runs of several
    sweeps their sweep."""
    width = max([len(r["run_id"]) for r in rows] + [6])
    trials = {(r["sweep"], r["run_id"]): ",".join(r.get("trials") or []) for r in rows}
    tw = max((len(t) for t in trials.values()), default=0)
    tw = max(tw, 5) if tw else 0
    sweeps = {r["sweep"] for r in rows}
    sw = max(max(map(len, sweeps)), 5) if len(sweeps) > 1 else 0
    head = (f"{'sweep':<{sw}}  " if sw else "") + f"{'run_id':<{width}}  {'state':<9}  "
    lines = [head + (f"{'trial':<{tw}}  " if tw else "") + "reason"]
    order = {s: i for i, s in enumerate(("failed", "stale", "running", "requeued", "pending", "pruned", "completed"))}
    for r in sorted(rows, key=lambda r: (order[r["state"]], r["sweep"], r["run_id"])):
        sweep = f"{r['sweep']:<{sw}}  " if sw else ""
        trial = f"{trials[r['sweep'], r['run_id']]:<{tw}}  " if tw else ""
        lines.append(f"{sweep}{r['run_id']:<{width}}  {r['state']:<9}  {trial}{r['reason']}".rstrip())
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    if not rows:
        return "0 runs (none launched yet)"
    return f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
