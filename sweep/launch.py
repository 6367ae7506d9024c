"""Executors: the runs of a grid go to local processes or to Slurm job arrays, both through submitit.

Results live at <results>/<sweep>/<run_id>/ beside the sweep manifest <results>/<sweep>/manifest.json, which
records every run of the sweep (its resolved config and every job ever submitted for it) and every launch.
Relaunching is always safe, even while a sweep is live: runs whose result.json is completed are skipped, failed
ones unless --rerun-failed, and so are runs whose latest Slurm job is still queued or running (the scheduler is
asked once per launch) or that a process on this machine is training; a run directory is trained by one process at
a time (its lock), so no result is ever duplicated.

Local: `--max-parallel` workers (submitit's LocalExecutor) share one queue of runs; each worker takes the
next run nobody holds, so each process pays the torch import once, not once per run. The cores are split
between workers (threads per run = cores // workers). On a machine with GPUs each worker gets its own GPUs (one,
or gpus_per_node), so the machine trains one run per GPU, or one multi-GPU run at a time. A worker of
tasks_per_node > 1 processes trains each run on all of them together. The launcher waits, showing one progress
bar.
Slurm: one job array per launch (split at the cluster's MaxArraySize), one run per array task; a task is a job of
nodes x tasks_per_node processes (one per GPU) that train the run together (sweep/train/distributed.py). The
command returns once the arrays are submitted. Runs are checkpointable: on preemption or time-out submitit
requeues the whole job and every process resumes from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import submitit
import yaml

from sweep.config import ConfigError, RunConfig, SlurmOptions, config_from_dict
from sweep.grid import Grid, Run
from sweep.record import ResultRecord, read_status, result_mtime, status_of, write_record
from sweep.results import (AlreadyRunning, EndedElsewhere, atomic_write, exclusive, held_elsewhere,
                           write_json_atomic)
from sweep.stopping import stop_requests
from sweep.status import (SCHEDULER_ALIVE, SchedulerSilent, job_state_line, jobs_of, latest_slurm_job,
                          live_local_launches, local_launch, read_manifest, scheduler_states, yet_to_train)


# ---------------------------------------------------------------------------------------------------- run state

def sweep_dir(results: str | Path, sweep: str) -> Path:
    return Path(results) / sweep


def sweep_manifest(results: str | Path, sweep: str) -> dict[str, Any]:
    """The sweep's manifest, or a new one; a manifest that exists but is unreadable is an error, never replaced
    (it holds every job id ever submitted)."""
    path = sweep_dir(results, sweep) / "manifest.json"
    if not path.exists():
        return {"sweep": sweep, "runs": {}, "launches": []}
    return read_manifest(path)


def to_do(grid: Grid, results: str | Path, rerun_failed: bool) -> tuple[list[Run], dict[str, list]]:
    """The runs a launch starts, and the ones it skips grouped by why: `completed`, `failed` (unless
    rerun_failed) and `live`: (run, reason) pairs for runs whose Slurm job is still queued or running (the
    scheduler is asked once), that a process on this machine is training now, or that a live local launch on this
    machine has yet to train. A pruned run counts as failed."""
    todo: list[Run] = []
    skipped: dict[str, list] = {"completed": [], "failed": [], "live": []}
    manifest = sweep_manifest(results, grid.sweep)
    entries, folder = manifest["runs"], sweep_dir(results, grid.sweep)
    undone = []
    for run in grid.runs:
        status = read_status(folder / run.run_id)
        if status and (status[0] == "completed" or not rerun_failed):
            skipped["completed" if status[0] == "completed" else "failed"].append(run)  # pruned: not completed
        else:
            undone.append(run)
    jobs = {run.run_id: job for run in undone if (job := latest_slurm_job(entries.get(run.run_id, {})))}
    scheduler, unanswered = scheduler_states(list(jobs.values()))
    if "squeue" in unanswered:  # a queued job looks like none: its run would be queued twice
        raise SchedulerSilent(f"{unanswered['squeue']}; cannot tell whether the Slurm jobs of {len(jobs)} runs are "
                              "still queued, so nothing is launched: try again once the controller answers")
    queued = live_local_launches(manifest)
    for run in undone:
        info, since = scheduler.get(jobs.get(run.run_id, "")), queued.get(run.run_id)
        if info and info["state"] in SCHEDULER_ALIVE:
            skipped["live"].append((run, job_state_line(jobs[run.run_id], info)))
        elif held_elsewhere(folder / run.run_id):
            skipped["live"].append((run, "being trained by another process"))
        elif yet_to_train(folder / run.run_id, since):
            skipped["live"].append((run, f"queued by {local_launch(since)}"))
        else:
            todo.append(run)
    return todo, skipped


@contextmanager
def manifest_lock(results: str | Path, sweep: str):
    """Serialise read-modify-write of the manifest between launches running at once."""
    folder = sweep_dir(results, sweep)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".manifest.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def update_manifest(results: str | Path, sweep: str, change: Callable[[dict[str, Any]], None]) -> Path:
    """Apply `change` to the sweep manifest in place and write it back, under the manifest lock."""
    path = sweep_dir(results, sweep) / "manifest.json"
    with manifest_lock(results, sweep):
        manifest = sweep_manifest(results, sweep)
        change(manifest)
        write_json_atomic(path, manifest)
    return path


def write_manifest(grid: Grid, results: str | Path, launch: dict[str, Any] | None) -> Path:
    """Add the grid's runs (and this launch) to the sweep manifest, keeping what earlier launches recorded: every
    job ever submitted for a run stays in its `jobs` list, oldest first."""
    def change(manifest: dict[str, Any]) -> None:
        for run in grid.runs:
            entry = manifest["runs"].get(run.run_id)
            if not isinstance(entry, dict):  # new, or damaged: written again
                entry = manifest["runs"][run.run_id] = {}
            jobs = jobs_of(entry)  # reads the older single-`job` form too
            entry.pop("job", None)
            # launched: a run of the study, also where a `sweep tune` trial trained it first (its record then names
            # the trial, and the analysis still counts it)
            entry.update(config=run.config.to_dict(), baseline=run.baseline, grid=str(grid.path), jobs=jobs,
                         launched=True)
            if run.tuned:  # the analysis compares runs tuned apart (a study per cell) as one setup
                entry["tuned"] = list(run.tuned)
        manifest.pop("analysis", None)  # the latest launch's grid says how the sweep is read
        if grid.analysis is not None:
            manifest["analysis"] = grid.analysis.to_dict()
        if launch:
            manifest["launches"].append(launch)
            for run_id, job_id in launch.get("jobs", {}).items():
                manifest["runs"][run_id]["jobs"].append({"executor": launch["executor"], "job_id": job_id,
                                                         "submitted": launch["time"]})

    return update_manifest(results, grid.sweep, change)


def prepare_run_dirs(grid: Grid, results: str | Path, runs: list[Run], threads: int) -> list[Path]:
    """Create each run's directory with its config.yaml, which is all a job needs to train it. A run's own
    `threads` (set in the grid) is kept; 0 takes the launcher's share of the cores."""
    dirs = []
    for run in runs:
        run_dir = sweep_dir(results, grid.sweep) / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = {**run.config.to_dict(), "threads": run.config.threads or threads}
        atomic_write(run_dir / "config.yaml", lambda p: Path(p).write_text(yaml.safe_dump(cfg, sort_keys=False)))
        dirs.append(run_dir)
    return dirs


