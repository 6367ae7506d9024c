"""`sweep tune`: Optuna studies over run settings, each trial an ordinary run of the trainer.

A drop measured at a reduced length is only fair when every length's run had settings that suit it. A grid's
`tune:` section says which settings to search, and a study searches them per model size (on its full-length run)
or per grid cell:

    tune:
      params:                      # RunConfig settings; the setting's own type makes the search float or int
        lr: {low: 3.0e-4, high: 1.0e-2, log: true}
        warmup_fraction: {low: 0.0, high: 0.3}
        batch_size: {choices: [32, 64]}              # categorical
      trials: 8                    # per study; trials a killed worker left behind are retried, not counted
      scope: model                 # model: a study per model size, on its full-length run; cell: one per grid
                                   # cell (its seeds share it). Another swept setting (weight_decay: [...]) gets a
                                   # study per value.
      objective: {stage: finetune, metric: zeroshot_top1, direction: maximize}
      sampler: tpe                 # tpe or random, seeded by `seed`, the study and the trial's number
      seed: 0
      pruner: median               # median, hyperband or none; prunes on the evaluations every settings.eval_every
      startup_trials: 4            # trials sampled at random before TPE starts (and never pruned by median)

Where it lives (`<results>/<sweep>/`, on a filesystem every worker shares):

    optuna.journal          every study of the sweep: Optuna's JournalStorage, an append-only file (safe for
                            processes on several machines at once, no database server)
    <run_id>/               each trial's run: an ordinary run directory whose record names its trial; a trial that
                            samples settings already trained reuses that run's record
    manifest.json           the runs and the trials each served (`sweep status`)
    .trials/<study>.<n>.lock  held by the worker running trial n (with its pid); a RUNNING trial whose lock nobody
                            holds lost its worker: the next worker marks it failed and enqueues its settings again,
                            and the retry resumes the run from its checkpoint
    figures/                each study's optimisation history and parameter importances (`sweep tune --show`)

A worker takes trials (under `.tune.lock`, so no study gets more than `trials`) from the study with the fewest until
every study has its trials; locally `--max-parallel` workers, on Slurm an array of them (fire and forget; a
relaunch starts new workers, which finish what the earlier ones left).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import submitit

from sweep.analysis_spec import DEFAULT_METRIC, check_readout
from sweep.config import OPERATIONAL, RunConfig, config_from_dict, identity
from sweep.grid import FULL_LENGTH, STRUCTURED, full_length
from sweep.settings import ConfigError, Number, Settings, setting

JOURNAL = "optuna.journal"
CELL = {"model", "seed", *FULL_LENGTH}  # the settings that place a run in the grid


class Param(Settings):
    """The range of one tuned setting: low and high (log: sampled on a log scale), or choices."""

    low: Number | None = setting(None, "Smallest value (with high).")
    high: Number | None = setting(None, "Largest value (with low).")
    log: bool = setting(False, "Sample on a log scale (for learning rates; low must be positive).")
    choices: list[str | int | float | bool] | None = setting(None, "The values to choose from (instead of low/high).")


class Objective(Settings):
    """What a study optimises: one metric of the result record at one stage."""

    stage: str = setting("finetune", "The record's stage: pretrain, pretrain_full_length or finetune.")
    metric: str = setting(DEFAULT_METRIC, "A metric of that stage: zeroshot_top1, zeroshot_top5, i2t_r1, t2i_r1, "
                          "or <eval set>_<metric> of an eval set on disk (e.g. imagenet_top1).")
    direction: str = setting("maximize", "maximize or minimize.")


class TuneSpec(Settings):
    """A grid's `tune:` section."""

    section = "tune"

    params: dict[str, Param] = setting(..., "The settings to search, each with its range.")
    trials: int = setting(..., "Trials per study.", ge=1)
    scope: str = setting("model", "model: one study per model size, on its full-length run (the setting then "
                         "serves every length of that size); cell: one study per grid cell, on its first seed's "
                         "run (its seeds share the result). A setting the grid also sweeps gets a study per "
                         "value.")
    objective: Objective = setting(Objective(), "The metric to optimise.")
    sampler: str = setting("tpe", "tpe (Optuna's TPESampler) or random.")
    seed: int = setting(0, "Seeds the sampler (with the study's name and each trial's number, so parallel workers "
                        "and studies sample apart).", ge=0)
    pruner: str = setting("median", "median, hyperband or none; a pruner stops trials whose intermediate metric "
                          "trails, using the evaluations every settings.eval_every steps.")
    startup_trials: int = setting(4, "Trials of each study sampled at random before TPE models the history; "
                                  "the median pruner never prunes them either. Hyperband has no such count: its "
                                  "brackets compare a trial only with the trials beside it in its rung.", ge=0)


