"""load -> drop -> fit -> minima -> scaling law -> figures -> report, as one call.

`analyze` does the computing on a loaded table and writes nothing; `write_outputs` writes the tables, figures and
report; `run_analysis` does both for a path (what ``sweep analyze`` runs). Every problem that does not stop the
analysis (skipped files, missing baselines, failed fits) is a warning and is also listed in ``Analysis.messages``
and in the report.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .drop import compute_drops, default_stage, summarize_cells, validate_request
from .errors import AnalysisInputError, AnalysisWarning
from .fit import DropCurveFit
from .load import COMPUTE_COLUMNS, METRIC_COLUMNS, REQUIRED_TABLE_COLUMNS, load_results, prepare_table
from .minima import min_tokens_table
from .scaling import fit_scaling_law

FIGURE_NAMES = ("accuracy_vs_tokens", "drop_vs_tokens", "min_tokens_vs_params", "accuracy_vs_compute")


@dataclass
class Analysis:
    """Everything an analysis computed; the tables are what the CLI writes as CSV."""

    source: str
    metric: str
    stage: str
    max_drop: float
    table: pd.DataFrame  # the tidy input: one row per run x stage
    runs: pd.DataFrame  # one row per run at `stage`, with axis, tokens and drop
    cells: pd.DataFrame  # seed-averaged grid cells
    min_tokens: pd.DataFrame
    fits: dict[tuple[str, str, str], DropCurveFit]
    laws: pd.DataFrame
    predictions: pd.DataFrame
    confidence: float = 0.95
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing_baseline: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def failed_runs(self) -> pd.DataFrame:
        """Runs whose status is not ``completed``: listed in the report, never plotted."""
        return self.runs[self.runs["status"] != "completed"]


def default_out_dir(path: str | Path) -> Path:
    """``PATH/analysis`` for a results directory, ``<parent>/analysis`` for a table file."""
    path = Path(path)
    return path / "analysis" if path.is_dir() else path.parent / "analysis"


def analyze(
    table: pd.DataFrame,
    metric: str = "zeroshot_top1",
    stage: str | None = None,
    max_drop: float = 1.0,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    source: str = "<table>",
) -> Analysis:
    """Drops, fits, minimum token lengths and the scaling law of a loaded table (see `analysis.load`)."""
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise AnalysisInputError(source, f"max_drop must be a number >= 0, got {max_drop!r}", field="max_drop")
    if not 0 < confidence < 1:
        raise AnalysisInputError(source, f"confidence must be between 0 and 1, got {confidence!r}",
                                 field="confidence")
    if table.empty:
        raise AnalysisInputError(source, "empty table (no rows)")
    missing = [c for c in REQUIRED_TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise AnalysisInputError(source, f"missing required column {missing[0]!r}", field=missing[0])
    if not {"run_id", "sweep", "status", "error"} <= set(table.columns):
        table = prepare_table(table, source)  # a table built in memory rather than by `load_results`
    stage = stage or default_stage(table)
    validate_request(table, metric, stage, source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnalysisWarning)
        runs = compute_drops(table, metric, stage)
        cells = summarize_cells(runs)
        min_tokens, fits = min_tokens_table(runs, cells, max_drop, n_boot=n_boot, seed=seed, confidence=confidence)
        laws, predictions = fit_scaling_law(min_tokens, confidence=confidence)
    messages = _reemit(caught)
    skipped = list(table.attrs.get("skipped", []))
    return Analysis(
        source=source, metric=metric, stage=stage, max_drop=float(max_drop), table=table, runs=runs, cells=cells,
        min_tokens=min_tokens, fits=fits, laws=laws, predictions=predictions, confidence=confidence,
        skipped=skipped, missing_baseline=list(runs.attrs.get("missing_baseline", [])),
        messages=[f"skipping {p}: {r}" for p, r in skipped] + messages,
    )


def _reemit(caught: list[warnings.WarningMessage]) -> list[str]:
    """Pass recorded warnings on to the caller's filters; return the analysis ones as text."""
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)]


