"""Drop in a metric against the full-length run of the same model and stage.

Every run is placed on an axis by comparing its settings with the model's full-length baseline (image_strategy
``none`` at the model's largest image_tokens and text_strategy ``none`` at its largest text_tokens; the baseline of
the run's own setup, ``setup_id``: a run trained on another budget is not compared with it):

* ``image``: only the image settings differ from the baseline; ``tokens`` is its image_tokens.
* ``text``: only the text settings differ; ``tokens`` is its text_tokens.
* ``both``: both differ (kept in the tables, not fitted).
* ``full``: the baseline itself.

Because an image-axis run keeps the baseline's text settings (and a text-axis run the baseline's image settings), the
issue's three baselines (same text settings / same image settings / both full) are one and the same run: the
both-full run of that model and stage. ``drop = mean(baseline metric over its seeds) - this run's metric``, in
percentage points; seeds of a grid cell are then averaged by `summarize_cells`, keeping their std and count.

A model with no baseline at the chosen stage gets an `AnalysisWarning` naming it, and NaN drops.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from sweep.sizes import MODELS

from .errors import AnalysisInputError, AnalysisWarning
from .load import COMPUTE_COLUMNS, METRIC_COLUMNS, STRING_COLUMNS, TOWER_COLUMNS

AXES = ("image", "text")
CELL_KEYS = ["model", "setup_id", "image_strategy", "image_tokens", "text_strategy", "text_tokens"]
BASELINE_KEYS = ["model", "setup_id"]  # a run is compared with the full-length run of its own setup


# Columns a table may hold that are not metrics, and those `compute_drops` adds (dropped from a table that is
# itself an analysis's runs.csv, so that it can be analysed again).
NOT_METRICS = {"params", *TOWER_COLUMNS, "image_tokens", "text_tokens", "seed", *COMPUTE_COLUMNS}
DERIVED_COLUMNS = ("axis", "strategy", "tokens", "full_tokens", "full_mean", "full_std", "full_n", "drop",
                   "in_analysis", "metric")


def is_metric(df: pd.DataFrame, column: str) -> bool:
    """A numeric column of measured quality: not a setting, a cost, a derived column, or an evaluation set's class
    or skipped-sample count (`zeroshot_classes`, `<name>_skipped`)."""
    return (column in df.columns and column not in NOT_METRICS and column not in STRING_COLUMNS
            and column not in DERIVED_COLUMNS and not column.endswith(("_classes", "_skipped"))
            and pd.api.types.is_numeric_dtype(df[column]))


def available_metrics(df: pd.DataFrame) -> list[str]:
    """Metric columns that the table actually holds values for."""
    return [c for c in df.columns if is_metric(df, c) and df[c].notna().any()]


def default_stage(df: pd.DataFrame) -> str:
    """The paper's protocol: ``finetune`` (pre-trained at reduced length, fine-tuned and evaluated at full length)
    when the table has it, else ``pretrain``, else the first stage present."""
    stages = [s for s in df["stage"].unique() if s]
    for stage in ("finetune", "pretrain"):
        if stage in stages or (stage == "pretrain" and not stages):
            return stage
    return sorted(stages)[0]


def validate_request(df: pd.DataFrame, metric: str, stage: str, source: str = "<table>") -> None:
    """Raise `AnalysisInputError` (naming the field) when the metric or stage cannot be analysed."""
    if not is_metric(df, metric):
        known = ", ".join(available_metrics(df)) or "none"
        raise AnalysisInputError(source, f"unknown metric column {metric!r} (available: {known})", field=metric)
    at_stage = df["stage"] == stage
    if not (df["status"] == "completed").any():
        raise AnalysisInputError(source, f"no completed run among {df['run_id'].nunique()} (failed or unfinished: "
                                 "`sweep status` says why)", field="status")
    if not at_stage.any():
        known = ", ".join(sorted(s for s in df["stage"].unique() if s)) or "none"
        raise AnalysisInputError(source, f"column 'stage': no rows with stage {stage!r} (stages present: {known})",
                                 field="stage")
    usable = at_stage & (df["status"] == "completed") & df[metric].notna()
    if not usable.any():
        raise AnalysisInputError(source, f"column {metric!r}: no completed run has a value at stage {stage!r}",
                                 field=metric)


def full_tokens(df: pd.DataFrame) -> pd.DataFrame:
    """Each model's full lengths: its own for a model this project knows, else the largest image_tokens and
    text_tokens among its runs (any stage or status; with its baseline's result deleted that would be a reduced
    length)."""
    full = df.groupby("model")[["image_tokens", "text_tokens"]].max()
    for model in full.index.intersection(list(MODELS)):
        full.loc[model] = [MODELS[model].image_tokens, MODELS[model].text_tokens]
    return full.rename(columns={"image_tokens": "full_image_tokens", "text_tokens": "full_text_tokens"})


def compute_drops(df: pd.DataFrame, metric: str = "zeroshot_top1", stage: str = "pretrain") -> pd.DataFrame:
    """One row per run at ``stage`` with its axis, strategy, token length, baseline and drop.

    Runs that have no row at this stage (failed before any metric, or no fine-tune) are kept with NaN metrics so that
    the table lists every run. ``in_analysis`` marks the rows used for curves and figures: completed runs with a
    value of ``metric``. Missing baselines are warned about (once per model) and listed in
    ``result.attrs["missing_baseline"]``.
    """
    df = df.drop(columns=[c for c in DERIVED_COLUMNS if c in df.columns])
    defaults = {"sweep": "", "status": "completed", "error": "", "stage": stage, "setup_id": ""}
    for column, value in defaults.items():
        if column not in df.columns:
            df[column] = value
    if "run_id" not in df.columns:  # a table not read by `analysis.load`: each row is its own run
        df["run_id"] = np.arange(len(df)).astype(str)
    df = _once_per_run(df)
    full = full_tokens(df)
    at_stage = df[df["stage"] == stage]
    others = df[~df["run_id"].isin(at_stage["run_id"])].drop_duplicates("run_id")
    if len(others):
        others = others.copy()
        others["stage"] = ""
        for column in [c for c in METRIC_COLUMNS if c in others.columns] + [metric]:
            others[column] = np.nan
    runs = pd.concat([at_stage, others], ignore_index=True) if len(others) else at_stage.reset_index(drop=True)
    runs = runs.join(full, on="model")

    image_base = (runs["image_strategy"] == "none") & (runs["image_tokens"] == runs["full_image_tokens"])
    text_base = (runs["text_strategy"] == "none") & (runs["text_tokens"] == runs["full_text_tokens"])
    on_image, on_text = ~image_base & text_base, image_base & ~text_base
    runs["axis"] = np.select([image_base & text_base, on_image, on_text], ["full", "image", "text"], "both")
    runs["strategy"] = np.select(
        [on_image, on_text, image_base & text_base],
        [runs["image_strategy"], runs["text_strategy"], "none"],
        runs["image_strategy"] + "+" + runs["text_strategy"],
    )
    runs["tokens"] = np.select([on_image, on_text], [runs["image_tokens"], runs["text_tokens"]], np.nan)
    runs["full_tokens"] = np.select(
        [on_image, on_text], [runs["full_image_tokens"], runs["full_text_tokens"]], np.nan
    )
    runs["in_analysis"] = (runs["status"] == "completed") & runs[metric].notna() & (runs["stage"] == stage)

    used = runs[runs["in_analysis"]]
    base = used[used["axis"] == "full"].groupby(BASELINE_KEYS)[metric].agg(["mean", "std", "count"])
    base.columns = ["full_mean", "full_std", "full_n"]
    runs = runs.join(base, on=BASELINE_KEYS)
    runs["full_n"] = runs["full_n"].fillna(0).astype(int)
    runs["drop"] = (runs["full_mean"] - runs[metric]).where(runs["in_analysis"])  # failed runs: listed, no drop
    runs["metric"] = metric

    lone = sorted(set(map(tuple, used[BASELINE_KEYS].to_numpy())) - set(base.index))
    missing = sorted({model for model, _ in lone})
    setups = used.groupby("model")["setup_id"].nunique()
    for model, setup in lone:
        row = full.loc[model]
        sweeps = sorted(set(used.loc[used["setup_id"] == setup, "sweep"]))
        of_setup = f" for its runs of setup {setup} (sweeps {_some(sweeps)})" if setups[model] > 1 else ""
        warnings.warn(
            f"model {model!r}: no full-length baseline at stage {stage!r}{of_setup} (needs a completed run with "
            f"image_strategy 'none' at {row.full_image_tokens:g} image tokens and text_strategy 'none' at "
            f"{row.full_text_tokens:g} text tokens, same settings otherwise); its drops are NaN",
            AnalysisWarning,
            stacklevel=2,
        )
    lacking = runs[(runs["status"] == "completed") & ~runs["in_analysis"]]  # no value, or no row at this stage
    if len(lacking):
        warnings.warn(
            f"{len(lacking)} completed run(s) have no {metric!r} value at stage {stage!r}; left out "
            f"({_some(lacking['run_id'])})",
            AnalysisWarning,
            stacklevel=2,
        )
    _warn_mixed_setups(runs[runs["in_analysis"]])
    runs = runs.drop(columns=["full_image_tokens", "full_text_tokens"])
    runs.attrs["missing_baseline"] = missing
    runs.attrs["metric"] = metric
    runs.attrs["stage"] = stage
    return runs


def _some(values: pd.Series, shown: int = 3) -> str:
    values = list(values)
    return ", ".join(map(str, values[:shown])) + (f" and {len(values) - shown} more" if len(values) > shown else "")


def _once_per_run(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run and stage: a run id names one setup and seed, so the same run found twice (two sweeps
    that share cells, such as a seed study's seed 0 and the study it extends) is one measurement, not two seeds.
    A completed copy is kept over a failed one."""
    key = ["run_id", "stage"]
    order = df.assign(_failed=df["status"] != "completed").sort_values("_failed", kind="stable")
    kept = order.drop_duplicates(key).sort_index().drop(columns="_failed")
    if len(kept) < len(df):
        twice = df[df.duplicated(key, keep=False)]
        runs = twice.drop_duplicates("run_id")
        warnings.warn(
            f"{len(runs)} run(s) found more than once (same run id; sweeps {_some(sorted(set(twice['sweep'])))}): "
            f"each is counted once ({_some(runs['run_id'])})", AnalysisWarning, stacklevel=3)
    return kept


