"""Launching grids locally: every cell runs once, relaunching is a no-op, failures say why, status tells all."""
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from sweep.cli import main
from sweep.launch import slurm_available
from sweep.status import collect, parse_scheduler_lines, run_state
from sweep.results import AlreadyRunning, exclusive
from sweep.train import run
from sweep.config import config_from_dict

TINY = """\
sweep: tiny
settings:
  model: cpu-s
  pretrain_samples: 256
  batch_size: 64
  train_scenes: 500
  eval_zeroshot_samples: 40
  eval_retrieval_samples: 40
  checkpoint_every: 2
{extra}
axes:
  image:
    - {{image_strategy: [random, resize], image_tokens: 17}}
"""


def grid_file(tmp_path, extra=""):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(extra=extra))
    return path


def results_of(results):
    return {p.parent.name: p.stat().st_mtime_ns for p in Path(results).glob("tiny/*/result.json")}


@pytest.mark.slow
def test_local_launch_runs_every_cell_and_a_relaunch_runs_nothing(tmp_path, capsys):
    grid, results = grid_file(tmp_path), tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--max-parallel", "2",
                 "--quiet"]) == 0
    assert "3 runs: 3 completed" in capsys.readouterr().out
    first = results_of(results)
    assert len(first) == 3  # random, resize and the added baseline

    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 completed and 0 failed already" in out and "0 to run" in out
    assert results_of(results) == first  # nothing rerun, nothing rewritten
    first_launch = json.loads((results / "tiny" / "manifest.json").read_text())["launches"][0]
    assert len(first_launch["runs"]) == 3 and first_launch["ended"] >= first_launch["time"]  # recorded once
    assert "pid" not in first_launch  # while it went on, status read its pid to know it was alive

    manifest = json.loads((results / "tiny" / "manifest.json").read_text())
    assert len(manifest["runs"]) == 3 and manifest["launches"][-1]["runs"] == [] and len(manifest["launches"]) == 2
    assert main(["status", str(results / "tiny"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["state"] for r in rows} == {"completed"} and len(rows) == 3
    # status on the results root finds the sweep too
    assert main(["status", str(results)]) == 0
    assert "3 runs: 3 completed" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    grid, results = grid_file(tmp_path), tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 to run" in out and "GFLOP" in out and "nothing written" in out
    assert not results.exists()


@pytest.mark.slow
def test_failed_runs_say_why_and_rerun_only_when_asked(tmp_path, capsys):
    grid, results = grid_file(tmp_path, "  lr: 1.0e+30"), tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "3 failed" in out and "loss became nan" in out
    assert main(["status", str(results / "tiny")]) == 0
    table = capsys.readouterr().out
    assert table.count("failed") >= 3 and "loss became nan" in table

    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--quiet"]) == 0
    assert "0 to run" in capsys.readouterr().out
    before = results_of(results)
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--quiet",
                 "--rerun-failed"]) == 1
    assert "0 completed and 3 failed (run again); 3 to run" in capsys.readouterr().out
    after = results_of(results)
    assert set(after) == set(before) and all(after[k] > before[k] for k in before)


@pytest.mark.slow
def test_a_run_that_fails_is_trained_once_per_launch_not_once_per_worker(tmp_path, capsys):
    import pickle

    grid, results = grid_file(tmp_path, "  lr: 1.0e+30"), tmp_path / "results"  # every run diverges
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--max-parallel", "2",
                 "--quiet"]) == 1
    assert "3 runs: 3 failed" in capsys.readouterr().out
    # each worker's outcome per run it reached: "failed" where it trained it; every worker walks the whole list
    outcomes = [pickle.loads(p.read_bytes())[1] for p in results.glob("tiny/.submitit/*_result.pkl")]
    trained = [run_dir for outcome in outcomes for run_dir, status in outcome.items() if status == "failed"]
    assert len(outcomes) == 2 and len(trained) == len(set(trained)) == 3, outcomes


def test_a_run_that_cannot_start_gets_a_failed_record_saying_why(tmp_path, capsys):
    from sweep.launch import train_run_dir
    from sweep.record import read_status

    data = tmp_path / "train.tsv"
    data.write_text("filepath\ttitle\na.jpg\ta caption\n")
    (tmp_path / "a.jpg").write_bytes(b"")
    run_dir = tmp_path / "sweep" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": "cpu-s", "dataset": "csv", "train_data": str(data)}))
    data.unlink()  # moved after the launch had checked it
    with pytest.raises(Exception, match="train_data"):
        train_run_dir(run_dir)
    status, reason = read_status(run_dir)
    assert status == "failed" and reason.startswith("could not start:") and "train_data" in reason
    assert run_state(run_dir, None, {}, time.time()) == ("failed", reason)  # what `sweep status` says