def run_analysis(
    path: str | Path,
    out: str | Path | None = None,
    metric: str = "zeroshot_top1",
    stage: str | None = None,
    max_drop: float = 1.0,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    figures: bool = True,
    progress: bool | None = None,
    jobs: int | None = None,
) -> tuple[Analysis, list[Path]]:
    """Load ``path``, analyse it and write everything to ``out`` (default `default_out_dir`).

    All validation happens before anything is written: on `AnalysisInputError` the output directory is untouched.
    """
    path = Path(path)
    out = Path(out) if out is not None else default_out_dir(path)
    above = next(p for p in (out, *out.parents) if p.exists())  # what an output directory would be made in
    if not above.is_dir():
        raise AnalysisInputError(above, "is a file: the --out directory cannot be made there", field="--out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnalysisWarning)
        table = load_results(path, progress=progress)
    _reemit(caught)
    analysis = analyze(table, metric, stage, max_drop, n_boot=n_boot, seed=seed, confidence=confidence,
                       source=str(path))
    written = write_outputs(analysis, out, figures=figures, jobs=jobs)
    return analysis, written


def make_figures(analysis: Analysis, names: tuple[str, ...] = FIGURE_NAMES) -> dict[str, object]:
    """The figures by name (None where the data for one are absent, e.g. no ``train_flops``)."""
    from . import figures

    cells = analysis.cells
    makers = {
        "accuracy_vs_tokens": lambda: figures.plot_accuracy_vs_tokens(cells, analysis.stage),
        "drop_vs_tokens": lambda: figures.plot_drop_vs_tokens(cells, analysis.fits, analysis.max_drop,
                                                              analysis.stage),
        "min_tokens_vs_params": lambda: figures.plot_min_tokens_vs_params(analysis.min_tokens, analysis.laws),
        "accuracy_vs_compute": lambda: figures.plot_accuracy_vs_compute(cells, analysis.stage),
    }
    return {name: makers[name]() for name in names}


_FORKED: tuple[Analysis, Path] | None = None  # what a forked figure worker draws


def _draw_one(name: str) -> list[str] | None:
    from .figures import save_figure

    analysis, directory = _FORKED
    fig = make_figures(analysis, (name,))[name]
    return [str(p) for p in save_figure(fig, directory, name)] if fig is not None else None


def save_figures(
    analysis: Analysis,
    directory: Path,
    jobs: int | None = None,
    while_drawing: Callable[[], None] | None = None,
) -> dict[str, list[Path] | None]:
    """Draw and save every figure (PNG + PDF); returns the files per figure (None: no data for it).

    Drawing is most of an analysis's time and the four figures are independent, so on Linux they are drawn in
    forked worker processes (``jobs``; default: one per core, at most 4) while ``while_drawing`` (writing the
    tables) runs here. Elsewhere, with ``jobs=1``, or if a worker fails, they are drawn one after another here.
    """
    global _FORKED
    import multiprocessing
    import os
    import sys

    from .figures import save_figure

    if jobs is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        jobs = min(len(FIGURE_NAMES), cores)
    pending = while_drawing
    if jobs > 1 and sys.platform.startswith("linux"):
        _FORKED = (analysis, directory)
        writing = False
        try:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                drawing = pool.map_async(_draw_one, FIGURE_NAMES, chunksize=1)  # heaviest figures first
                if pending is not None:
                    writing = True
                    pending()
                    pending, writing = None, False
                drawn = drawing.get()
            return {n: [Path(p) for p in d] if d else None for n, d in zip(FIGURE_NAMES, drawn)}
        except Exception:  # noqa: BLE001 - any worker trouble: draw them here instead
            if writing:  # the tables' own error, not the pool's: the caller hears it
                raise
        finally:
            _FORKED = None
    if pending is not None:
        pending()
    files = {}
    for name, fig in make_figures(analysis).items():
        files[name] = save_figure(fig, directory, name) if fig is not None else None
    return files


def runs_for_csv(analysis: Analysis) -> pd.DataFrame:
    """The per-run table in a reading order: identity, settings, axis, metric, drop, other metrics, compute."""
    runs = analysis.runs
    first = ["run_id", "sweep", "setup_id", "status", "error", "model", "params", "image_strategy", "image_tokens",
             "text_strategy", "text_tokens", "seed", "stage", "axis", "strategy", "tokens", "full_tokens",
             analysis.metric, "full_mean", "full_std", "full_n", "drop", "in_analysis"]
    metrics = [c for c in METRIC_COLUMNS if c in runs.columns and c not in first]
    compute = [c for c in COMPUTE_COLUMNS if c in runs.columns]
    rest = [c for c in runs.columns if c not in (*first, *metrics, *compute, "metric", "source")]
    return runs[[c for c in first if c in runs.columns] + metrics + rest + compute + ["source"]]


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Plain CSV (unquoted header and values, as pandas writes it).

    Through pyarrow, several times faster than pandas on the 100k-row benchmark, when no text value needs quoting;
    otherwise (a comma or quote in an error message, say) through pandas, which quotes only those values.
    """
    frame = frame.reset_index(drop=True)
    text = [c for c in frame.columns if frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c])]
    needs_quotes = any(frame[c].astype(str).str.contains(r'[,"\n\r]', regex=True).any() for c in text) or any(
        any(ch in str(c) for ch in ',"\n\r') for c in frame.columns)
    if not needs_quotes:
        try:
            import pyarrow as pa
            import pyarrow.csv as pa_csv

            table = pa.Table.from_pandas(frame, preserve_index=False)
            with open(path, "wb") as handle:  # pyarrow quotes header names whatever the style: write it here
                handle.write((",".join(map(str, frame.columns)) + "\n").encode())
                pa_csv.write_csv(table, handle, pa_csv.WriteOptions(include_header=False, quoting_style="none"))
            return
        except Exception:  # noqa: BLE001 - any pyarrow trouble: pandas below writes the same table
            pass
    frame.to_csv(path, index=False)


def write_outputs(analysis: Analysis, out: Path, *, figures: bool = True, jobs: int | None = None) -> list[Path]:
    """Write runs.csv, drops.csv, min_tokens.csv, scaling_law.csv, scaling_predictions.csv, figures and report.md."""
    from .report import write_report

    out.mkdir(parents=True, exist_ok=True)
    written = []
    tables = {
        "runs.csv": runs_for_csv(analysis),
        "drops.csv": analysis.cells,
        "min_tokens.csv": analysis.min_tokens,
        "scaling_law.csv": analysis.laws,
        "scaling_predictions.csv": analysis.predictions,
    }
    def write_tables() -> None:
        for name, frame in tables.items():
            write_csv(frame, out / name)
            written.append(out / name)

    figure_files: dict[str, list[Path] | None] = {}
    if figures:
        figure_files = save_figures(analysis, out / "figures", jobs, while_drawing=write_tables)
        for files in figure_files.values():
            written.extend(files or [])
    else:
        write_tables()
    written.append(write_report(analysis, out, figure_files))
    return written
