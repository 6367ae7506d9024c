"""``sweep analyze``: turn results into tables, fitted drop curves, minimum token lengths, figures and a report.

`register` adds the subcommand to the ``sweep`` command's subparsers; ``python -m analysis`` runs it standalone.
Only argparse is imported here so that registering the subcommand costs nothing; the analysis (pandas, scipy,
matplotlib) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

DESCRIPTION = (
    "Analyse a token-length sweep: read every result.json under PATH (or a .csv/.parquet table), compute each run's "
    "drop against its model's full-length run, fit a drop curve per model and strategy, find the minimum token "
    "length at the tolerance with a bootstrap interval, fit the inverse scaling law (minimum tokens against "
    "parameters), and write runs.csv, drops.csv, min_tokens.csv, scaling_law.csv, figures (PNG, PDF) and report.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``analyze`` (shared by ``sweep analyze`` and ``python -m analysis``)."""
    parser.add_argument("path", metavar="PATH", help="results directory (searched recursively for result.json) "
                        "or a .csv/.parquet table with the columns listed in docs/results.md")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (default: PATH/analysis, or <parent>/analysis for a table file)")
    parser.add_argument("--metric", default=None,
                        help="metric column to analyse, in percent (default: the grid's analysis: section, recorded "
                             "in PATH/manifest.json, else zeroshot_top1); an evaluation set on disk gives "
                             "<name>_<metric> columns, e.g. imagenet_top1 or coco_i2t_r5")
    parser.add_argument("--stage", choices=("pretrain", "pretrain_full_length", "finetune"), default=None,
                        help="which stage's metrics (default: the grid's analysis: section, else finetune, the "
                             "paper's protocol of pre-training "
                             "reduced and fine-tuning and evaluating at full length; pretrain where no run "
                             "fine-tuned); "
                             "pretrain_full_length: the pre-trained model evaluated at full length "
                             "(eval_full_length)")
    parser.add_argument("--max-drop", type=float, default=None, metavar="X",
                        help="tolerance in percentage points for the minimum token length (default: the grid's "
                             "analysis: section, else 1.0)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap replicates for the confidence intervals (default: 1000; 0 = none)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="confidence level of the intervals (default: 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap (default: 0)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables and report only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while loading files")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="processes that draw the figures (default: one per core, at most 4; 1 = no workers)")


def register(subparsers) -> None:
    """Add the ``analyze`` subcommand to an argparse subparsers object; its handler returns an exit code."""
    parser = subparsers.add_parser("analyze", help="tables, drop curves, minimum token lengths, figures, report",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the analysis for parsed arguments: 0 on success, 2 on bad input (one line on stderr, nothing written)."""
    prog = "sweep analyze"
    grid = grid_defaults(args.path)
    args.metric, args.stage, args.max_drop = as_the_grid_says(args.path, args.metric, args.stage, args.max_drop, grid)
    if args.max_drop < 0 or args.max_drop != args.max_drop:
        print(f"{prog}: error: --max-drop: must be a number >= 0, got {args.max_drop}", file=sys.stderr)
        return 2
    if args.bootstrap < 0:
        print(f"{prog}: error: --bootstrap: must be >= 0, got {args.bootstrap}", file=sys.stderr)
        return 2
    if not 0 < args.confidence < 1:
        print(f"{prog}: error: --confidence: must be between 0 and 1, got {args.confidence}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    from .errors import AnalysisInputError, AnalysisWarning
    from .pipeline import run_analysis

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnalysisWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # numerical noise from empty groups; not for the user
        try:
            analysis, written = run_analysis(
                args.path, args.out, args.metric, args.stage, args.max_drop, n_boot=args.bootstrap, seed=args.seed,
                confidence=args.confidence, figures=not args.no_figures, progress=False if args.no_progress else None,
                jobs=args.jobs,
            )
        except AnalysisInputError as exc:
            _print_warnings(caught, AnalysisWarning)
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
    _print_warnings(caught, AnalysisWarning)
    report = next(p for p in written if p.name == "report.md")
    runs = analysis.runs
    n_failed = int((runs["status"] != "completed").sum())
    if grid:
        print(f"the grid's analysis: section (PATH/manifest.json), for what no option sets: metric "
              f"{grid.get('metric')}, stage {grid.get('stage')}, max_drop {grid.get('max_drop'):g} pp")
    print(f"analysed {len(runs)} runs ({n_failed} failed, {len(analysis.skipped)} files skipped), "
          f"{len(analysis.min_tokens)} drop curves, metric {analysis.metric}, stage {analysis.stage}")
    print(f"wrote {report.parent}/ (report.md, min_tokens.csv, runs.csv{'' if args.no_figures else ', figures/'})")
    return 0


def grid_defaults(path: str) -> dict:
    """The `analysis:` section of the grid a results directory was launched from (recorded by `sweep launch` in
    its manifest.json), or {} (a table, a directory of several sweeps, a grid without the section)."""
    manifest = Path(path) / "manifest.json"
    try:
        recorded = json.loads(manifest.read_text()) if manifest.is_file() else None
    except (OSError, ValueError):
        return {}
    section = recorded.get("analysis") if isinstance(recorded, dict) else None
    return section if isinstance(section, dict) else {}


def as_the_grid_says(path: str, metric: str | None, stage: str | None, max_drop: float | None,
                     grid: dict | None = None) -> tuple[str, str | None, float]:
    """(metric, stage, max_drop): each one given, else the grid's `analysis:` section's (`grid`, read from `path` by
    `grid_defaults` unless given), else the defaults (a stage left None is chosen from the table:
    `analysis.drop.default_stage`)."""
    from sweep.analysis_spec import DEFAULT_MAX_DROP, DEFAULT_METRIC

    grid = grid_defaults(path) if grid is None else grid
    return (metric or grid.get("metric") or DEFAULT_METRIC, stage or grid.get("stage"),
            max_drop if max_drop is not None else grid.get("max_drop", DEFAULT_MAX_DROP))


def _print_warnings(caught, category) -> None:
    seen = set()
    for w in caught:
        message = str(w.message)
        if issubclass(w.category, category) and message not in seen:
            seen.add(message)
            print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis PATH [options]``."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