@pytest.mark.slow
def test_fail_fast_stops_the_launch_cleanly_at_the_first_failure(tmp_path, capfd):
    grid = grid_file(tmp_path, "  lr: 1.0e+30")
    # 12 runs that all fail; one worker would train them one after the other
    grid.write_text(grid.read_text().replace("image_tokens: 17}", "image_tokens: 17}\n  seed: [0, 1, 2, 3]"))
    results = tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--max-parallel", "1",
                 "--quiet", "--fail-fast"]) == 1
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err  # the cancelled worker is quiet
    assert 1 <= len(results_of(results)) < 12 and "pending" in out


@pytest.mark.slow
def test_ctrl_c_stops_the_local_workers_in_one_line_and_each_run_keeps_its_progress(tmp_path):
    import signal
    import subprocess
    import sys

    grid = grid_file(tmp_path)
    grid.write_text(grid.read_text().replace("pretrain_samples: 256", "pretrain_samples: 65536")  # minutes
                    .replace("checkpoint_every: 2", "checkpoint_every: 100000"))  # no periodic checkpoint
    launch = subprocess.Popen([sys.executable, "-m", "sweep.cli", "launch", str(grid), "--results",
                               str(tmp_path / "results"), "--executor", "local", "--max-parallel", "2", "--quiet"],
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("results/tiny/*/heartbeat")) and time.time() < deadline:
        time.sleep(0.5)  # the workers are training
    os.killpg(launch.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = launch.communicate(timeout=120)
    assert launch.returncode == 130 and err.strip() == "sweep launch: interrupted", err
    time.sleep(2)
    alive = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not alive, "a worker outlived the launch"
    started = [p.parent for p in tmp_path.glob("results/tiny/*/heartbeat")]
    assert started and all((d / "checkpoint.pt").exists() and not (d / "result.json").exists() for d in started)


def test_a_run_held_by_another_process_is_not_trained_twice(tmp_path, capsys):
    settings = {"model": "cpu-s", "pretrain_samples": 128, "batch_size": 64}
    cfg = config_from_dict(settings)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "run.yaml").write_text(json.dumps(settings))
    with exclusive(run_dir):
        with pytest.raises(AlreadyRunning):
            run(cfg, run_dir, progress=False)
        assert main(["train", str(tmp_path / "run.yaml"), "--out", str(run_dir), "--quiet"]) == 1
    err = capsys.readouterr().err
    # said as what it is: no failure, no record to point at
    assert err.strip() == f"sweep train: {run_dir} is being trained by another process"
    assert not (run_dir / "result.json").exists()


def test_a_grids_own_threads_are_kept_and_zero_takes_the_launchers_share(tmp_path):
    from sweep.grid import load_grid
    from sweep.launch import prepare_run_dirs

    for given, written in ((3, 3), (0, 5)):
        grid = load_grid(grid_file(tmp_path, f"  threads: {given}"))
        dirs = prepare_run_dirs(grid, tmp_path / f"results{given}", grid.runs, threads=5)
        assert {yaml.safe_load((d / "config.yaml").read_text())["threads"] for d in dirs} == {written}


def slurm(state, reason="", exit_code="0:0"):
    return {"state": state.split()[0], "detail": state, "reason": reason, "exit_code": exit_code}


