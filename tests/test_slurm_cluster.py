"""End-to-end tests of submitit against a real (local, single-node) Slurm cluster.

Start the cluster first with ``bash scripts/slurm/up.sh`` (CI does). The tests
skip only when ``sinfo`` is not on PATH or the cluster does not answer; set
``SWEEP_REQUIRE_SLURM=1`` to make those cases fail instead of skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.slow

# The jobs run this module's functions/classes in another interpreter where
# tests/ is not importable: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 60  # a single wait; the whole module takes well under 2 minutes


# --------------------------------------------------------------------------- helpers


def _run(*cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def partition() -> str:
    """Default partition of the running cluster; skip if there is none to talk to."""
    required = os.environ.get("SWEEP_REQUIRE_SLURM", "") not in ("", "0")
    give_up = pytest.fail if required else pytest.skip
    if shutil.which("sinfo") is None:
        give_up("sinfo is not on PATH: no Slurm here (start one with: bash scripts/slurm/up.sh)")
    try:
        out = _run("sinfo", "-h", "-o", "%P %a %t")
    except subprocess.TimeoutExpired:
        give_up("the Slurm cluster is not responding (sinfo timed out); start it with: bash scripts/slurm/up.sh")
    if out.returncode != 0 or not out.stdout.strip():
        give_up(
            "the Slurm cluster is not responding (sinfo: "
            f"{(out.stderr or out.stdout).strip().splitlines()[-1:]}); start it with: bash scripts/slurm/up.sh"
        )
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not any(state.rstrip("*~#$@+^-") in ("idle", "mix", "alloc", "comp") for _, _, state in rows):
        # It answers but cannot run anything: fail at once instead of timing out.
        reasons = _run("sinfo", "-R").stdout
        pytest.fail(f"the Slurm cluster answers but no node can run jobs:\n{out.stdout}\n{reasons}")
    names = [name for name, _, _ in rows]
    default = [n for n in names if n.endswith("*")]
    return (default or names)[0].rstrip("*")


def _executor(folder: Path, partition: str, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    assert executor.cluster == "slurm"
    executor.update_parameters(
        slurm_partition=partition, timeout_min=60, cpus_per_task=1, name="sweep-slurm-test", **params
    )
    return executor


def _wait(job: submitit.Job, timeout: float = JOB_TIMEOUT_S) -> None:
    """Wait until submitit sees the job finished; cancel it and fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            info = _run("scontrol", "show", "job", job.job_id).stdout
            _run("scancel", job.job_id)
            pytest.fail(f"job {job.job_id} not done after {timeout:.0f}s (state {job.state}):\n{info}")
        time.sleep(0.5)


