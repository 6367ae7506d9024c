"""Launching grids on the real local Slurm cluster (scripts/slurm/up.sh): arrays, scancel, requeue, resume."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from sweep.cli import main
from sweep.grid import load_grid
from sweep.launch import slurm_available
from sweep.status import collect

pytestmark = pytest.mark.slow

if not slurm_available():
    if os.environ.get("SWEEP_REQUIRE_SLURM", "") not in ("", "0"):
        pytest.fail("SWEEP_REQUIRE_SLURM is set but no Slurm cluster answers (start it: bash scripts/slurm/up.sh)",
                    pytrace=False)
    pytest.skip("no Slurm cluster answers (start one: bash scripts/slurm/up.sh)", allow_module_level=True)

GRID = """\
sweep: {sweep}
settings:
  model: cpu-s
  batch_size: 32
  train_scenes: 500
  eval_zeroshot_samples: 40
  eval_retrieval_samples: 40
  checkpoint_every: {every}
baselines: false
axes:
  image:
{cells}
slurm:
  cpus: 1
  mem_gb: 2
  time_min: 30
  tasks_per_node: {tasks}
"""


def write_grid(tmp_path, sweep, cells, every=1000, tasks=1):
    path = tmp_path / f"{sweep}.yaml"
    path.write_text(GRID.format(sweep=sweep, every=every, cells="\n".join(f"    - {c}" for c in cells),
                                tasks=tasks))
    return path


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def states(sweep_dir):
    return {r["run_id"]: r for r in collect(sweep_dir)}


def jobs_of(sweep_dir, run_id):
    return [j["job_id"] for j in json.loads((Path(sweep_dir) / "manifest.json").read_text())["runs"][run_id]["jobs"]]


def job_of(sweep_dir, run_id):
    return jobs_of(sweep_dir, run_id)[-1]


def scheduler_tasks(array):
    """Every task of a job array the controller knows, whatever its state."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array, "-o", "%i"], capture_output=True,
                         text=True, check=True).stdout
    return sorted(out.split())


def result(sweep_dir, run_id):
    return json.loads((Path(sweep_dir) / run_id / "result.json").read_text())