def prepare_text(runs: list[Run], progress: bool = True, files: bool = False) -> tuple[int, int]:
    """Tag every caption that the runs' `syntax` text strategy reads into the shared spaCy cache, once, before any
    run starts: no run then waits on spaCy, and parallel runs do not tag the same captions side by side. The
    embedded data's captions (training pool, retrieval captions, zero-shot prompts) always; with `files`, also those
    of training and evaluation sets on disk (every shard or table is read once, its images skipped). Runs tag what
    is not cached as they read it, into the same cache. Returns (captions prepared, how many of them spaCy tagged
    now; the others were cached)."""
    from sweep.strategies.text import TextReducer

    groups: dict[tuple[str, int], list[RunConfig]] = {}  # a cache entry is a caption's tags under one pipeline
    for c in (r.config for r in runs):
        if c.text_strategy == "syntax":
            groups.setdefault((c.spacy_model, c.spec.text_tokens), []).append(c)
    prepared = tagged = 0
    for (spacy_model, context), configs in sorted(groups.items()):
        reducer = TextReducer("syntax", context, context_length=context, spacy_model=spacy_model)
        for what, batches in _caption_sources(configs, files, progress):
            if progress:
                print(f"tagging the captions of {what} with {spacy_model}")
            for batch in batches:
                batch = list(dict.fromkeys(batch))
                reducer.prepare(batch)
                prepared += len(batch)
        tagged += reducer.tagged_texts
    return prepared, tagged