@dataclass(frozen=True)
class Study:
    """One study of a sweep: its name in the journal, and the run its trials vary."""

    name: str
    base: RunConfig
    label: str  # what the study covers: the model size (scope model), or the cell (its run id without the hash)


# ------------------------------------------------------------------------------------------------- validation

def check_tune(raw: Any, runs: list, axes_keys: set[str], source: str | Path) -> TuneSpec:
    """The grid's validated `tune:` section (ConfigError naming `source` and the field otherwise)."""
    spec = TuneSpec.from_mapping(raw, source)

    def bad(field: str, message: str) -> ConfigError:
        return ConfigError(f"tune.{field}", message, source)

    for name, value, allowed in (("scope", spec.scope, ("model", "cell")), ("sampler", spec.sampler, ("tpe", "random")),
                                 ("pruner", spec.pruner, ("median", "hyperband", "none")),
                                 ("objective.direction", spec.objective.direction, ("maximize", "minimize"))):
        if value not in allowed:
            raise bad(name, f"unknown value {value!r}; allowed: {', '.join(allowed)}")
    if not spec.params:
        raise bad("params", "is empty; name at least one setting to search")
    base = runs[0].config
    for name, param in spec.params.items():
        where = f"params.{name}"
        field = RunConfig.model_fields.get(name)
        if field is None or name in OPERATIONAL or name in STRUCTURED:
            raise bad(where, "is not a scientific setting of a run (see sweep train --help)")
        if name in CELL:  # a study compares settings within one cell, or one model's baseline
            raise bad(where, "says which grid cell a run is, not how it trains; make it an axis of the grid")
        if name in axes_keys:
            raise bad(where, "is also an axis of the grid; a setting is either swept or tuned")
        if param.choices is not None:
            if param.low is not None or param.high is not None or param.log:
                raise bad(where, "give either choices or low/high (and log), not both")
            if not param.choices:
                raise bad(f"{where}.choices", "is empty")
            values = [("choices", v) for v in param.choices]
        else:
            if param.low is None or param.high is None:
                raise bad(where, "needs low and high, or choices")
            if not param.low < param.high:
                raise bad(where, f"low ({param.low}) must be below high ({param.high})")
            if param.log and param.low <= 0:
                raise bad(f"{where}.low", "must be positive on a log scale")
            integer = _is_int_setting(name)
            if integer and not (float(param.low).is_integer() and float(param.high).is_integer()):
                raise bad(where, f"{name} is an integer setting; low and high must be integers")
            values = [("low", int(param.low) if integer else param.low),
                      ("high", int(param.high) if integer else param.high)]
        for end, value in values:  # every end of the range must be a valid value of the setting
            try:
                config_from_dict({**base.to_dict(), name: value})
            except ConfigError as err:
                raise bad(f"{where}.{end}", f"{value!r} is not a valid {name}: {err.message}") from None
    check_readout(spec.objective.stage, spec.objective.metric, base, "tune.objective", source)
    if spec.pruner != "none" and not base.eval_every:
        raise bad("pruner", f"{spec.pruner} prunes on the evaluations every settings.eval_every steps, and "
                  f"eval_every is 0: set it (e.g. to a quarter of a stage's steps) or use pruner: none")
    return spec