def test_status_tells_running_stale_and_pending_apart(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    now = time.time()
    assert run_state(run_dir, None, {}, now)[0] == "pending"
    (run_dir / "heartbeat").touch()
    assert run_state(run_dir, None, {}, now)[0] == "running"
    os.utime(run_dir / "heartbeat", (now - 600, now - 600))
    state, reason = run_state(run_dir, None, {}, now)
    assert state == "stale" and "relaunch" in reason
    assert run_state(run_dir, "7_1", {"7_1": slurm("PENDING", "Priority")}, now)[0] == "pending"
    (run_dir / "checkpoint.pt").touch()
    assert run_state(run_dir, "7_1", {"7_1": slurm("PENDING")}, now)[0] == "requeued"
    state, reason = run_state(run_dir, "7_1", {"7_1": slurm("CANCELLED by 0", exit_code="0:15")}, now)
    assert state == "failed" and "cancelled" in reason
    (run_dir / "result.json").write_text('{"status": "failed", "error": "loss became nan at pretrain step 3"}')
    assert run_state(run_dir, "7_1", {}, now) == ("failed", "loss became nan at pretrain step 3")
    (run_dir / "result.json").write_text('{"status": "compl')  # half-written
    state, reason = run_state(run_dir, "7_1", {}, now)
    assert state == "failed" and reason.startswith("result.json is unreadable")


def test_a_run_a_live_local_launch_is_to_train_again_is_pending_not_its_earlier_failure(tmp_path):
    from sweep.status import live_local_launches

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "result.json").write_text('{"status": "failed", "error": "loss became nan at pretrain step 3"}')
    (run_dir / "heartbeat").touch()
    long_ago = time.time() - 600
    for name in ("result.json", "heartbeat"):
        os.utime(run_dir / name, (long_ago, long_ago))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")  # as a launch records it
    since = time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S"))
    # the launch started after the failure: its worker has not reached the run yet
    assert run_state(run_dir, None, {}, time.time(), since) == (
        "pending", f"waiting for a worker of the local launch of {started}")
    (run_dir / "heartbeat").touch()  # ... and now it has
    assert run_state(run_dir, None, {}, time.time(), since) == ("running", "")
    (run_dir / "result.json").write_text('{"status": "failed", "error": "diverged again"}')
    os.utime(run_dir / "result.json", (time.time() + 2, time.time() + 2))  # failed again, within this launch
    assert run_state(run_dir, None, {}, time.time(), since) == ("failed", "diverged again")
    # only a launch that has not ended, on this machine, whose process is alive
    me = {"time": started, "runs": ["r"], "ended": None, "pid": os.getpid(), "host": os.uname().nodename}
    launches = [me, {**me, "runs": ["ended"], "ended": started}, {**me, "runs": ["killed"], "pid": 2**22 + 1},
                {**me, "runs": ["elsewhere"], "host": "another-machine"}, {**me, "runs": ["older"], "pid": None},
                {**me, "runs": ["bad time"], "time": "yesterday"}, {**me, "runs": 3}, 7]
    assert live_local_launches({"launches": launches}) == {"r": since}


def test_a_launch_leaves_the_runs_a_live_local_launch_is_to_train_to_it(tmp_path):
    from sweep.grid import load_grid
    from sweep.launch import to_do, write_manifest

    grid = load_grid(grid_file(tmp_path))
    results = tmp_path / "results"
    first, *others = grid.runs
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_manifest(grid, results, {"time": started, "executor": "local", "runs": [first.run_id], "jobs": {},
                                   "ended": None, "pid": os.getpid(), "host": os.uname().nodename})
    todo, skipped = to_do(grid, results, rerun_failed=False)
    assert [r.run_id for r in todo] == [r.run_id for r in others]
    assert [(run.run_id, why) for run, why in skipped["live"]] == [
        (first.run_id, f"queued by the local launch of {started}")]
    # once that launch has ended the run (failed here), it does not train it again: --rerun-failed does
    (results / grid.sweep / first.run_id).mkdir(parents=True)
    (results / grid.sweep / first.run_id / "result.json").write_text('{"status": "failed", "error": "nan"}')
    os.utime(results / grid.sweep / first.run_id / "result.json", (time.time() + 2, time.time() + 2))
    assert first.run_id in [r.run_id for r in to_do(grid, results, rerun_failed=True)[0]]


def test_a_fresh_heartbeat_of_a_run_nobody_holds_is_stale(tmp_path):
    from sweep.results import exclusive

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "heartbeat").touch()  # beaten a moment ago by a trainer that has just stopped
    with exclusive(run_dir):
        assert run_state(run_dir, None, {}, time.time())[0] == "running"
    state, reason = run_state(run_dir, None, {}, time.time())
    assert state == "stale" and "trainer has stopped" in reason and reason.endswith("start it again")
    (run_dir / "checkpoint.pt").touch()
    assert run_state(run_dir, None, {}, time.time())[1].endswith("resume from the checkpoint")