CAPTION_BATCH = 50_000  # captions read from files are tagged this many at a time (spaCy in processes from 20,000)


def _caption_sources(configs: list[RunConfig], files: bool, progress: bool
                     ) -> Iterator[tuple[str, Iterable[list[str]]]]:
    """(what, batches of its captions) for every distinct caption source the runs read: the embedded data and,
    with `files`, training sets and evaluation sets on disk."""
    from sweep.data import load_data
    from sweep.data.evalsets import read_retrieval, read_zeroshot

    embedded = {(c.dataset if c.dataset == "synthetic" else "files", c.data_seed, c.train_scenes,
                 c.spec.image_size, c.eval_zeroshot_samples, c.eval_retrieval_samples)
                for c in configs if c.dataset == "synthetic" or c.eval_embedded}
    for dataset, data_seed, scenes, size, zeroshot, retrieval in sorted(embedded):
        data = load_data(dataset, data_seed, scenes, size, zeroshot, retrieval)
        prompts = [t.replace("{}", c) for t in data.templates for c in data.classnames]
        what = f"{dataset} (data_seed {data_seed}, {scenes} scenes)" if dataset == "synthetic" else \
            f"the embedded evaluation sets (data_seed {data_seed})"
        yield what, [(data.train_captions or []) + data.retrieval_captions + prompts]
    if not files:
        return
    training = {(c.dataset, c.train_data, c.csv_img_key, c.csv_caption_key, c.csv_separator)
                for c in configs if c.dataset != "synthetic"}
    for dataset, data, img_key, caption_key, separator in sorted(training):
        yield data, _training_captions(dataset, data, img_key, caption_key, separator, progress)
    evals = {(e.type, e.data, e.zeroshot_classnames, e.zeroshot_templates, e.csv_img_key, e.csv_caption_key,
              e.csv_separator) for c in configs for e in c.eval_sets}
    for kind, data, classnames, templates, img_key, caption_key, separator in sorted(evals, key=str):
        if kind == "zeroshot":
            found = read_zeroshot(data, classnames, templates)
            yield data, [[t.replace("{}", c) for t in found.templates for c in found.classnames]]
        else:
            yield data, [read_retrieval(data, img_key, caption_key, separator).captions]


def _training_captions(dataset: str, data: str, img_key: str, caption_key: str, separator: str, progress: bool
                       ) -> Iterator[list[str]]:
    """The captions of a training set on disk, CAPTION_BATCH at a time; a shard that breaks off gives those read
    up to there (a run skips the rest of it too)."""
    from tqdm import tqdm

    from sweep.data.sources import expand_paths, open_source, read_shard

    if dataset != "webdataset":
        rows = open_source(dataset, data, img_key, caption_key, separator).rows
        captions = [caption for _, caption in rows if caption.strip()]
        for first in range(0, len(captions), CAPTION_BATCH):
            yield captions[first:first + CAPTION_BATCH]
        return
    batch: list[str] = []
    for path in tqdm(expand_paths(data), desc="shards", unit="shard", disable=None if progress else True):
        try:
            for sample in read_shard(path):
                if sample.caption:
                    batch.append(sample.caption)
                if len(batch) == CAPTION_BATCH:
                    yield batch
                    batch = []
        except OSError as err:
            print(f"prepare-text: {err}", file=sys.stderr)
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------ what a job executes