def _warn_mixed_setups(used: pd.DataFrame) -> None:
    """Each run is compared with the baseline of its own setup, but a drop curve is one per (model, axis,
    strategy): runs of one curve whose settings differ beyond seed and token reduction (another training budget,
    another learning rate) are fitted as one curve. Say so."""
    curves = used[used["axis"].isin(AXES)]
    for (model, axis, strategy), rows in curves.groupby(["model", "axis", "strategy"], sort=True):
        setups = rows.groupby("setup_id", sort=False)["sweep"].agg(lambda s: sorted(set(s)))
        if len(setups) > 1:
            described = "; ".join(f"{_some(sweeps)} ({(rows['setup_id'] == sid).sum()} runs)"
                                  for sid, sweeps in setups.items())
            warnings.warn(
                f"{model} / {axis} / {strategy}: the curve holds runs of {len(setups)} setups that differ in more "
                f"than seed and token reduction, fitted as one: {described}; analyse one setup at a time (one "
                f"sweep directory, or a table filtered on setup_id)", AnalysisWarning, stacklevel=3)


def summarize_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged grid cells: one row per (model, image settings, text settings) of the runs in the analysis.

    ``metric_mean``/``metric_std`` are over seeds; ``drop`` is ``full_mean - metric_mean`` and ``drop_std`` the
    spread of one run's drop against one baseline run: the cell's and the baseline's spreads over seeds combined
    (``sqrt(metric_std² + full_std²)``; a baseline of one run adds none, having no spread to measure);
    ``n_seeds`` counts the runs.
    """
    metric = runs["metric"].iloc[0] if len(runs) else "zeroshot_top1"
    used = runs[runs["in_analysis"]]
    grouped = used.groupby(CELL_KEYS, sort=True, dropna=False)
    cells = grouped.agg(
        params=("params", "first"),
        **{column: (column, "first") for column in TOWER_COLUMNS if column in used.columns},
        stage=("stage", "first"),
        axis_=("axis", "first"),  # "axis" is a keyword of DataFrameGroupBy.agg
        strategy=("strategy", "first"),
        tokens=("tokens", "first"),
        full_tokens=("full_tokens", "first"),
        n_seeds=(metric, "size"),
        metric_mean=(metric, "mean"),
        metric_std=(metric, "std"),
        full_mean=("full_mean", "first"),
        full_std=("full_std", "first"),
        full_n=("full_n", "first"),
    )
    for column in ("train_flops", "samples_seen", "wall_seconds"):
        if column in used.columns and used[column].notna().any():
            cells[column] = grouped[column].mean()
    cells = cells.rename(columns={"axis_": "axis"}).reset_index()
    cells["drop"] = cells["full_mean"] - cells["metric_mean"]
    cells["drop_std"] = np.hypot(cells["metric_std"], cells["full_std"].fillna(0.0))
    cells["metric"] = metric
    order = ["stage", "model", "params", "axis", "strategy", "tokens", "full_tokens", "n_seeds", "metric",
             "metric_mean", "metric_std", "drop", "drop_std", "full_mean", "full_std", "full_n",
             "image_strategy", "image_tokens", "text_strategy", "text_tokens"]
    return cells[order + [c for c in cells.columns if c not in order]]
