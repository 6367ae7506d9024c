"""`sweep tune`: the tune: section, studies run by local workers, pruning from inside the trainer, a worker killed
mid-trial, and the best settings used by a launch."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sweep.cli import main
from sweep.config import ConfigError
from sweep.grid import load_grid
from sweep.record import read_record
from sweep.tune import JOURNAL, apply_best, storage, studies_of

ROOT = Path(__file__).parent.parent

TINY = {
    "sweep": "tiny_tune",
    "settings": {"pretrain_samples": 256, "finetune_samples": 64, "batch_size": 32, "eval_every": 2,
                 "eval_zeroshot_samples": 80, "eval_retrieval_samples": 40, "train_scenes": 500},
    "axes": {"model": ["cpu-s"]},
    "tune": {"params": {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}, "trials": 8, "startup_trials": 2},
}


def write(tmp_path: Path, grid: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def trials_of(folder: Path) -> list:
    store = storage(folder)
    return [t for s in store.get_all_studies() for t in optuna.load_study(study_name=s.study_name,
                                                                            storage=store).trials]


def tune(*args: str) -> int:
    return main(["tune", *map(str, args), "--executor", "local", "--quiet", "--no-figures"])


# ------------------------------------------------------------------------------------------------- validation

def with_tune(**changes) -> dict:
    grid = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        where = grid
        *parents, last = key.split(".")
        for part in parents:
            where = where[part]
        where[last] = value
    return grid


@pytest.mark.parametrize("change, field", [
    ({"tune.scope": "size"}, "tune.scope"),
    ({"tune.params.lr": {"low": 1.0e-2, "high": 1.0e-4}}, "tune.params.lr"),
    ({"tune.params.lr": {"low": 0.0, "high": 1.0e-2, "log": True}}, "tune.params.lr.low"),
    ({"tune.params.lr": {"low": -1.0, "high": 1.0e-2}}, "tune.params.lr.low"),
    ({"tune.params.lr": {"choices": []}}, "tune.params.lr.choices"),
    ({"tune.params": {"threads": {"low": 1, "high": 2}}}, "tune.params.threads"),
    ({"tune.params": {"model": {"choices": ["cpu-s", "cpu-m"]}}}, "tune.params.model"),
    ({"tune.params": {"seed": {"low": 0, "high": 3}}}, "tune.params.seed"),  # a cell, not a setting to search
    ({"tune.params": {"text_strategy": {"choices": ["truncation", "syntax"]}}}, "tune.params.text_strategy"),
    ({"tune.params": {"batch_size": {"low": 16, "high": 32.5}}}, "tune.params.batch_size"),
    ({"tune.params": {"learning_rate": {"low": 1, "high": 2}}}, "tune.params.learning_rate"),
    ({"tune.trials": 0}, "tune.trials"),
    ({"tune.pruner": "median", "settings.eval_every": 0}, "tune.pruner"),
    ({"settings.finetune_samples": 0}, "tune.objective.stage"),
    ({"tune.objective": {"metric": "imagenet_top1"}}, "tune.objective.metric"),
    ({"tune.objective": {"direction": "up"}}, "tune.objective.direction"),
    ({"tune.colour": "red"}, "tune.colour"),
])
def test_a_bad_tune_section_is_one_line_naming_its_field_and_nothing_is_written(tmp_path, capsys, change, field):
    path = write(tmp_path, with_tune(**change))
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert err.value.field == field, str(err.value)
    assert tune(path, "--results", tmp_path / "results") == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and str(path) in message and field in message
    assert not (tmp_path / "results").exists()


def test_a_swept_setting_cannot_also_be_tuned(tmp_path):
    grid = with_tune()
    grid["axes"]["lr"] = [1e-3, 2e-3]
    with pytest.raises(ConfigError, match="either swept or tuned"):
        load_grid(write(tmp_path, grid))
    del grid["axes"]["lr"]
    grid["axes"]["optimizer"] = {"lr": [1e-3, 2e-3]}  # a group of one sub-grid, written without its list
    with pytest.raises(ConfigError, match="either swept or tuned"):
        load_grid(write(tmp_path, grid))


def test_studies_are_per_model_on_the_full_length_run_and_named_by_their_search(tmp_path):
    grid = with_tune()
    grid["axes"] = {"model": ["cpu-s", "cpu-m"], "image": [{"image_strategy": "random", "image_tokens": [17, 5]}]}
    studies = studies_of(load_grid(write(tmp_path, grid)))
    assert sorted(s.label for s in studies) == ["cpu-m", "cpu-s"]
    assert all(s.base.image_strategy == "none" and s.base.image_tokens == 65 for s in studies)
    more = with_tune(**{"tune.trials": 20})
    more["axes"] = grid["axes"]
    assert [s.name for s in studies_of(load_grid(write(tmp_path, more, "more.yaml")))] == [s.name for s in studies]
    wider = with_tune(**{"tune.params.lr": {"low": 1.0e-5, "high": 1.0e-2, "log": True}})
    wider["axes"] = grid["axes"]
    assert not {s.name for s in studies_of(load_grid(write(tmp_path, wider, "wider.yaml")))} & {s.name for s in studies}
    cells = with_tune(**{"tune.scope": "cell"})
    cells["axes"] = {**grid["axes"], "seed": [0, 1]}
    cell_studies = studies_of(load_grid(write(tmp_path, cells, "cells.yaml")))
    assert len(cell_studies) == 6  # 4 cells + 2 baselines, each studied once for its two seeds
    assert {s.base.seed for s in cell_studies} == {0} and all(s.label.endswith("_s0") for s in cell_studies)


def journal_of(folder: Path, grid, best) -> None:
    """A journal in which each study of `grid` has three trials told by hand, the best being `best(study)`."""
    from sweep.tune import load_study

    store = storage(folder)
    for s in studies_of(grid):
        opened = load_study(s, grid.tune, store)
        for lr in [3e-4, 1e-3, 3e-3]:
            opened.add_trial(optuna.trial.create_trial(params={"lr": lr}, value=float(lr == best(s)),
                             distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}))


def test_a_model_size_swept_over_another_setting_has_a_study_per_value_and_each_serves_its_runs(tmp_path):
    grid = with_tune()
    grid["axes"] = {"model": ["cpu-s"], "weight_decay": [0.05, 0.2], "seed": [0, 1],
                    "image": [{"image_strategy": "random", "image_tokens": 17}]}
    tuned_grid = load_grid(write(tmp_path, grid))
    studies = studies_of(tuned_grid)
    assert sorted(s.label for s in studies) == ["cpu-s_weight_decay=0.05", "cpu-s_weight_decay=0.2"]
    journal_of(tmp_path / "tuned", tuned_grid, lambda s: 3e-4 if s.base.weight_decay == 0.05 else 3e-3)
    tuned, used = apply_best(tuned_grid, tmp_path / "tuned")
    assert len(used) == 2 and all(r.config.lr == (3e-4 if r.config.weight_decay == 0.05 else 3e-3)
                                  for r in tuned.runs)
    other = with_tune()  # a grid of other settings: a size with several studies cannot say which serves it
    other["settings"]["weight_decay"] = 0.1
    with pytest.raises(ConfigError, match="its size has 2 studies of other settings"):
        apply_best(load_grid(write(tmp_path, other, "other.yaml")), tmp_path / "tuned")


def test_show_says_a_study_with_one_complete_trial_has_no_figure_yet(tmp_path):
    from sweep.tune import load_study, show

    grid = load_grid(write(tmp_path, TINY))
    folder = tmp_path / "results" / TINY["sweep"]
    opened = load_study(studies_of(grid)[0], grid.tune, storage(folder))
    opened.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, value=5.0, distributions={
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}))
    assert "figure: none yet (a history needs two complete trials, it has 1)" in show(grid, tmp_path / "results")
    assert not (folder / "figures").exists()


def test_a_damaged_journal_line_is_one_error_naming_it_and_a_line_being_written_is_left_alone(tmp_path, capsys):
    grid_path = write(tmp_path, TINY)
    folder = tmp_path / "results" / TINY["sweep"]
    journal_of(folder, load_grid(grid_path), lambda s: 1e-3)
    lines = (folder / JOURNAL).read_bytes().split(b"\n")
    (folder / JOURNAL).write_bytes(b"\n".join(lines) + b'{"op_code": 4, "wor')  # another process writing
    assert main(["tune", str(grid_path), "--results", str(tmp_path / "results"), "--show", "--no-figures"]) == 0
    capsys.readouterr()
    (folder / JOURNAL).write_bytes(b"\n".join(lines[:2] + [lines[2][:20] + lines[3]] + lines[4:]))  # cut, continued
    for args in (["tune", str(grid_path), "--results", str(tmp_path / "results"), "--show"],
                 ["launch", str(grid_path), "--from-tune", str(folder), "--dry-run"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{folder / JOURNAL}: line 3: is no journal entry" in err, err


def test_runs_tuned_a_cell_at_a_time_are_one_setup_with_their_baseline(tmp_path):
    """Each cell has its own best lr: the analysis still measures each cell's drop against its baseline."""
    from analysis.load import _launched_runs, setup_id
    from sweep.launch import write_manifest

    grid = with_tune(**{"tune.scope": "cell"})
    grid["axes"] = {"model": ["cpu-s"], "seed": [0, 1], "image": [{"image_strategy": "random", "image_tokens": 17}]}
    cells = load_grid(write(tmp_path, grid))
    journal_of(tmp_path / "tuned", cells, lambda s: 3e-4 if s.base.image_strategy == "none" else 3e-3)
    tuned, _ = apply_best(cells, tmp_path / "tuned")
    assert sorted(r.config.lr for r in tuned.runs) == [3e-4, 3e-4, 3e-3, 3e-3]  # both seeds of each cell
    write_manifest(tuned, tmp_path / "results", None)
    marked = _launched_runs(tmp_path / "results" / cells.sweep)
    assert marked == {r.run_id: ["lr"] for r in tuned.runs}
    assert len({setup_id(r.config.to_dict(), marked[r.run_id]) for r in tuned.runs}) == 1
    assert len({setup_id(r.config.to_dict()) for r in tuned.runs}) == 2  # as the lr alone tells them