def _is_int_setting(name: str) -> bool:
    return RunConfig.model_fields[name].annotation in (int, int | None)


# ----------------------------------------------------------------------------------------------------- studies

def studies_of(grid) -> list[Study]:
    """The studies of a grid with a `tune:` section, in a stable order. A study's name holds a hash of its search
    (ranges, objective, sampler, pruner) and base run, so changing either starts a new study; changing only
    `trials` continues it."""
    spec: TuneSpec = grid.tune
    if spec.scope == "model":
        # one study per model size and setup: a size whose runs differ in another swept setting (weight_decay:
        # [0.05, 0.2]) has a study per value, labelled with it; its seeds share one
        bases: dict[tuple, tuple[RunConfig, dict[str, Any]]] = {}
        for run in grid.runs:
            base = full_length(run.config)
            pairs = setup(base, spec.params)
            bases.setdefault((base.model, repr(pairs)), (base, dict(pairs)))
        labelled = []
        for (model, _), (base, mine) in bases.items():
            others = [theirs for (m, _), (_, theirs) in bases.items() if m == model]
            differ = sorted(k for k, v in mine.items() if any(theirs[k] != v for theirs in others))
            label = "_".join([model] + [f"{k}={_fmt(getattr(base, k))}" for k in differ])
            labelled.append((re.sub(r"[^\w.=+-]", "-", label), base))  # a study's lock files are named by it
    else:
        cells: dict[str, tuple[str, RunConfig]] = {}
        for run in grid.runs:  # a cell's seeds share one study, on its first seed's run
            cells.setdefault(repr(setup(run.config, spec.params)), (run.run_id.rsplit("_", 1)[0], run.config))
        labelled = list(cells.values())
    search = spec.to_dict()
    search.pop("trials")
    out = []
    for label, base in labelled:
        fixed = [pair for pair in identity(base) if pair[0] not in spec.params]
        digest = hashlib.sha256(json.dumps([search, fixed], sort_keys=True, default=str).encode()).hexdigest()[:8]
        out.append(Study(f"{label}.{digest}", base, label))
    return out


def setup(cfg: RunConfig | dict[str, Any], params) -> list[tuple[str, Any]]:
    """What the runs that share a study's best settings have in common: their identity without the seed and the
    tuned settings."""
    return [pair for pair in identity(cfg) if pair[0] not in params and pair[0] != "seed"]


def storage(folder: str | Path):
    """The sweep's journal storage (created empty if absent)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the launcher's bar and `--show` say what happened
    Path(folder).mkdir(parents=True, exist_ok=True)
    check_journal(Path(folder) / JOURNAL)
    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(folder) / JOURNAL)))


def check_journal(path: Path) -> None:
    """ConfigError naming the first line of the journal that is no JSON (Optuna would fail on it with a traceback).
    Such a line is usually a write cut off by a kill, which the next append then continued on the same line. A
    last line without its newline may still be being written by another process: it is left to Optuna, which
    ignores it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for number, line in enumerate(data.split(b"\n")[:-1], 1):
        try:
            json.loads(line)
        except ValueError:
            raise ConfigError(f"line {number}", "is no journal entry (a write cut off when a process was killed?); "
                              "remove that line, losing the one operation it held, or move the journal aside to "
                              "start the studies again", path) from None


def distributions(spec: TuneSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, p in spec.params.items():
        if p.choices is not None:
            out[name] = CategoricalDistribution(p.choices)
        elif _is_int_setting(name):
            out[name] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            out[name] = FloatDistribution(p.low, p.high, log=p.log)
    return out


def sampler(spec: TuneSpec, study: str, number: int):
    """A fresh sampler for trial `number` of `study`: seeded by (seed, study, number), so parallel workers never
    draw the same settings, studies draw apart, and a study's draws do not depend on which worker asked. TPE reads
    the history from the journal."""
    import zlib

    import numpy as np
    import optuna

    seed = int(np.random.SeedSequence([spec.seed, zlib.crc32(study.encode()), number]).generate_state(1)[0])
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True)