def join_job_tasks() -> None:
    """In a job of several tasks (a multi-task Slurm job, a local worker with tasks_per_node > 1): export
    torchrun's variables from submitit's job environment, so that the trainer's processes form one run (rank 0 on
    the job's first node gives the rendezvous address). A one-task job is left a plain process."""
    if submitit.JobEnvironment().num_tasks > 1:
        # GPUs are left as Slurm binds them; the trainer takes the one of its local rank
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def train_run_dir(run_dir: str | Path, handle_signals: bool = True, since: float = 0.0) -> str:
    """Train the run prepared in `run_dir` (inside a job) unless it has a result written since `since` (see
    `sweep.train.run`); returns its final status, or why it was not trained."""
    from sweep.train import run

    run_dir = Path(run_dir)
    try:
        cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), run_dir / "config.yaml")
    except ConfigError as err:  # its data moved or changed since the launch checked it: the run fails, saying why
        record_start_failure(run_dir, err)
        raise
    try:
        return run(cfg, run_dir, progress=False, handle_signals=handle_signals, since=since).status
    except AlreadyRunning:
        return "running elsewhere"
    except EndedElsewhere:
        return "ended elsewhere"


def record_start_failure(run_dir: Path, err: Exception) -> None:
    """Write a `failed` result for a run that could not start (the trainer records every later failure), unless
    another process holds the run or it has completed. Rank 0 writes it for a run of several processes."""
    if int(os.environ.get("RANK", "0")):
        return
    try:
        with exclusive(run_dir):
            if status_of(run_dir) != "completed":
                raw = yaml.safe_load((run_dir / "config.yaml").read_text())
                write_record(run_dir, ResultRecord(run_id=run_dir.name, sweep=run_dir.parent.name, status="failed",
                                                   error=f"could not start: {err}",
                                                   config=raw if isinstance(raw, dict) else {}))
    except AlreadyRunning:
        pass


def work_queue(run_dirs: list[str], fail_fast: bool = False, since: float = 0.0) -> dict[str, str]:
    """A local worker: train every run of the list that nobody else holds, in order (all its tasks together). A
    run with a result written since `since` (the launch's start) was trained by another worker of this launch,
    completed or not: it is not trained again (the trainer says so, rank 0 for all of a worker's tasks: each task
    looking for itself could see another worker's result appear between their looks, and the tasks part ways)."""
    with stop_requests(signal.SIGTERM) as stopping:  # the launcher stops its workers (Ctrl-C, --fail-fast)
        from sweep.train import Interrupted

        join_job_tasks()
        alone = submitit.JobEnvironment().num_tasks == 1
        outcome: dict[str, str] = {}
        for run_dir in run_dirs:
            if stopping or (fail_fast and any(v.startswith("failed") for v in outcome.values())):
                break
            try:
                outcome[run_dir] = train_run_dir(run_dir, since=since)
            except Interrupted as err:  # SIGTERM / SIGUSR2: the run has its checkpoint; the worker stops with it
                if not stopping:
                    raise  # a time-out (SIGUSR2): submitit's handler has dealt with it
                outcome[run_dir] = str(err)
            except Exception as err:  # recorded in the run's result.json by the trainer; go on with the next run
                outcome[run_dir] = f"failed: {type(err).__name__}: {err}"
                if not alone:
                    # the run's processes may be out of step or their group broken (a peer died): this worker ends
                    # and the runs it did not reach stay pending for the next launch, rather than each failing
                    break
    return outcome


class SlurmRun(submitit.helpers.Checkpointable):
    """One array task: one run, on each of its job's tasks. On preemption or time-out (SIGUSR2, on any task) the
    trainer writes one checkpoint, then submitit (on rank 0) requeues the whole job, which resumes from it."""

    def __call__(self, run_dir: str) -> str:
        join_job_tasks()
        return train_run_dir(run_dir)


# ---------------------------------------------------------------------------------------------------- executors