def test_the_scheduler_decides_before_the_heartbeat(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "heartbeat").touch()  # fresh: the process has not noticed yet, or is being killed
    now = time.time()
    state, reason = run_state(run_dir, "7_1", {"7_1": slurm("CANCELLED by 0")}, now)
    assert state == "failed" and "cancelled" in reason
    assert run_state(run_dir, "7_1", {"7_1": slurm("TIMEOUT", exit_code="0:1")}, now)[0] == "failed"
    # a rerun of a failed run: the live job, not the old record, says what the run is doing
    (run_dir / "result.json").write_text('{"status": "failed", "error": "boom"}')
    assert run_state(run_dir, "7_2", {"7_2": slurm("RUNNING")}, now)[0] == "running"
    assert run_state(run_dir, "7_2", {"7_2": slurm("FAILED", exit_code="1:0")}, now) == ("failed", "boom")
    assert run_state(run_dir, "7_2", {}, now) == ("failed", "boom")  # heartbeat older than the record


def test_a_run_whose_slurm_job_ended_says_a_relaunch_resumes_it_unless_a_local_process_trains_it(tmp_path):
    from sweep.results import exclusive

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").touch()
    now = time.time()
    state, reason = run_state(run_dir, "7_1", {"7_1": slurm("FAILED", exit_code="1:0")}, now)
    assert state == "failed" and reason.endswith("relaunch to resume from the checkpoint")
    with exclusive(run_dir):  # a local launch has taken the run over since the job ended
        state, reason = run_state(run_dir, "7_1", {"7_1": slurm("CANCELLED by 0")}, now)
        assert state == "running" and "slurm job 7_1 has ended" in reason
        assert run_state(run_dir, "7_1", {"7_1": slurm("PENDING", "Priority")}, now)[0] == "requeued"  # job's


def test_a_job_that_cannot_start_as_submitted_says_to_scancel_it(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    now = time.time()
    state, reason = run_state(run_dir, "7_1", {"7_1": slurm("PENDING", "PartitionConfig")}, now)
    assert state == "pending" and reason == ("slurm job 7_1 pending (PartitionConfig); it cannot start as "
                                             "submitted: scancel 7 and relaunch with other resources")
    for waits in ("Priority", "Resources", "QOSMaxJobsPerUserLimit", "JobArrayTaskLimit"):  # these clear
        assert run_state(run_dir, "7_1", {"7_1": slurm("PENDING", waits)}, now)[1] == f"slurm job 7_1 pending ({waits})"


@pytest.mark.skipif(not shutil.which("squeue"), reason="needs Slurm's commands (scripts/slurm/up.sh installs them)")
def test_a_slurm_controller_that_does_not_answer_stops_a_launch_and_status_says_so(tmp_path, capsys, monkeypatch):
    # the real squeue and sacct, pointed at a controller nobody runs (answers at once: connect refused)
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=localhost\nSlurmctldPort=9\nMessageTimeout=1\n"
                    "TCPTimeout=1\nNodeName=localhost CPUs=1\nPartitionName=debug Nodes=localhost Default=YES\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    grid, results = grid_file(tmp_path), tmp_path / "results"
    from sweep.grid import load_grid

    run_ids = [r.run_id for r in load_grid(grid).runs]
    manifest = {"sweep": "tiny", "launches": [], "runs": {run_id: {
        "config": config_from_dict({"model": "cpu-s"}).to_dict(),
        "jobs": [{"executor": "slurm", "job_id": f"5_{i}", "submitted": "2026-11-29T10:00:00"}]}
        for i, run_id in enumerate(run_ids)}}
    (results / "tiny").mkdir(parents=True)
    (results / "tiny" / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in (results / "tiny").iterdir())
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"sweep launch: error: squeue failed: .*Unable to contact slurm controller.*; cannot tell "
                        r"whether the Slurm jobs of \d+ runs are still queued, so nothing is launched: try again "
                        r"once the controller answers\n", err), err
    assert sorted(p.name for p in (results / "tiny").iterdir()) == before
    assert json.loads((results / "tiny" / "manifest.json").read_text()) == manifest
    assert main(["status", str(results / "tiny")]) == 0
    out, err = capsys.readouterr()
    assert "warning: squeue failed: " in err and "the states below come from the run folders alone" in err
    assert f"{len(run_ids)} runs: {len(run_ids)} pending" in out