def test_smoke_grid_completes_on_slurm_and_a_relaunch_while_live_submits_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["launch", "grids/smoke.yaml", "--results", str(results), "--executor", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "submitted 5 runs as job array" in out
    sweep = results / "smoke"
    # at once again: the array is queued or running, so nothing is submitted twice and the job ids are kept
    assert main(["launch", "grids/smoke.yaml", "--results", str(results), "--executor", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "0 to run" in out and "submitted" not in out
    live = int(out.split(" queued or running")[0].rsplit("; ", 1)[-1]) if "queued or running" in out else 0
    assert live + int(out.split(" completed and ")[0].rsplit(" ", 1)[-1]) == 5
    assert "skipped" in out and "slurm job" in out
    jobs = {run_id: jobs_of(sweep, run_id) for run_id in states(sweep)}
    assert all(len(j) == 1 for j in jobs.values()), jobs
    (array,) = {j[0].split("_")[0] for j in jobs.values()}
    assert scheduler_tasks(array) == sorted(j[0] for j in jobs.values())  # 5 tasks, each once
    wait_for(lambda: all(r["state"] == "completed" for r in states(sweep).values()), 300, "all smoke runs")
    assert main(["launch", "grids/smoke.yaml", "--results", str(results), "--executor", "slurm"]) == 0
    assert "0 to run" in capsys.readouterr().out
    assert {run_id: jobs_of(sweep, run_id) for run_id in states(sweep)} == jobs


def test_scancel_shows_failed_and_a_relaunch_reruns_only_it_from_its_checkpoint(tmp_path, capsys):
    grid = write_grid(tmp_path, "cancel", ["{image_strategy: random, image_tokens: 17, pretrain_samples: 128}",
                                           "{image_strategy: grid, image_tokens: 17, pretrain_samples: 32000}"],
                      every=2)
    results = tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "slurm"]) == 0
    sweep = results / "cancel"
    quick, slow = sorted(states(sweep), key=lambda r: "grid" in r)
    wait_for(lambda: (sweep / slow / "checkpoint.pt").exists(), 180, "the long run's first checkpoint")
    first_job = job_of(sweep, slow)
    subprocess.run(["scancel", first_job], check=True)
    # the very next status call knows, although the run's heartbeat is still fresh
    assert (sweep / slow / "heartbeat").stat().st_mtime > time.time() - 30
    row = states(sweep)[slow]
    assert row["state"] == "failed" and "cancelled" in row["reason"], row
    assert main(["status", str(sweep)]) == 0
    assert "cancelled" in capsys.readouterr().out
    wait_for(lambda: states(sweep)[quick]["state"] == "completed", 180, "the quick run")
    # a relaunch while the cancelled job's processes are still being stopped skips it; once they are gone it runs
    wait_for(lambda: "cancelled (scancel)" in states(sweep)[slow]["reason"], 60, "the job's processes to stop")

    capsys.readouterr()
    assert main(["launch", str(grid), "--results", str(results), "--executor", "slurm"]) == 0
    assert "1 to run" in capsys.readouterr().out
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert manifest["launches"][-1]["runs"] == [slow]
    assert jobs_of(sweep, slow)[0] == first_job and len(jobs_of(sweep, slow)) == 2  # every job id is kept
    subprocess.run(["scancel", job_of(sweep, slow)], check=True)  # no need to train it to the end


def _interrupted_run_resumes(tmp_path, sweep_name, interrupt, tasks=1):
    grid = write_grid(tmp_path, sweep_name, ["{image_strategy: block, image_tokens: 17, pretrain_samples: 19200}"],
                      tasks=tasks)
    results = tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "slurm"]) == 0
    sweep = results / sweep_name
    (run_id,) = states(sweep)
    wait_for(lambda: (sweep / run_id / "heartbeat").exists(), 120, "the run to start")
    time.sleep(6)  # into the training loop (a checkpoint exists only if a signal asks for one: checkpoint_every 1000)
    assert not (sweep / run_id / "checkpoint.pt").exists()
    interrupt(job_of(sweep, run_id))
    wait_for(lambda: (sweep / run_id / "checkpoint.pt").exists(), 60, "the checkpoint the signal asks for")
    record = wait_for(lambda: (sweep / run_id / "result.json").exists() and result(sweep, run_id), 300,
                      "the requeued run to finish")
    assert record["status"] == "completed"
    assert record["resumed"] and record["resumed"][0]["step"] > 0  # resumed mid-way, not from step 0
    assert states(sweep)[run_id]["state"] == "completed"
    assert record["compute"]["world_size"] == tasks
    return sweep / run_id


def test_scontrol_requeue_resumes_from_the_checkpoint(tmp_path):
    _interrupted_run_resumes(tmp_path, "requeue", lambda job: subprocess.run(["scontrol", "requeue", job], check=True))


def test_preemption_signal_requeues_through_submitit_and_resumes(tmp_path):
    # submitit treats USR2 as preemption / time-out: checkpoint, requeue, resume
    _interrupted_run_resumes(tmp_path, "preempt",
                             lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True))


def test_a_run_on_two_tasks_writes_one_result_and_a_requeue_resumes_every_task(tmp_path):
    run_dir = _interrupted_run_resumes(
        tmp_path, "ranks", lambda job: subprocess.run(["scontrol", "requeue", job], check=True), tasks=2)
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == \
        ["checkpoint.pt", "config.yaml", "heartbeat", "model.pt", "result.json"]
    # both tasks trained: each wrote its own log under the job's folder
    logs = list((run_dir.parent / ".submitit").rglob("*_1_log.out"))
    assert logs, "no log of the job's second task"


def test_tune_with_the_slurm_executor_completes_a_small_study_through_a_job_array(tmp_path, capsys):
    import yaml

    from sweep.tune import progress, remaining

    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "sweep": "slurm_tune",
        "settings": {"model": "cpu-s", "pretrain_samples": 128, "finetune_samples": 64, "batch_size": 32,
                     "eval_every": 2, "train_scenes": 500, "eval_zeroshot_samples": 40, "eval_retrieval_samples": 40},
        "axes": {"seed": [0]},
        "tune": {"params": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "trials": 4, "startup_trials": 1},
        "slurm": {"cpus": 1, "mem_gb": 2, "time_min": 30},
    }))
    results = tmp_path / "results"
    assert main(["tune", str(path), "--results", str(results), "--executor", "slurm", "--max-parallel", "2"]) == 0
    assert "submitted 2 tuning workers as job array" in capsys.readouterr().out
    folder = results / "slurm_tune"
    (array,) = json.loads((folder / "manifest.json").read_text())["launches"][-1]["arrays"]
    assert len(scheduler_tasks(array)) == 2  # two Optuna workers, one array
    grid = load_grid(path)
    wait_for(lambda: not any(remaining(grid, folder).values()) and not progress(grid, folder).get("running"), 300,
             "the study's 4 trials")
    counts = progress(grid, folder)
    assert counts.get("complete", 0) + counts.get("pruned", 0) == 4 and counts.get("complete", 0) >= 1
    assert main(["tune", str(path), "--results", str(results), "--show", "--no-figures"]) == 0
    assert "4 of 4 trials" in capsys.readouterr().out


