"""What every run of a sweep is doing, from its files and one scheduler query; works after the launcher is gone.

States:
  completed  result.json says so
  failed     result.json says so (with the trainer's reason), or the scheduler ended the job (cancelled, timed
             out, out of memory, node failure) before a result was written
  running    the run's heartbeat file was touched recently (the trainer touches it every 10 s)
  requeued   the scheduler holds a job that was preempted / timed out / requeued and will resume it
  stale      it was running, but its heartbeat stopped and no scheduler job is alive: relaunch to resume
  pending    submitted or queued, not started yet
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

STALE_AFTER_S = 60.0  # heartbeats come every 10 s; six missed ones mean the process is gone
STATES = ("completed", "failed", "running", "requeued", "stale", "pending")
SCHEDULER_FAILED = ("CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                    "PREEMPTED")


def find_manifests(path: Path) -> list[Path]:
    """PATH is a sweep directory (with manifest.json) or a results directory holding sweeps."""
    if (path / "manifest.json").exists():
        return [path / "manifest.json"]
    return sorted(p for p in path.glob("*/manifest.json"))


def slurm_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """job id -> {state, reason, exit_code}: one sacct call for every array of the sweep."""
    if not job_ids or not shutil.which("sacct"):
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Reason,ExitCode", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        job, state, reason, exit_code = parts[:4]
        info = {"state": state.split()[0], "detail": state, "reason": reason, "exit_code": exit_code}
        pending = re.fullmatch(r"(\d+)_\[(.+)\]", job)  # a pending array: 123_[0-9,12%4]
        if pending:
            for part in pending.group(2).split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                for task in range(int(lo), int(hi or lo) + 1):
                    states[f"{pending.group(1)}_{task}"] = info
        else:
            states[job] = info  # later lines (after a requeue) replace earlier ones
    return states


def _one_line(text: str, width: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


_STATUS = re.compile(rb'\n  "status": "(\w+)"')  # a top-level key of a record written with indent=2


def result_state(run_dir: str) -> tuple[str, str] | None:
    """(status, reason) from result.json, or None when there is none.

    The trainer writes `status` among the first keys, so a completed run is recognised from the file's first
    bytes without parsing the whole record (10,000 runs in well under a second); anything else is parsed in full."""
    path = os.path.join(run_dir, "result.json")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            match = _STATUS.search(head)
            if match and match.group(1) == b"completed":
                return "completed", ""
            record = json.loads(head + f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "failed", "result.json is unreadable"
    if record.get("status") == "completed":
        return "completed", ""
    return "failed", _one_line(record.get("error") or "failed without a reason")


def run_state(run_dir: str | Path, job: dict[str, Any] | None, scheduler: dict[str, dict[str, str]], now: float
              ) -> tuple[str, str]:
    """(state, one-line reason) of one run."""
    run_dir = str(run_dir)
    done = result_state(run_dir)
    if done:
        return done
    try:
        beat = os.stat(os.path.join(run_dir, "heartbeat")).st_mtime
    except OSError:
        beat = None
    if beat is not None and now - beat < STALE_AFTER_S:
        return "running", ""
    info = scheduler.get(job["job_id"]) if job and job.get("executor") == "slurm" else None
    if info:
        state = info["state"]
        if state == "RUNNING":
            return "running", ""
        if state == "REQUEUED" or (state == "PENDING" and os.path.exists(os.path.join(run_dir, "checkpoint.pt"))):
            return "requeued", f"slurm job {job['job_id']} requeued; resumes from its checkpoint"
        if state == "PENDING":
            return "pending", f"slurm job {job['job_id']} pending ({info['reason']})"
        if state in SCHEDULER_FAILED:
            what = "cancelled (scancel)" if state == "CANCELLED" else info["detail"].lower()
            return "failed", f"slurm job {job['job_id']} {what}, exit code {info['exit_code']}"
    if beat is not None:
        return "stale", f"no heartbeat for {now - beat:.0f} s and no live job; relaunch to resume from the checkpoint"
    return "pending", ""


def collect(path: str | Path) -> list[dict[str, Any]]:
    """One row per run of every sweep under `path`, asking the scheduler once."""
    path = Path(path)
    manifests = []
    for manifest_path in find_manifests(path):
        manifests.append((manifest_path.parent, json.loads(manifest_path.read_text())))
    job_ids = [run["job"]["job_id"] for _, m in manifests for run in m["runs"].values()
               if run.get("job", {}).get("executor") == "slurm"]
    scheduler = slurm_states(job_ids)
    now = time.time()
    rows = []
    for sweep_path, manifest in manifests:
        for run_id, run in manifest["runs"].items():
            cfg = run["config"]
            state, reason = run_state(os.path.join(sweep_path, run_id), run.get("job"), scheduler, now)
            rows.append({"sweep": manifest["sweep"], "run_id": run_id, "state": state, "reason": reason,
                         "model": cfg["model"], "image_strategy": cfg["image_strategy"],
                         "image_tokens": cfg["image_tokens"], "text_strategy": cfg["text_strategy"],
                         "text_tokens": cfg["text_tokens"], "seed": cfg["seed"],
                         "job_id": run.get("job", {}).get("job_id")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max([len(r["run_id"]) for r in rows] + [6])
    lines = [f"{'run_id':<{width}}  {'state':<9}  reason"]
    order = {s: i for i, s in enumerate(("failed", "stale", "running", "requeued", "pending", "completed"))}
    for r in sorted(rows, key=lambda r: (order[r["state"]], r["run_id"])):
        lines.append(f"{r['run_id']:<{width}}  {r['state']:<9}  {r['reason']}".rstrip())
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    return f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