def test_the_tuning_grids_validate_and_cover_the_default_study():
    tune_grid = load_grid(ROOT / "grids" / "tune_lr.yaml")
    study = load_grid(ROOT / "grids" / "image_strategies.yaml")
    assert {s.base.model for s in studies_of(tune_grid)} == {r.config.model for r in study.runs}
    for s in studies_of(tune_grid):  # tuned on the default study's full-length run, as its baselines are trained
        baseline = next(r.config for r in study.runs if r.baseline and r.config.model == s.base.model)
        same = {"pretrain_samples", "finetune_samples", "batch_size", "train_scenes", "eval_zeroshot_samples",
                "eval_retrieval_samples"}
        assert {k: getattr(s.base, k) for k in same} == {k: getattr(baseline, k) for k in same}


def test_launch_from_tune_gives_each_model_its_best_learning_rate(tmp_path, capsys):
    """The journal of grids/tune_lr.yaml's studies, with trials told by hand, applied to the default study."""
    tune_grid = load_grid(ROOT / "grids" / "tune_lr.yaml")
    folder = tmp_path / "tune_lr"
    store = storage(folder)
    from sweep.tune import load_study

    best = {}
    for i, s in enumerate(studies_of(tune_grid)):
        opened = load_study(s, tune_grid.tune, store)
        for j, lr in enumerate([3e-4, 1e-3, 3e-3]):
            value = 10.0 + j if i % 2 else 20.0 - j  # the best lr differs between models
            opened.add_trial(optuna.trial.create_trial(params={"lr": lr}, value=value, distributions={
                "lr": optuna.distributions.FloatDistribution(2e-4, 5e-3, log=True)}))
        best[s.base.model] = opened.best_trial.params["lr"]
    study = load_grid(ROOT / "grids" / "image_strategies.yaml")
    tuned, used = apply_best(study, folder)
    assert len(used) == 3 and len(tuned.runs) == len(study.runs)
    assert all(r.config.lr == best[r.config.model] for r in tuned.runs)
    assert {r.run_id for r in tuned.runs}.isdisjoint(r.run_id for r in study.runs)  # new settings, new ids
    assert main(["launch", str(study.path), "--from-tune", str(folder), "--dry-run", "--results",
                 str(tmp_path / "results")]) == 0
    assert "tuned settings from" in capsys.readouterr().out
    assert main(["launch", str(study.path), "--from-tune", str(tmp_path / "nothing"), "--dry-run"]) == 2
    swept = yaml.safe_load(study.path.read_text())
    swept["axes"]["lr"] = [1e-3, 2e-3]  # tuned and swept: the axis would collapse into one run per cell
    assert main(["launch", str(write(tmp_path, swept)), "--from-tune", str(folder), "--dry-run"]) == 2
    assert "differ only in lr" in capsys.readouterr().err
    bigger = yaml.safe_load(study.path.read_text())
    bigger["settings"]["batch_size"] *= 8  # a rate tuned at one batch is not the rate of another
    assert main(["launch", str(write(tmp_path, bigger)), "--from-tune", str(folder), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"tuned lr at batch_size {study.runs[0].config.batch_size} and" in err and "does not carry over" in err


# ---------------------------------------------------------------------------------------------- running studies

@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """grid TINY tuned to the end by two local workers."""
    tmp = tmp_path_factory.mktemp("tune")
    path = write(tmp, TINY)
    code = main(["tune", str(path), "--results", str(tmp / "results"), "--executor", "local", "--max-parallel", "2",
                 "--quiet"])
    return tmp, path, code


@pytest.mark.slow
def test_a_study_of_eight_trials_with_two_local_workers_completes(finished_study, capsys):
    tmp, path, code = finished_study
    folder = tmp / "results" / "tiny_tune"
    assert code == 0
    trials = trials_of(folder)
    assert len(trials) == 8 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 2
    for t in trials:  # each trial is an ordinary run whose record names it
        record = read_record(folder / t.user_attrs["run_id"])
        assert record.trial == {"study": studies_of(load_grid(path))[0].name, "number": t.number}
        assert record.config["lr"] == pytest.approx(t.params["lr"])
        if t.state == TrialState.PRUNED:  # pruned from inside the trainer, at a reported step
            assert record.status == "pruned" and record.pruned_at.step in {e.step for e in record.evals}
            assert record.weights is None
        else:
            assert record.status == "completed"
            assert t.value == record.metrics["finetune"].zeroshot_top1
            assert [e.step for e in record.evals if e.stage == "pretrain"] == [2, 4, 6, 8]
            assert t.intermediate_values  # what the pruner saw
    assert main(["status", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "trial" in out.splitlines()[0] and f"{studies_of(load_grid(path))[0].name}#0" in out  # its study, named
    assert main(["tune", str(path), "--results", str(tmp / "results"), "--show"]) == 0
    out = capsys.readouterr().out
    assert "8 of 8 trials" in out and "best:" in out
    assert (folder / "figures" / f"{studies_of(load_grid(path))[0].name}_history.png").stat().st_size > 10_000
    # a relaunch runs nothing
    assert tune(path, "--results", tmp / "results") == 0
    assert "every study has its trials" in capsys.readouterr().out
    assert len(trials_of(folder)) == 8


@pytest.mark.slow
def test_the_best_learning_rate_found_is_used_by_a_launch(finished_study, tmp_path):
    tmp, path, _ = finished_study
    folder = tmp / "results" / "tiny_tune"
    best = optuna.load_study(study_name=studies_of(load_grid(path))[0].name, storage=storage(folder)).best_params
    grid = {**TINY, "sweep": "tiny_study", "axes": {"model": ["cpu-s"], "image_strategy": ["random"],
                                                   "image_tokens": [17]}}
    del grid["tune"]
    assert main(["launch", str(write(tmp_path, grid)), "--from-tune", str(folder), "--results",
                 str(tmp_path / "results"), "--executor", "local", "--max-parallel", "2", "--quiet"]) == 0
    records = [read_record(p) for p in (tmp_path / "results" / "tiny_study").glob("*/result.json")]
    assert len(records) == 2 and all(r.status == "completed" for r in records)  # the reduced run and its baseline
    assert all(r.config["lr"] == best["lr"] for r in records)
    from analysis.load import load_results  # the study's results are analysed; the trials' never are

    assert set(load_results(tmp_path / "results")["run_id"]) == {r.run_id for r in records}
    with pytest.raises(Exception, match="tuning trials"):
        load_results(folder)


@pytest.mark.slow
def test_a_diverging_range_ends_in_failed_or_pruned_trials_not_a_crash(tmp_path):
    grid = with_tune(**{"tune.params.lr": {"low": 50.0, "high": 5000.0, "log": True}, "tune.trials": 3,
                        "tune.pruner": "none"})
    grid["settings"]["grad_clip"] = 0.0
    path = write(tmp_path, grid)
    assert tune(path, "--results", tmp_path / "results", "--max-parallel", "2") == 0
    trials = trials_of(tmp_path / "results" / "tiny_tune")
    assert len(trials) == 3 and all(t.state in (TrialState.FAIL, TrialState.PRUNED) for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all("loss became" in t.user_attrs["reason"] for t in failed), [t.user_attrs for t in failed]


class Trial:
    """An Optuna trial as `run_trial` uses it, whose pruner says prune from step `prune_from` on."""

    def __init__(self, prune_from: float, number: int = 0):
        self.prune_from, self.number, self.params, self.user_attrs, self.reported = prune_from, number, {}, {}, []

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value

    def report(self, value, step):
        self.reported.append(step)

    def should_prune(self):
        return self.reported[-1] >= self.prune_from


class Study:
    def tell(self, trial, value=None, state=None):
        self.told = state or value


@pytest.mark.parametrize("stage, ends", [("pretrain", "completed"), ("finetune", "pruned")])
def test_a_trial_is_pruned_only_until_its_objective_stage_has_been_evaluated(tmp_path, stage, ends):
    from sweep.tune import run_trial

    grid = load_grid(write(tmp_path, with_tune(**{"tune.objective": {"stage": stage, "metric": "i2t_r1"}})))
    trial = Trial(prune_from=8)  # 256 samples / 32 per step: the fine-tune's reports count on from step 8
    assert run_trial(grid, tmp_path / "r", studies_of(grid)[0], Study(), trial, 1) == ends
    assert trial.reported == ([2, 4, 6] if stage == "pretrain" else [2, 4, 6, 8])


def test_a_run_pruned_under_one_trial_trains_on_under_the_next_that_draws_it(tmp_path):
    from sweep.tune import run_trial

    grid = load_grid(write(tmp_path, with_tune(**{"settings.checkpoint_every": 2})))
    study, folder = studies_of(grid)[0], tmp_path / "r"
    assert run_trial(grid, folder, study, Study(), Trial(prune_from=4), 1) == "pruned"
    told = Study()  # another study (say, a pruner changed) draws the same settings: the pruned run is no result
    assert run_trial(grid, folder, study, told, Trial(prune_from=math.inf, number=1), 1) == "completed"
    record = read_record(next(d for d in folder.iterdir() if (d / "result.json").exists()))
    # on from its last checkpoint, step 2: the prune came at the evaluation of step 4, before that step's checkpoint
    assert record.status == "completed" and record.resumed[0].step == 2 and told.told > 0


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_it_failed_and_a_relaunch_finishes_the_study(tmp_path, capsys):
    # the last trial is killed: the relaunch must still find it to do (it holds none of the study's trials)
    grid = with_tune(**{"tune.trials": 2, "tune.pruner": "none"})
    grid["settings"].update(pretrain_samples=1024, checkpoint_every=4, eval_every=0)
    path = write(tmp_path, grid)
    results, folder = tmp_path / "results", tmp_path / "results" / "tiny_tune"
    command = [sys.executable, "-m", "sweep", "tune", str(path), "--results", str(results), "--executor", "local",
               "--max-parallel", "1", "--quiet", "--no-figures"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    victim = None
    while victim is None:  # the second trial, once its run has a checkpoint
        assert launcher.poll() is None and time.time() < deadline, launcher.stderr.read()
        for lock in (folder / ".trials").glob("*.1.lock"):
            run_dirs = [d for d in folder.iterdir() if (d / "checkpoint.pt").exists() and not (d / "result.json")
                        .exists()]
            if run_dirs and lock.read_text().strip():
                victim = int(lock.read_text().split()[0])
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    assert launcher.wait(timeout=60) == 1  # the study is not finished: the launcher says so
    assert "worker ended with an error: it ended without a result (killed" in launcher.stderr.read()
    running = [t for t in trials_of(folder) if t.state == TrialState.RUNNING]
    assert [t.number for t in running] == [1]
    assert main(["tune", str(path), "--results", str(results), "--show", "--no-figures"]) == 0
    assert "1 of 2 trials" in capsys.readouterr().out  # and one abandoned, to be run again

    assert subprocess.run(command, capture_output=True).returncode == 0  # the relaunch finishes the study
    trials = {t.number: t for t in trials_of(folder)}
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["interrupted"]
    retry = [t for t in trials.values() if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == trials[1].params and retry[0].user_attrs["run_id"] == trials[1].user_attrs["run_id"]
    record = read_record(folder / retry[0].user_attrs["run_id"])
    assert record.resumed and record.resumed[0].step >= 4  # the retry resumed the killed run from its checkpoint
    counted = [t for t in trials.values() if not t.user_attrs.get("interrupted")]
    assert len(counted) == 2 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len({t.user_attrs["run_id"] for t in counted}) == 2  # no trial counted twice
    assert (folder / JOURNAL).exists()


def test_tune_refuses_a_grid_without_a_tune_section_and_show_before_any_study(tmp_path, capsys):
    plain = {k: v for k, v in TINY.items() if k != "tune"}
    assert tune(write(tmp_path, plain, "plain.yaml"), "--results", tmp_path / "results") == 2
    assert "no tune: section" in capsys.readouterr().err
    assert main(["tune", str(write(tmp_path, TINY)), "--results", str(tmp_path / "results"), "--show"]) == 2
    assert "nothing tuned yet" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    for command in ("tune", "launch"):
        assert main([command, str(tmp_path / "grid.yaml"), "--results", str(tmp_path / "file" / "r")]) == 2
        assert "--results" in capsys.readouterr().err  # one line, not a NotADirectoryError traceback
    assert not (tmp_path / "results").exists()