def test_search_on_slurm_submits_one_round_per_call_and_each_call_continues_from_the_results(tmp_path, capsys):
    import yaml


    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({
        "sweep": "slurm_search",
        "settings": {"model": "cpu-s", "pretrain_samples": 128, "finetune_samples": 64, "batch_size": 32,
                     "train_scenes": 500, "eval_zeroshot_samples": 200, "eval_retrieval_samples": 40},
        "axes": {"image_strategy": ["random"], "image_tokens": [37, 26, 17, 10, 5]},
        "search": {"max_drop": 3.0, "max_seeds": 1, "noise": 1.0},
        "slurm": {"cpus": 1, "mem_gb": 2, "time_min": 30},
    }))
    results = tmp_path / "results"
    sweep = results / "slurm_search"
    rounds = 0
    while True:
        assert main(["search", str(path), "--results", str(results), "--executor", "slurm"]) == 0
        out = capsys.readouterr().out
        if "submitted round" not in out:
            break
        rounds += 1
        assert f"round {rounds}:" in out  # the round's number counts on from the results on disk
        wait_for(lambda: all(r["state"] == "completed" for r in states(sweep).values()), 300, f"round {rounds}")
    assert rounds >= 2 and "runs:" in out and "trained of the grid's 6" in out
    trained = {p.parent.name for p in sweep.glob("*/result.json")}
    assert trained < {r.run_id for r in load_grid(path).runs}


def test_an_array_sbatch_refuses_is_one_line_and_the_launch_leaves_nothing_behind(tmp_path, capsys):
    grid = write_grid(tmp_path, "refused", ["{image_strategy: random, image_tokens: 17}",
                                            "{image_strategy: grid, image_tokens: 17}"])
    results = tmp_path / "results"
    code = main(["launch", str(grid), "--results", str(results), "--executor", "slurm", "--partition", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2 and "slurm: sbatch refused the job array: sbatch: error: invalid partition" in err, err
    assert not results.exists()  # no manifest, no run folder: status has nothing to call pending
    # a sweep launched before keeps its manifest as it was and its runs' folders; only the new folders go
    sweep = results / "refused"
    old = sweep / load_grid(grid).runs[0].run_id
    old.mkdir(parents=True)
    (old / "checkpoint.pt").write_bytes(b"an earlier try")
    manifest = '{"sweep": "refused", "runs": {}, "launches": []}'
    (sweep / "manifest.json").write_text(manifest)
    code = main(["launch", str(grid), "--results", str(results), "--executor", "slurm", "--partition", "nosuch"])
    assert code == 2 and (sweep / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in sweep.iterdir()) == sorted([old.name, "manifest.json"])
    assert (old / "checkpoint.pt").read_bytes() == b"an earlier try"


def test_a_job_the_partition_can_never_run_says_to_scancel_it_in_status_and_launch(tmp_path, capsys):
    grid = write_grid(tmp_path, "toobig", ["{image_strategy: random, image_tokens: 17}"])
    results = tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "slurm", "--cpus", "64"]) == 0
    job = json.loads((results / "toobig" / "manifest.json").read_text())["launches"][-1]["arrays"][0]
    try:
        reason = wait_for(lambda: "PartitionConfig" in (r := states(results / "toobig").popitem()[1]["reason"])
                          and r, 30, "the controller to give the pending job a reason")
        assert reason.endswith(f"it cannot start as submitted: scancel {job} and relaunch with other resources")
        capsys.readouterr()
        assert main(["launch", str(grid), "--results", str(results), "--executor", "slurm"]) == 0
        assert f"scancel {job} and relaunch" in capsys.readouterr().out  # skipped, saying why
    finally:
        subprocess.run(["scancel", job], check=False)