def test_slurm_jobs_requeue_at_many_time_limits_and_are_signalled_in_time_to_checkpoint(tmp_path):
    from sweep.config import SlurmOptions
    from sweep.launch import MAX_REQUEUES, slurm_executor

    for minutes, signal_before in ((1, 15), (4, 60), (60, 90)):
        executor = slurm_executor(tmp_path, SlurmOptions(time_min=minutes), "x")._executor
        assert executor.max_num_timeout == MAX_REQUEUES >= 100
        assert executor.parameters["signal_delay_s"] == signal_before, minutes  # sbatch --signal=USR2@<it>


@pytest.mark.parametrize("text,expected", [
    ("12_[0-9:3%2]|PENDING|0:0|JobArrayTaskLimit", {"12_0", "12_3", "12_6", "12_9"}),
    ("12_[1,4-5]|PENDING|0:0|Priority", {"12_1", "12_4", "12_5"}),
    ("12_7|CANCELLED by 0|0:15|None", {"12_7"}),
    ("13|RUNNING|0:0|None", {"13"}),
    ("garbage\n|||\n", set()),
])
def test_scheduler_lines_are_parsed_with_array_ranges_and_steps(text, expected):
    assert set(parse_scheduler_lines(text)) == expected


def test_a_requeued_jobs_latest_line_wins():
    states = parse_scheduler_lines("5_0|REQUEUED|0:0|None\n5_0|RUNNING|0:0|None\n")
    assert states["5_0"]["state"] == "RUNNING"