def _wait_until(predicate, what, timeout: float = JOB_TIMEOUT_S, job: submitit.Job | None = None) -> None:
    """Poll `predicate` until true; fail after `timeout` (`what`: str, or callable giving one)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if job is not None:
                _run("scancel", job.job_id)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")
        time.sleep(0.3)


def _slurm_state(job_id: str) -> str:
    """Job state from squeue (live) -- RUNNING, PENDING, ... or '' once gone."""
    return _run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()


def _sacct_state(job_id: str) -> str:
    out = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").stdout.split()
    return out[0] if out else ""


# ------------------------------------------------------------- functions run in jobs


def add(a: int, b: int) -> dict:
    return {"sum": a + b, "job_id": os.environ.get("SLURM_JOB_ID"), "python": sys.executable}


def square(x: int) -> tuple[int, str | None]:
    return x * x, os.environ.get("SLURM_ARRAY_TASK_ID")


def sleep_then_return(flag: str, seconds: float) -> str:
    Path(flag).write_text("started")
    time.sleep(seconds)
    return "finished"


class ProgressCounter(submitit.helpers.Checkpointable):
    """Counts to `n_steps`, saving progress to a file after each step.

    A run resumes from the saved progress (file, or the state pickled by
    `checkpoint()` on preemption), and reports where each run started.
    """

    def __init__(self) -> None:
        self.steps_done = 0  # in-memory progress, carried over by checkpoint()
        self.checkpointed = False

    def __call__(self, progress_file: str, n_steps: int, step_s: float) -> dict:
        path = Path(progress_file)
        saved = int(path.read_text()) if path.exists() else 0
        start = max(saved, self.steps_done)
        with path.with_suffix(".starts").open("a") as f:
            f.write(f"{start}\n")
        for step in range(start, n_steps):
            time.sleep(step_s)
            self.steps_done = step + 1
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(step + 1))
            tmp.replace(path)
        starts = [int(s) for s in path.with_suffix(".starts").read_text().split()]
        return {
            "steps_done": self.steps_done,
            "starts": starts,
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "checkpointed": self.checkpointed,
        }

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        self.checkpointed = True
        return super().checkpoint(*args, **kwargs)


def _progress(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0


# ----------------------------------------------------------------------------- tests


def test_single_job_returns_result(tmp_path: Path, partition: str) -> None:
    job = _executor(tmp_path / "logs", partition).submit(add, 2, 3)
    _wait(job)
    result = job.result()
    assert result["sum"] == 5
    assert result["job_id"] == job.job_id.split("_")[0]
    assert result["python"] == sys.executable
    # The result file comes before Slurm marks the job done: wait for sacct.
    _wait_until(lambda: _sacct_state(job.job_id) == "COMPLETED", "sacct to say COMPLETED")
    job.get_info(mode="force")  # refresh submitit's sacct cache
    assert job.state == "COMPLETED"


def test_job_array_returns_all_results(tmp_path: Path, partition: str) -> None:
    executor = _executor(tmp_path / "logs", partition, slurm_array_parallelism=4)
    xs = [1, 2, 3, 4, 5]
    jobs = executor.map_array(square, xs)
    assert len(jobs) == len(xs)
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, f"expected one Slurm job array, got {array_ids}"
    for job in jobs:
        _wait(job)
    results = [job.result() for job in jobs]
    assert [r[0] for r in results] == [x * x for x in xs]
    assert sorted(int(r[1]) for r in results) == list(range(len(xs)))

    # The batch() context manager submits one array too.
    with executor.batch():
        batched = [executor.submit(add, x, 10) for x in (1, 2, 3)]
    for job in batched:
        _wait(job)
    assert [job.result()["sum"] for job in batched] == [11, 12, 13]
    assert len({job.job_id.split("_")[0] for job in batched}) == 1


def test_scancel_running_job_is_reported_cancelled(tmp_path: Path, partition: str) -> None:
    flag = tmp_path / "started"
    job = _executor(tmp_path / "logs", partition).submit(sleep_then_return, str(flag), 300)
    _wait_until(flag.exists, "the job to start running", job=job)
    job._results_timeout_s = 1  # submitit waits 15 s for a result file that never comes
    job.cancel(check=True)  # runs `scancel <id>`
    _wait(job, timeout=30)
    _wait_until(lambda: _sacct_state(job.job_id).startswith("CANCELLED"), "sacct to say CANCELLED")
    job.get_info(mode="force")  # refresh submitit's sacct cache
    assert job.state.startswith("CANCELLED"), job.state
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()


def test_scontrol_requeue_resumes_from_saved_progress(tmp_path: Path, partition: str) -> None:
    progress = tmp_path / "progress.txt"
    # Long enough that the first run is still going when Slurm kills it: submitit
    # ignores SIGTERM, so the kill lands KillWait (5 s with up.sh) later.
    n_steps = 20
    job = _executor(tmp_path / "logs", partition).submit(ProgressCounter(), str(progress), n_steps, 0.5)
    _wait_until(lambda: _progress(progress) >= 2, "the first run to save some progress", job=job)
    out = _run("scontrol", "requeue", job.job_id)
    assert out.returncode == 0, out.stderr
    # Requeued jobs are held back for cred_expire+1 s (11 s with up.sh's config).
    _wait(job, timeout=JOB_TIMEOUT_S)
    result = job.result()
    assert result["restart_count"] == 1, result
    assert result["steps_done"] == n_steps
    first, second = result["starts"]
    assert first == 0
    assert 2 <= second < n_steps, f"requeued run did not resume from the saved progress: {result}"
    assert not result["checkpointed"]

    def history() -> list[str]:  # every run of the job, as sacct saw it
        return _run("sacct", "-D", "-n", "-X", "-P", "-j", job.job_id, "-o", "State").stdout.split()

    expected = ["REQUEUED", "COMPLETED"]
    _wait_until(lambda: history() == expected, lambda: f"sacct to show {expected} (has {history()})")


def test_preemption_signal_checkpoints_and_requeues(tmp_path: Path, partition: str) -> None:
    """Submitit's own path: USR2 -> checkpoint() -> `scontrol requeue` -> resume."""
    progress = tmp_path / "progress.txt"
    n_steps = 8
    job = _executor(tmp_path / "logs", partition).submit(ProgressCounter(), str(progress), n_steps, 0.5)
    _wait_until(lambda: _progress(progress) >= 2, "the first run to make some progress", job=job)
    out = _run("scancel", "--signal=USR2", job.job_id)  # what Slurm sends before the time limit
    assert out.returncode == 0, out.stderr
    _wait(job, timeout=JOB_TIMEOUT_S)
    result = job.result()
    assert result["checkpointed"], result
    assert result["restart_count"] == 1
    assert result["steps_done"] == n_steps
    first, second = result["starts"]
    assert first == 0 and 2 <= second < n_steps, result