def slurm_available() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def choose_executor(requested: str) -> str:
    """`auto` is Slurm where a Slurm cluster answers, else local processes."""
    if requested != "auto":
        return requested
    return "slurm" if slurm_available() else "local"


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def local_workers(max_parallel: int, opts: SlurmOptions, runs: int, gpus: int) -> list[dict[str, Any]]:
    """The LocalExecutor parameters of each local worker. A worker runs `opts.tasks` processes that train one run
    at a time together; on a machine with `gpus` GPUs each worker gets its own (gpus_per_node, or one per task),
    so a GPU machine runs one multi-GPU run across them, or one single-GPU run per GPU."""
    tasks = opts.tasks
    if not gpus:
        count = 1 if tasks > 1 else max_parallel  # several tasks on CPUs: one run at a time uses the cores
        return [{"tasks_per_node": tasks}] * max(1, min(count, runs))
    per = max(tasks, opts.gpus_per_node)
    if per > gpus:
        raise ValueError(f"a run asks for {per} GPUs; this machine has {gpus}")
    count = max(1, min(max_parallel, gpus // per, runs))
    return [{"tasks_per_node": tasks, "gpus_per_node": per, "visible_gpus": tuple(range(i * per, (i + 1) * per))}
            for i in range(count)]


def run_local_workers(folder: Path, workers: list[dict[str, Any]], fn, args: tuple, total: int, unit: str,
                      tick: Callable[[Any], bool], progress: bool, command: str) -> None:
    """One submitit LocalExecutor job per worker (its parameters) running `fn(*args)`; waits for them with a bar
    of `total` `unit`s that `tick(bar)` updates every second (True: cancel the jobs), cancels them on Ctrl-C, and
    reports a worker that itself crashed (not a run failure, which the run's record says)."""
    from tqdm import tqdm

    jobs = []
    folder.mkdir(parents=True, exist_ok=True)
    # submitit's local controller prints a traceback whenever its job is cancelled; its own messages go to a log in
    # the jobs folder instead of the terminal (the runs' output has files of its own). The workers start with
    # SIGINT ignored: a terminal's Ctrl-C reaches the whole foreground group, and would stop a run mid-step with no
    # checkpoint (and submitit's controller kills its tasks a second after a SIGINT); the launcher stops them
    terminal, interrupt = os.dup(2), signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(folder / "controllers.log", "a") as log:
            os.dup2(log.fileno(), 2)
            for params in workers:
                executor = submitit.LocalExecutor(folder=folder)
                executor.update_parameters(timeout_min=7 * 24 * 60, **params)
                jobs.append(executor.submit(fn, *args))
    finally:
        signal.signal(signal.SIGINT, interrupt)
        os.dup2(terminal, 2)
        os.close(terminal)
    bar = tqdm(total=total, desc=unit + "s", unit=unit, disable=None if progress else True,
               dynamic_ncols=True)  # None: only on a terminal
    stopped = False
    try:
        while True:
            cancel = tick(bar)
            bar.refresh()
            if all(job.done() for job in jobs):
                break
            if cancel and not stopped:
                _stop(jobs)
                stopped = True
            time.sleep(1.0)
    except KeyboardInterrupt:
        bar.close()
        _stop(jobs)
        print(f"sweep {command}: stopping: each run in progress writes a checkpoint first (Ctrl-C again to kill "
              "the workers now)", flush=True)
        try:
            while not all(job.done() for job in jobs):
                time.sleep(0.2)
        except KeyboardInterrupt:
            _kill(jobs)
        raise
    finally:
        bar.close()
    for job in jobs:
        try:
            job.results()  # one per task
        except Exception as err:  # noqa: BLE001 - reported; the runs' own records say the rest
            # submitit's message is the worker's traceback then its log files: name the exception it ended with
            lines = str(err).splitlines()
            exception = re.compile(r"[\w.]+(Error|Exception|Interrupt\w*)\b")
            cause = next((line for line in reversed(lines) if exception.match(line)), None)
            if cause is None and "has not produced any output" in str(err):  # no result, no exception: a kill
                cause = f"it ended without a result (killed, or out of memory?): {lines[0]}"
            cause = cause or (lines[0] if lines else type(err).__name__)
            print(f"sweep {command}: a local worker ended with an error: {cause} (logs: {folder})", file=sys.stderr)


def _stop(jobs: list) -> None:
    """Ask each local worker to stop: SIGTERM to its submitit controller (a local job's id is its pid), which
    passes it to the worker's processes; a run in progress writes a checkpoint at its next step and ends there."""
    for job in jobs:
        if not job.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job.job_id), signal.SIGTERM)