def pruner(spec: TuneSpec, eval_every: int):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, eval_every))
    return optuna.pruners.NopPruner()


def load_study(study: Study, spec: TuneSpec, store):
    """The study in the journal, created (with what it covers, as user attributes) on first use."""
    import optuna

    opened = optuna.create_study(study_name=study.name, storage=store, direction=spec.objective.direction,
                                 pruner=pruner(spec, study.base.eval_every), load_if_exists=True)
    if not opened.user_attrs:
        for key, value in (("scope", spec.scope), ("label", study.label), ("model", study.base.model),
                           ("params", sorted(spec.params)), ("base", study.base.to_dict()),
                           ("objective", spec.objective.to_dict())):
            opened.set_user_attr(key, value)
    return opened


def counted(trial) -> bool:
    """Whether a trial uses up one of the study's `trials`: every one but those a killed worker left (retried), and
    the retries waiting to be asked for (the next `ask` takes one, and it counts from then on)."""
    from optuna.trial import TrialState

    return not (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")) \
        and trial.state != TrialState.WAITING


# ----------------------------------------------------------------------------------------------------- workers

@contextmanager
def tune_lock(folder: Path) -> Iterator[None]:
    """Serialises taking trials (count, fail the abandoned, ask) among every worker of the sweep."""
    with open(folder / ".tune.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def trial_lock_path(folder: Path, study: str, number: int) -> Path:
    return folder / ".trials" / f"{study}.{number}.lock"


def fail_abandoned(opened, store, folder: Path) -> None:
    """Mark RUNNING trials whose worker is gone (their lock is free) failed, and enqueue their settings again:
    the retry resumes the same run from its checkpoint. Call under `tune_lock`."""
    from optuna.trial import TrialState

    from sweep.results import held

    study_id = store.get_study_id_from_name(opened.study_name)
    for trial in opened.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if held(trial_lock_path(folder, opened.study_name, trial.number)):
            continue
        trial_id = store.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        store.set_trial_user_attr(trial_id, "interrupted", "its worker stopped (killed, preempted or timed out) "
                                  "before the trial ended; retried as a new trial")
        store.set_trial_state_values(trial_id, TrialState.FAIL)
        opened.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def next_trial(grid, folder: Path, store) -> tuple[Study, Any, Any, Any] | None:
    """(study, opened study, trial, its lock) of the next trial to run, from the study with the fewest; None when
    every study has its trials."""
    spec: TuneSpec = grid.tune
    from sweep.results import hold

    (folder / ".trials").mkdir(parents=True, exist_ok=True)
    with tune_lock(folder):
        open_studies = []
        for study in studies_of(grid):
            opened = load_study(study, spec, store)
            fail_abandoned(opened, store, folder)
            used = sum(counted(t) for t in opened.get_trials(deepcopy=False))
            if used < spec.trials:
                open_studies.append((used, study, opened))
        if not open_studies:
            return None
        _, study, opened = min(open_studies, key=lambda item: item[0])
        number = len(opened.get_trials(deepcopy=False))
        opened.sampler = sampler(spec, study.name, number)
        trial = opened.ask(distributions(spec))
        lock = hold(trial_lock_path(folder, study.name, trial.number), f"{os.getpid()} {os.uname().nodename}\n")
        return study, opened, trial, lock


def add_to_manifest(folder: Path, grid, run_id: str, cfg: RunConfig, trial_name: str) -> None:
    """The trial's run in the sweep manifest, with every trial it served (`sweep status` lists them)."""
    from sweep.launch import update_manifest

    def change(manifest: dict[str, Any]) -> None:
        entry = manifest["runs"].setdefault(run_id, {"config": cfg.to_dict(), "baseline": False,
                                                     "grid": str(grid.path), "jobs": [], "trials": []})
        entry.setdefault("trials", []).append(trial_name)

    update_manifest(folder.parent, folder.name, change)


def run_trial(grid, folder: Path, study: Study, opened, trial, threads: int) -> str:
    """Train (or reuse) the trial's run, reporting its evaluations, and tell the study how it ended."""
    from optuna.trial import TrialState

    from sweep.grid import run_id as id_of
    from sweep.record import read_record, status_of
    from sweep.results import AlreadyRunning, held_elsewhere
    from sweep.train import Interrupted, run

    spec: TuneSpec = grid.tune
    objective = spec.objective
    try:
        cfg = config_from_dict({**study.base.to_dict(), **trial.params, "threads": study.base.threads or threads})
    except ConfigError as err:  # e.g. a sampled batch size larger than the fine-tune
        trial.set_user_attr("reason", str(err))
        opened.tell(trial, state=TrialState.FAIL)
        return "failed"
    rid = id_of(cfg)
    run_dir = folder / rid
    trial.set_user_attr("run_id", rid)
    add_to_manifest(folder, grid, rid, cfg, f"{study.name}#{trial.number}")

    # reports come every eval_every steps of both stages, the fine-tune's counting on from the pre-training's; once
    # the objective's stage has ended its value is final, and a later prune would only throw it away
    last = None if objective.stage == "finetune" else cfg.pretrain_samples // cfg.batch_size

    def report(step: int, metrics: dict[str, Any]) -> bool:
        if last is not None and step >= last:
            return False
        value = metrics.get(objective.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        trial.report(float(value), step)
        return trial.should_prune()

    record, error = None, ""
    while record is None and not error:
        while held_elsewhere(run_dir):  # another trial drew the same settings and trains them now: its result
            time.sleep(2.0)
        try:
            # ended before, under another trial or this one's killed worker; a pruned run is no result (another
            # study's pruner, or another history, stopped it): it trains on from its checkpoint under this trial
            if status_of(run_dir) in ("completed", "failed"):
                record = read_record(run_dir)
            else:
                record = run(cfg, run_dir, progress=False, report=report,
                             trial={"study": study.name, "number": trial.number})
        except AlreadyRunning:
            continue
        except Interrupted:  # the run has its checkpoint; the trial stays RUNNING and the next worker retries it
            raise
        except Exception as err:  # noqa: BLE001 - also in the run's result.json; the study goes on
            error = f"{type(err).__name__}: {err}"
    if record is not None and record.status == "pruned":
        opened.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    stage = record.metrics.get(objective.stage) if record is not None else None
    value = stage.values().get(objective.metric) if stage is not None else None
    if error or record.status != "completed" or value is None or not math.isfinite(value):
        why = error or record.error or f"the record has no {objective.metric} at stage {objective.stage}"
        trial.set_user_attr("reason", why)
        opened.tell(trial, state=TrialState.FAIL)
        return "failed"
    opened.tell(trial, float(value))
    return "completed"


def tune_worker(grid_path: str, results: str, threads: int) -> dict[str, int]:
    """One Optuna worker: take and run trials until every study of the grid has its trials. Returns how many
    trials it ended, by state."""
    from sweep.stopping import stop_requests

    with stop_requests(signal.SIGTERM) as stopping:  # the launcher stops its workers (Ctrl-C)
        from sweep.grid import load_grid
        from sweep.results import release
        from sweep.train import Interrupted

        grid = load_grid(grid_path)
        folder = Path(results) / grid.sweep
        store = storage(folder)
        ended: dict[str, int] = {}
        while not stopping and (taken := next_trial(grid, folder, store)) is not None:
            study, opened, trial, lock = taken
            try:
                state = run_trial(grid, folder, study, opened, trial, threads)
            except Interrupted:
                if stopping:
                    break  # asked to: the trial's run has its checkpoint
                raise
            finally:  # an Interrupted run leaves its trial RUNNING with a free lock: the next worker retries it
                release(lock)
            ended[state] = ended.get(state, 0) + 1
    return ended


class SlurmTuneWorker(submitit.helpers.Checkpointable):
    """One array task: an Optuna worker. On preemption or time-out the running trial's run checkpoints, and the
    requeued task (or any other worker) retries that trial from the checkpoint."""

    def __call__(self, grid_path: str, results: str, threads: int) -> dict[str, int]:
        return tune_worker(grid_path, results, threads)


# ----------------------------------------------------------------------------------------------- launch, show

def trial_states(grid, folder: Path) -> dict[str, dict[str, int]]:
    """Each study of the grid: its trials by state (complete, pruned, fail, running; `interrupted`: failed by a
    worker that found them abandoned; `abandoned`: RUNNING, but no worker holds their lock; `waiting`: their
    retries, enqueued for the next worker)."""
    from sweep.results import held

    store = storage(folder)
    names = {s.name for s in studies_of(grid)}
    out: dict[str, dict[str, int]] = {name: {} for name in names}
    for summary in store.get_all_studies():
        if summary.study_name not in names:
            continue
        counts = out[summary.study_name]
        for trial in store.get_all_trials(store.get_study_id_from_name(summary.study_name), deepcopy=False):
            key = trial.state.name.lower()
            if key == "fail" and trial.user_attrs.get("interrupted"):
                key = "interrupted"
            elif key == "running" and not held(trial_lock_path(folder, summary.study_name, trial.number)):
                key = "abandoned"
            counts[key] = counts.get(key, 0) + 1
    return out


def progress(grid, folder: Path) -> dict[str, int]:
    """Trials of all the grid's studies by state (`trial_states`), and `goal`."""
    counts = {"goal": grid.tune.trials * len(studies_of(grid))}
    for states in trial_states(grid, folder).values():
        for key, n in states.items():
            counts[key] = counts.get(key, 0) + n
    return counts


def remaining(grid, folder: Path) -> dict[str, int]:
    """Trials each study still needs; abandoned ones and their waiting retries are among them (a worker fails an
    abandoned trial and runs its settings again). Every study's trials where nothing was tuned yet."""
    if not (folder / JOURNAL).exists():
        return {study.name: grid.tune.trials for study in studies_of(grid)}
    return {name: max(0, grid.tune.trials - sum(n for key, n in states.items()
                                                if key not in ("interrupted", "abandoned", "waiting")))
            for name, states in trial_states(grid, folder).items()}


def launch_tune(grid, results: str | Path, executor: str, workers: list[dict[str, Any]], threads: int, slurm,
                progress_bar: bool) -> dict[str, Any]:
    """Start the Optuna workers (local processes with these LocalExecutor parameters, waiting with a bar; or as
    many Slurm array tasks, returning once submitted)."""
    from sweep.launch import slurm_executor, update_manifest

    folder = Path(results) / grid.sweep
    store = storage(folder)
    with tune_lock(folder):  # the studies exist before any worker starts
        for study in studies_of(grid):
            load_study(study, grid.tune, store)
    record: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "executor": executor, "tune": True,
                              "workers": len(workers), "jobs": {}}
    jobs_folder = folder / ".submitit"
    if executor == "slurm":
        ex = slurm_executor(jobs_folder, slurm, f"tune-{grid.sweep}")
        with ex.batch():
            jobs = [ex.submit(SlurmTuneWorker(), str(grid.path), str(results), threads) for _ in workers]
        record["arrays"] = sorted({j.job_id.split("_")[0] for j in jobs})
    else:
        _run_local(grid, folder, jobs_folder, workers, threads, progress_bar, str(results))
    update_manifest(results, grid.sweep, lambda manifest: manifest["launches"].append(record))
    return record


def _run_local(grid, folder: Path, jobs_folder: Path, workers: list[dict[str, Any]], threads: int,
               progress_bar: bool, results: str) -> None:
    from sweep.launch import run_local_workers

    def tick(bar) -> bool:
        counts = progress(grid, folder)
        bar.n = sum(counts.get(k, 0) for k in ("complete", "pruned", "fail"))
        bar.set_postfix(pruned=counts.get("pruned", 0), failed=counts.get("fail", 0))
        return False

    # sweep.launch.local_workers gave each worker its own GPU where there are GPUs
    run_local_workers(jobs_folder, workers, tune_worker, (str(grid.path), results, threads),
                      progress(grid, folder)["goal"], "trial", tick, progress_bar, "tune")


def show(grid, results: str | Path, figures: bool = True) -> str:
    """Each study's best settings and value, its trials by state, and (figures) its history and importances."""
    from optuna.trial import TrialState

    folder = Path(results) / grid.sweep
    store = storage(folder)
    objective = grid.tune.objective
    lines = []
    every = trial_states(grid, folder)
    for study in studies_of(grid):
        states = every[study.name]
        trials = opened.get_trials(deepcopy=False) if (opened := _existing_study(study, store)) else []
        lines.append(f"{study.name}  ({study.label}; {objective.direction} {objective.metric} at "
                     f"{objective.stage})")
        done = sum(map(counted, trials)) - states.get("abandoned", 0)
        goal = f"{grid.tune.trials} trials" + (" (more ran before trials was lowered)" if done > grid.tune.trials
                                               else "")
        lines.append(f"  {done} of {goal}: "
                     f"{states.get('complete', 0)} complete, {states.get('pruned', 0)} pruned, "
                     f"{states.get('fail', 0)} failed, {states.get('running', 0)} running"
                     + (f", {states['abandoned']} abandoned by a stopped worker (run again at the next sweep tune)"
                        if states.get("abandoned") else "")
                     + (f" ({states['interrupted']} interrupted and retried)" if states.get("interrupted") else ""))
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = opened.best_trial
            settings = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(best.params.items()))
            lines.append(f"  best: {best.value:.2f} with {settings}  (trial {best.number}, run "
                         f"{best.user_attrs.get('run_id')})")
        else:
            lines.append("  best: none yet (no complete trial)")
        if figures and len(complete) >= 2:
            for path in write_figures(opened, folder / "figures"):
                lines.append(f"  figure: {path}")
        elif figures:
            lines.append(f"  figure: none yet (a history needs two complete trials, it has {len(complete)})")
    return "\n".join(lines)


def _existing_study(study: Study, store):
    """The study as the journal holds it, or None: looking does not add it (a changed grid's new study)."""
    import optuna

    try:
        return optuna.load_study(study_name=study.name, storage=store)
    except KeyError:
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_figures(opened, out: Path) -> list[Path]:
    """The study's optimisation history and (with 2+ settings searched) parameter importances, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    out.mkdir(parents=True, exist_ok=True)
    written = []
    plots = [("history", plot_optimization_history)]
    if len(opened.best_trial.params) > 1:
        plots.append(("importance", plot_param_importances))
    for what, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. trials of equal values: the figure says as much
            ax = plot(opened)
        fig = ax.get_figure()
        for loc in ("left", "center", "right"):  # optuna's own title: one title, the study's
            ax.set_title("", loc=loc)
        ax.set_title(f"{opened.study_name}: {what}")
        if what == "history":  # the legend inside the axes, the objective named
            ax.legend(loc="best", frameon=True)
            objective = opened.user_attrs.get("objective") or {}
            ax.set_ylabel(f"{objective.get('metric', 'objective')} ({objective.get('stage', '')})")
        else:  # room for the values printed after the bars; one series needs no legend
            low, high = ax.get_xlim()
            ax.set_xlim(low, high * 1.12)
            if ax.get_legend():
                ax.get_legend().remove()
        fig.set_size_inches(5.0, 3.5)
        fig.tight_layout()
        path = out / f"{opened.study_name}_{what}.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------- using the best

def best_settings(tune_dir: str | Path) -> list[dict[str, Any]]:
    """Every study in TUNE_DIR with a complete trial: {name, scope, model, base, params (names), best (settings),
    value, number}, newest study last."""
    import optuna

    path = Path(tune_dir) / JOURNAL
    if not path.is_file():
        raise ConfigError("--from-tune", f"{tune_dir} holds no tuning studies (no {JOURNAL}); give the directory "
                          f"`sweep tune` wrote, <results>/<sweep>", "command line")
    store = storage(tune_dir)
    found = []
    for summary in store.get_all_studies():
        opened = optuna.load_study(study_name=summary.study_name, storage=store)
        attrs = opened.user_attrs
        complete = [t for t in opened.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if complete and attrs.get("scope"):
            best = opened.best_trial
            found.append({"name": summary.study_name, "label": summary.study_name.rsplit(".", 1)[0],
                          "scope": attrs["scope"], "model": attrs.get("model"),
                          "base": attrs.get("base") or {}, "params": attrs.get("params") or sorted(best.params),
                          "best": best.params, "value": best.value, "number": best.number})
    if not found:
        raise ConfigError("--from-tune", f"no study in {tune_dir} has a complete trial yet", "command line")
    return found


def apply_best(grid, tune_dir: str | Path) -> tuple[Any, list[str]]:
    """The grid with each run's tuned settings replaced by the best of the study covering it (per model size, or
    per cell where a cell study matches all its other settings): new configs, new run ids. Returns the grid and
    one line per study used."""
    from sweep.grid import Run, run_id

    found = best_settings(tune_dir)
    for study in found:
        study["setup"] = setup(study["base"], study["params"])
    runs, used, origin = {}, {}, {}
    for run in grid.runs:
        cfg = run.config
        cell = [s for s in found if s["scope"] == "cell" and setup(cfg, s["params"]) == s["setup"]]
        # a model study serves its size's runs of its setup; the one study of a size serves any (a grid may
        # train on other settings than the tuning grid did)
        sized = [s for s in found if s["scope"] == "model" and s["model"] == cfg.model]
        same = [s for s in sized if setup(full_length(cfg), s["params"]) == s["setup"]]
        one = sized if len({s["label"] for s in sized}) == 1 else []
        match = (cell or same or one or [None])[-1]  # among equals the newest
        if match is None:
            tuned = ", ".join(sorted({s["label"] for s in found}))
            why = (f"its size has {len(sized)} studies of other settings" if sized else
                   "no model study has its size and no cell study its settings")
            raise ConfigError("--from-tune", f"no study in {tune_dir} covers {run.run_id}: {why} (studies: "
                              f"{tuned})", "command line")
        rates = [k for k in ("lr", "finetune_lr") if k in match["best"]]
        batch = match["base"].get("batch_size", cfg.batch_size)
        if rates and "batch_size" not in match["best"] and batch != cfg.batch_size:
            # a rate is not a property of the model alone: the paper scales it with the batch (8e-6 x batch / 256)
            raise ConfigError("--from-tune", f"{match['name']} tuned {' and '.join(rates)} at batch_size {batch} and "
                              f"{run.run_id} trains at {cfg.batch_size}: a rate does not carry over to another "
                              "batch; set it in the grid, scaled as you see fit (sweep tune --show prints the best)",
                              "command line")
        tuned = config_from_dict({**cfg.to_dict(), **match["best"]}, source=f"{tune_dir} ({match['name']})")
        new = Run(run_id(tuned), tuned, run.baseline, tuple(sorted(match["best"])))
        if new.run_id in runs:  # two runs of the grid told apart only by a setting the study tuned
            raise ConfigError("--from-tune", f"the grid's runs {origin[new.run_id]} and {run.run_id} differ only "
                              f"in {', '.join(sorted(match['best']))}, which {match['name']} tuned: a setting is "
                              "either swept or tuned", "command line")
        runs[new.run_id], origin[new.run_id] = new, run.run_id
        settings = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(match["best"].items()))
        used[match["name"]] = f"{match['name']}: {settings} (trial {match['number']}, value {match['value']:.2f})"
    ordered = sorted(runs.values(), key=lambda r: (not r.baseline, r.run_id))
    return replace(grid, runs=ordered), list(used.values())