def test_status_of_a_directory_without_a_sweep_exits_2(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err


def manifest(results, sweep, runs):
    (results / sweep).mkdir(parents=True, exist_ok=True)
    (results / sweep / "manifest.json").write_text(json.dumps({"sweep": sweep, "launches": [], "runs": runs}))


def test_status_names_the_sweep_of_each_run_when_there_are_several_and_shows_an_empty_one(tmp_path, capsys):
    cfg = config_from_dict({"model": "cpu-s"}).to_dict()
    manifest(tmp_path, "queued", {})  # a `sweep tune` whose trials have not started: no runs yet
    assert main(["status", str(tmp_path / "queued")]) == 0
    assert "0 runs (none launched yet)" in capsys.readouterr().out
    manifest(tmp_path, "first", {"x": {"config": cfg}})
    manifest(tmp_path, "second", {"x": {"config": cfg}})
    assert main(["status", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["sweep", "run_id", "state"]
    assert [line.split()[:3] for line in lines[1:3]] == [["first", "x", "pending"], ["second", "x", "pending"]]


@pytest.mark.parametrize("entry, says", [("just a string", "runs.x: is not a run entry; remove it"),
                                         ({"config": {"model": "cpu-s"}}, "runs.x: has no"),
                                         ({"config": {"model": "cpu-s"}, "jobs": 7}, "runs.x.jobs: is not a list")])
def test_a_manifest_run_entry_status_cannot_show_is_one_line_naming_it(tmp_path, capsys, entry, says):
    manifest(tmp_path, "s", {"x": entry})
    assert main(["status", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"manifest.json: {says}" in err


def test_a_copied_sweep_is_told_apart_by_its_folder(tmp_path, capsys):
    import shutil

    cfg = config_from_dict({"model": "cpu-s"}).to_dict()
    manifest(tmp_path, "g1", {"cpu-s_none65_none32_s0_0000": {"config": cfg}})
    shutil.copytree(tmp_path / "g1", tmp_path / "g1_copy")  # its manifest still says sweep g1
    assert sorted(r["sweep"] for r in collect(tmp_path)) == ["g1", "g1_copy"]
    assert main(["status", str(tmp_path)]) == 0
    assert "g1_copy" in capsys.readouterr().out


def test_collect_reads_many_runs(tmp_path):
    sweep = tmp_path / "many"
    runs = {}
    for i in range(50):
        rid = f"cpu-s_random17_none32_s{i}_0000"
        (sweep / rid).mkdir(parents=True)
        (sweep / rid / "result.json").write_text(json.dumps({"status": "completed" if i % 2 else "failed",
                                                             "error": None if i % 2 else "boom"}))
        runs[rid] = {"config": {"model": "cpu-s", "image_strategy": "random", "image_tokens": 17,
                                "text_strategy": "none", "text_tokens": 32, "seed": i}}
    (sweep / "manifest.json").write_text(json.dumps({"sweep": "many", "runs": runs, "launches": []}))
    rows = collect(sweep)
    assert sum(r["state"] == "completed" for r in rows) == 25
    assert {r["reason"] for r in rows if r["state"] == "failed"} == {"boom"}


def test_prepare_text_tags_the_syntax_runs_captions_before_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    grid = tmp_path / "text.yaml"
    grid.write_text(TINY.format(extra="  train_scenes: 200").replace("  train_scenes: 500\n", "").replace(
        "{image_strategy: [random, resize], image_tokens: 17}", "{text_strategy: [syntax, block], text_tokens: 6}"))
    assert main(["prepare-text", str(grid)]) == 0
    first = re.search(r"(\d+) captions in the cache \(counted per source: (\d+) tagged now, 0 found there\)",
                      capsys.readouterr().out)
    assert first and first[1] == first[2] and int(first[1]) > 0
    assert list((tmp_path / "cache").rglob("*.json")), "nothing was written to the spaCy cache"
    assert main(["prepare-text", str(grid)]) == 0  # all of them are there now
    assert f"{first[1]} captions in the cache (counted per source: 0 tagged now, {first[1]} found there)" in \
        capsys.readouterr().out
    plain = grid_file(tmp_path)
    assert main(["prepare-text", str(plain)]) == 0
    assert "no run of this grid uses the syntax strategy" in capsys.readouterr().out


def test_a_run_another_process_is_training_is_skipped_and_said_so(tmp_path, capsys):
    grid, results = grid_file(tmp_path), tmp_path / "results"
    from sweep.grid import load_grid

    held = load_grid(grid).runs[1].run_id
    (results / "tiny" / held).mkdir(parents=True)
    with exclusive(results / "tiny" / held):
        assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 queued or running; 2 to run" in out
    assert f"skipped {held}: being trained by another process" in out


def test_the_manifest_keeps_every_job_id_and_reads_the_older_single_job_form(tmp_path):
    from sweep.grid import load_grid
    from sweep.launch import write_manifest

    grid, results = load_grid(grid_file(tmp_path)), tmp_path / "results"
    first = grid.runs[0].run_id
    (results / "tiny").mkdir(parents=True)
    (results / "tiny" / "manifest.json").write_text(json.dumps({  # as written before job histories were kept
        "sweep": "tiny", "launches": [],
        "runs": {first: {"config": {}, "job": {"executor": "slurm", "job_id": "4_0", "submitted": "t0"}}}}))
    write_manifest(grid, results, {"time": "t1", "executor": "slurm", "runs": [first], "jobs": {first: "9_2"}})
    manifest = json.loads((results / "tiny" / "manifest.json").read_text())
    assert [j["job_id"] for j in manifest["runs"][first]["jobs"]] == ["4_0", "9_2"]
    assert "job" not in manifest["runs"][first]
    assert {r["run_id"]: r["jobs"] for r in collect(results / "tiny")}[first] == ["4_0", "9_2"]


@pytest.mark.parametrize("body, says", [(b'{"sweep": "tiny", "ru', "unreadable"),
                                        (b'{"runs": {}, "launches": 5}', "launches: is not a list")])
def test_a_corrupt_manifest_is_a_one_line_error_and_is_never_replaced(tmp_path, capsys, body, says):
    grid, results = grid_file(tmp_path), tmp_path / "results"
    (results / "tiny").mkdir(parents=True)
    (results / "tiny" / "manifest.json").write_bytes(body)
    for argv in (["status", str(results / "tiny")],
                 ["launch", str(grid), "--results", str(results), "--executor", "local", "--dry-run"],
                 ["launch", str(grid), "--results", str(results), "--executor", "local", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "manifest.json" in err and says in err, err
    assert (results / "tiny" / "manifest.json").read_bytes() == body


@pytest.mark.slow
def test_a_local_worker_of_two_tasks_trains_each_run_on_both(tmp_path, capsys):
    grid, results = grid_file(tmp_path, "slurm: {tasks_per_node: 2}"), tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--quiet"]) == 0
    assert "3 runs: 3 completed" in capsys.readouterr().out
    records = [json.loads(p.read_text()) for p in (results / "tiny").glob("*/result.json")]
    assert [r["compute"]["world_size"] for r in records] == [2, 2, 2]
    manifest = json.loads((results / "tiny" / "manifest.json").read_text())
    assert manifest["launches"][-1]["workers"] == 1 and manifest["launches"][-1]["tasks_per_worker"] == 2


@pytest.mark.slow
def test_an_evaluation_failing_on_rank_0_stops_both_ranks_and_the_worker(tmp_path, capsys):
    import io
    import tarfile

    # a shard whose images do not decode: read on rank 0 alone, when the run starts (a table is read at load)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for i in range(3):
            for suffix, data in ((".jpg", bytes(range(256)) * 2), (".txt", f"a caption {i}".encode())):
                member = tarfile.TarInfo(f"{i:04d}{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    grid = grid_file(tmp_path, f"  eval_sets: [{{name: bad, type: retrieval, data: {tmp_path / 'bad.tar'}}}]\n"
                               "slurm: {tasks_per_node: 2}")
    results = tmp_path / "results"
    started = time.time()
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--quiet"]) == 1
    assert time.time() - started < 240  # rank 1 waited for rank 0 until gloo's timeout (an hour) before
    out = capsys.readouterr().out
    assert "3 runs: 1 failed, 2 pending" in out and "none of its 3 images" in out, out  # the rest: next launch


@pytest.mark.slow
def test_a_run_whose_peer_process_dies_is_not_failed_and_a_relaunch_resumes_it(tmp_path, capsys):
    import signal
    import subprocess
    import sys

    grid = grid_file(tmp_path, "slurm: {tasks_per_node: 2}")
    grid.write_text(grid.read_text().replace("pretrain_samples: 256", "pretrain_samples: 6400"))  # 100 steps
    results = tmp_path / "results"
    launch = subprocess.Popen([sys.executable, "-m", "sweep.cli", "launch", str(grid), "--results", str(results),
                               "--executor", "local", "--quiet"], start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(results.glob("tiny/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.2)
    (interrupted,) = [p.parent for p in results.glob("tiny/*/checkpoint.pt")]
    rank_1 = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/environ")
              if _reads(p, b"SUBMITIT_LOCAL_GLOBALID=1\0") and str(results).encode() in _reads(p.parent / "cmdline")]
    assert rank_1, "no second process of the run was found"
    os.kill(rank_1[0], signal.SIGKILL)  # the run's other process dies (OOM killer, a lost node, ...)
    launch.communicate(timeout=300)
    assert not (interrupted / "result.json").exists()  # not a failure of the run: a relaunch resumes it
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--quiet"]) == 0
    assert "3 runs: 3 completed" in capsys.readouterr().out
    record = json.loads((interrupted / "result.json").read_text())
    assert record["status"] == "completed" and record["resumed"]


def _reads(path: Path, needle: bytes = b"") -> bytes:
    try:
        data = path.read_bytes()
    except OSError:  # a process that ended meanwhile, or another user's
        return b""
    return data if needle in data else b""


@pytest.mark.parametrize("world,field", [(3, "settings.batch_size")])
def test_a_batch_that_does_not_split_into_a_runs_processes_is_refused_before_launch(tmp_path, capsys, world, field):
    grid, results = grid_file(tmp_path, f"slurm: {{tasks_per_node: {world}}}"), tmp_path / "results"
    for extra in ([], ["--dry-run"]):
        assert main(["launch", str(grid), "--results", str(results), "--executor", "local", *extra]) == 2
        assert f"{field}: 64 does not split into the {world} processes" in capsys.readouterr().err
    assert not results.exists()


@pytest.mark.parametrize("gpus,options,expected", [
    (0, {}, [((), 1)] * 3),                                    # CPU: one run per worker, --max-parallel of them
    (0, {"tasks_per_node": 2}, [((), 2)]),                     # CPU, two processes per run: one worker
    (4, {}, [((0,), 1), ((1,), 1), ((2,), 1)]),                # one run per GPU (3 = --max-parallel)
    (4, {"gpus_per_node": 2}, [((0, 1), 2), ((2, 3), 2)]),     # one task per GPU
    (8, {"gpus_per_node": 8}, [(tuple(range(8)), 8)]),         # one run across the machine
])
def test_local_workers_share_the_machines_gpus_without_overlap(gpus, options, expected):
    from sweep.config import SlurmOptions
    from sweep.launch import local_workers

    workers = local_workers(3, SlurmOptions(**options), runs=10, gpus=gpus)
    assert [(w.get("visible_gpus", ()), w["tasks_per_node"]) for w in workers] == expected


def test_a_run_that_needs_more_than_this_machine_is_refused_before_anything_runs(tmp_path, capsys):
    results = tmp_path / "results"
    grid = grid_file(tmp_path, "slurm: {nodes: 2}")
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local"]) == 2
    assert "slurm.nodes" in capsys.readouterr().err and not results.exists()


def test_the_plan_gives_gpu_hours_and_the_time_on_the_runs_gpus(tmp_path, capsys):
    grid = tmp_path / "paper.yaml"
    grid.write_text("sweep: paper\nsettings: {pretrain_samples: 2560000000, finetune_samples: 0, batch_size: 32768, "
                    "train_scenes: 40000}\n"
                    "axes: {model: [ViT-B-16], image_strategy: [resize], image_tokens: [50]}\nbaselines: false\n"
                    "slurm: {gpus_per_node: 8}\n")
    hours = []
    for nodes in ("1", "2"):
        assert main(["plan", str(grid), "--tflops", "100", "--nodes", nodes]) == 0
        total = capsys.readouterr().out.splitlines()[-1]
        assert total.endswith("GPU-hours")
        hours.append((total.split(", ")[-1], total.split(", ")[2]))
    assert hours[0][0] == hours[1][0]  # the same GPU-hours on 16 GPUs as on 8, in half the time
    assert hours[0][1] != hours[1][1]


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """$CLIPA_DATA as the paper recipes expect it, with empty image files but one per set: enough for the load-time
    checks."""
    import io

    root = tmp_path_factory.mktemp("clipa")
    (root / "laion400m").mkdir()
    for i in range(41408):
        (root / "laion400m" / f"{i:05d}.tar").touch()
    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(picture, "JPEG")
    for i in range(1000):  # ImageNet's 1000 wnid folders (the load-time check lists them), one image each
        (root / "imagenet" / "val" / f"n{i:08d}").mkdir(parents=True)
        # the load-time check decodes images up to the first that decodes
        (root / "imagenet" / "val" / f"n{i:08d}" / "a.JPEG").write_bytes(b"" if i else picture.getvalue())
    (root / "coco" / "val2014").mkdir(parents=True)  # the retrieval table's images must exist at load
    for i in range(2):
        (root / "coco" / "val2014" / f"{i}.jpg").write_bytes(b"" if i else picture.getvalue())
    (root / "coco" / "test_5k.csv").write_text("filepath\ttitle\n" + "".join(
        f"val2014/{i}.jpg\ta caption {j} of image {i}\n" for i in range(2) for j in range(5)))
    return root


@pytest.mark.parametrize("recipe", sorted(Path("grids/paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_paper_recipe_plans_and_dry_runs_at_its_stated_cost(recipe, paper_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CLIPA_DATA", raising=False)
    assert main(["plan", str(recipe)]) == 2  # the data's place is asked for by name
    assert "CLIPA_DATA is not set" in capsys.readouterr().err
    monkeypatch.setenv("CLIPA_DATA", str(paper_data))
    tuning = "\ntune:" in recipe.read_text()  # a tuning recipe states the cost of its trials
    costs = ["tune", str(recipe), "--dry-run", "--results", str(tmp_path)] if tuning else ["plan", str(recipe)]
    assert main(costs) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total:"))
    stated = recipe.read_text().split("GPU-hours")[0].rsplit(", ", 1)[-1].strip()  # "73,500" in the header
    hours = int(total.split(", ")[-1].split()[0].replace(",", ""))
    assert (round(hours, -2) if hours > 1000 else hours) == int(stated.replace(",", "")), total
    where = ["--executor", "slurm"] if slurm_available() else ["--executor", "local", "--nodes", "1"]
    assert main(["tune" if tuning else "launch", str(recipe), "--results", str(tmp_path), *where, "--dry-run"]) == 0
    assert "nothing written, nothing submitted" in capsys.readouterr().out and not any(tmp_path.iterdir())


@pytest.mark.parametrize("option", [["--tflops", "0"], ["--tflops", "nan"], ["--tflops", "-5"],
                                    ["--max-parallel", "0"]])
def test_plan_refuses_a_throughput_or_parallelism_it_cannot_divide_by(option, capsys):
    assert main(["plan", "grids/smoke.yaml", *option]) == 2
    assert option[0] in capsys.readouterr().err