def _kill(jobs: list) -> None:
    """SIGKILL each local worker's processes and its controller (which ignores SIGINT, see `run_local_workers`)."""
    for job in jobs:
        pid = int(job.job_id)
        children = []
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                children += [int(c) for c in task.read_text().split()]
        for process in [*children, pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)


def launch_local(run_dirs: list[Path], folder: Path, workers: list[dict[str, Any]], fail_fast: bool,
                 progress: bool, command: str = "launch") -> dict[str, Any]:
    started = time.time()

    def tick(bar) -> bool:  # the statuses of the results written by this launch
        states = [status_of(d) or "unreadable" for d in run_dirs if (result_mtime(d) or 0) >= started]
        bar.n = len(states)
        bar.set_postfix(failed=states.count("failed"))
        return fail_fast and "failed" in states

    run_local_workers(folder, workers, work_queue, ([str(d) for d in run_dirs], fail_fast, started), len(run_dirs),
                      "run", tick, progress, command)
    return {"executor": "local", "workers": len(workers), "tasks_per_worker": workers[0]["tasks_per_node"],
            "jobs": {}}


def max_array_size() -> int:
    """The cluster's MaxArraySize (task ids run 0 .. MaxArraySize - 1)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
        for line in out.splitlines():
            if line.startswith("MaxArraySize"):
                return int(line.split("=")[1])
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return 1001  # Slurm's default


MAX_REQUEUES = 100  # time limits a run may reach, resuming after each (a run that never checkpoints stops there)


def slurm_executor(folder: Path, opts: SlurmOptions, name: str) -> submitit.AutoExecutor:
    """A submitit executor whose jobs have the resources of `opts` (one job per array task)."""
    # A run longer than its time limit is requeued from its checkpoint at each limit (submitit's default gives up
    # after 3, and counts any signal as a time-out when the limit is 10 minutes or less); the signal comes early
    # enough to write the checkpoint, but not before a short job has trained a step.
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=MAX_REQUEUES)
    params: dict[str, Any] = {
        "name": name, "timeout_min": opts.time_min, "nodes": opts.nodes,
        "slurm_signal_delay_s": min(90, opts.time_min * 15),
        "tasks_per_node": opts.tasks, "cpus_per_task": opts.cpus, "mem_gb": opts.mem_gb,
        "slurm_array_parallelism": opts.array_parallelism, "slurm_additional_parameters": dict(opts.sbatch),
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.world_size > 1:  # a task that dies takes the job down, instead of leaving its peers waiting
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    for key in ("partition", "account", "qos"):
        if getattr(opts, key):
            params[f"slurm_{key}"] = getattr(opts, key)
    executor.update_parameters(**params)
    return executor


def launch_slurm(run_dirs: list[Path], folder: Path, opts: SlurmOptions, sweep: str,
                 record: dict[str, Any]) -> None:
    """Submit one job array per MaxArraySize runs, adding each array's job ids to `record` (`jobs`, `arrays`) as
    soon as it is queued: an array refused later (or a Ctrl-C) leaves the earlier ones recorded, never lost."""
    executor = slurm_executor(folder, opts, f"sweep-{sweep}")
    chunk = max(1, max_array_size() - 1)
    jobs, arrays = record.setdefault("jobs", {}), record.setdefault("arrays", [])
    for start in range(0, len(run_dirs), chunk):
        part = run_dirs[start:start + chunk]
        try:
            with executor.batch():
                submitted = [executor.submit(SlurmRun(), str(d)) for d in part]
        except submitit.core.utils.FailedJobError as err:  # sbatch refused it: a partition, account, resource
            said = next((line for line in str(err).splitlines() if line.strip()), "no reason given")
            before = f"; the {len(jobs)} runs submitted before it are queued" if jobs else ""
            raise ConfigError("slurm", f"sbatch refused the job array: {said}{before}", "command line") from None
        arrays.append(submitted[0].job_id.split("_")[0])
        jobs.update({d.name: job.job_id for d, job in zip(part, submitted)})


def launch_debug(run_dirs: list[Path]) -> dict[str, Any]:
    """In this process, one run after the other (for pdb and print debugging)."""
    for run_dir in run_dirs:
        train_run_dir(run_dir, handle_signals=False)
    return {"executor": "debug", "jobs": {}}


def threads_per_run(executor: str, max_parallel: int, opts: SlurmOptions, runs: int | None = None) -> int:
    """torch threads of each process of a run: Slurm's cpus per task, or this machine's cores shared among the
    local workers' processes."""
    if executor == "slurm":
        return opts.cpus
    workers = local_workers(max_parallel, opts, runs or max_parallel, local_gpus()) if executor == "local" else [{}]
    return max(1, (os.cpu_count() or 1) // (len(workers) * opts.tasks))


def launch(grid: Grid, results: str | Path, executor: str, todo: list[Run], skipped: dict[str, list], *,
           max_parallel: int, fail_fast: bool, slurm: SlurmOptions, progress: bool = True,
           note: dict[str, Any] | None = None, command: str = "launch") -> dict[str, Any]:
    """Start `todo` (from `to_do`); returns the launch record (also appended to the manifest, with `note`).
    `command`: the sweep command that launches, as its messages name it."""
    launch_record: dict[str, Any] = {**(note or {}), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "executor": executor,
                                     "runs": [r.run_id for r in todo],
                                     "skipped": {k: len(v) for k, v in skipped.items()},
                                     "live": {run.run_id: why for run, why in skipped["live"]}}
    if not todo:
        launch_record["jobs"] = {}
        write_manifest(grid, results, launch_record)
        return launch_record
    folder = sweep_dir(results, grid.sweep)
    if executor == "slurm":  # recorded once submitted, with its job ids; what it makes goes if it queues nothing
        made = [p for p in (folder, *folder.parents) if not p.exists()][-1:]  # the outermost new folder
        new = made or [p for p in [folder / ".submitit", *(folder / r.run_id for r in todo)] if not p.exists()]
    else:  # recorded before it trains (a launch killed midway is in the manifest too), then when it has ended
        # pid and host: `sweep status` tells the runs this launch has yet to train (a failed one rerun, say)
        started = {**launch_record, "jobs": {}, "ended": None, "pid": os.getpid(), "host": socket.gethostname()}
        write_manifest(grid, results, started)
    prepare_text(todo, progress)
    run_dirs = prepare_run_dirs(grid, results, todo, threads_per_run(executor, max_parallel, slurm, len(todo)))
    if executor == "slurm":
        try:
            launch_slurm(run_dirs, folder / ".submitit", slurm, grid.sweep, launch_record)
        except ConfigError:
            if not launch_record.get("jobs"):  # sbatch refused the first array: the launch leaves nothing behind
                for path in new:
                    shutil.rmtree(path, ignore_errors=True)
            raise
        finally:  # what was queued, also when a later array is refused or the submission is interrupted
            if launch_record.get("jobs"):
                write_manifest(grid, results, launch_record)
        return launch_record
    try:
        if executor == "local":
            workers = local_workers(max_parallel, slurm, len(todo), local_gpus())
            launch_record.update(launch_local(run_dirs, folder / ".submitit", workers, fail_fast, progress, command))
        else:
            launch_record.update(launch_debug(run_dirs))
    finally:  # also when interrupted
        launch_record.setdefault("jobs", {})
        launch_record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")

        def ended(manifest: dict[str, Any]) -> None:
            launches = manifest["launches"]
            at = max((i for i, r in enumerate(launches) if r == started), default=None)
            if at is None:
                launches.append(launch_record)
            else:
                launches[at] = launch_record
        update_manifest(results, grid.sweep, ended)
    return launch_record
