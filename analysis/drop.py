"""Drop in a metric against the full-length run of the same model and stage.

Every run is placed on an axis by comparing its settings with the model's full-length baseline (image_strategy
``none`` at the model's largest image_tokens and text_strategy ``none`` at its largest text_tokens):

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

from .errors import AnalysisInputError, AnalysisWarning
from .load import COMPUTE_COLUMNS, METRIC_COLUMNS, STRING_COLUMNS, TOWER_COLUMNS

AXES = ("image", "text")
CELL_KEYS = ["model", "image_strategy", "image_tokens", "text_strategy", "text_tokens"]


def available_metrics(df: pd.DataFrame) -> list[str]:
    """Numeric metric columns that the table actually holds values for."""
    skip = {"params", *TOWER_COLUMNS, "image_tokens", "text_tokens", "seed", "zeroshot_classes", *COMPUTE_COLUMNS}
    return [
        c for c in df.columns
        if c not in skip and c not in STRING_COLUMNS and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()
    ]


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
    if metric not in df.columns or not pd.api.types.is_numeric_dtype(df[metric]):
        known = ", ".join(available_metrics(df)) or "none"
        raise AnalysisInputError(source, f"unknown metric column {metric!r} (available: {known})", field=metric)
    at_stage = df["stage"] == stage
    if not at_stage.any():
        known = ", ".join(sorted(s for s in df["stage"].unique() if s)) or "none"
        raise AnalysisInputError(source, f"column 'stage': no rows with stage {stage!r} (stages present: {known})",
                                 field="stage")
    usable = at_stage & (df["status"] == "completed") & df[metric].notna()
    if not usable.any():
        raise AnalysisInputError(source, f"column {metric!r}: no completed run has a value at stage {stage!r}",
                                 field=metric)


def full_tokens(df: pd.DataFrame) -> pd.DataFrame:
    """Each model's full lengths: the largest image_tokens and text_tokens in its grid (any stage or status)."""
    return df.groupby("model")[["image_tokens", "text_tokens"]].max().rename(
        columns={"image_tokens": "full_image_tokens", "text_tokens": "full_text_tokens"}
    )


def compute_drops(df: pd.DataFrame, metric: str = "zeroshot_top1", stage: str = "pretrain") -> pd.DataFrame:
    """One row per run at ``stage`` with its axis, strategy, token length, baseline and drop.

    Runs that have no row at this stage (failed before any metric, or no fine-tune) are kept with NaN metrics so that
    the table lists every run. ``in_analysis`` marks the rows used for curves and figures: completed runs with a
    value of ``metric``. Missing baselines are warned about (once per model) and listed in
    ``result.attrs["missing_baseline"]``.
    """
    df = df.copy()
    defaults = {"sweep": "", "status": "completed", "error": "", "stage": stage}
    for column, value in defaults.items():
        if column not in df.columns:
            df[column] = value
    if "run_id" not in df.columns:  # a table not read by `analysis.load`: each row is its own run
        df["run_id"] = np.arange(len(df)).astype(str)
    full = full_tokens(df)
    at_stage = df[df["stage"] == stage]
    key = ["sweep", "run_id"]
    others = df[~df.set_index(key).index.isin(at_stage.set_index(key).index)].drop_duplicates(key)
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
    base = used[used["axis"] == "full"].groupby("model")[metric].agg(["mean", "std", "count"])
    base.columns = ["full_mean", "full_std", "full_n"]
    runs = runs.join(base, on="model")
    runs["full_n"] = runs["full_n"].fillna(0).astype(int)
    runs["drop"] = (runs["full_mean"] - runs[metric]).where(runs["in_analysis"])  # failed runs: listed, no drop
    runs["metric"] = metric

    missing = sorted(set(used["model"]) - set(base.index))
    for model in missing:
        row = full.loc[model]
        warnings.warn(
            f"model {model!r}: no full-length baseline at stage {stage!r} (needs a completed run with image_strategy "
            f"'none' at {row.full_image_tokens:g} image tokens and text_strategy 'none' at {row.full_text_tokens:g} "
            f"text tokens); its drops are NaN",
            AnalysisWarning,
            stacklevel=2,
        )
    n_missing_metric = int(((runs["status"] == "completed") & (runs["stage"] == stage) & runs[metric].isna()).sum())
    if n_missing_metric:
        warnings.warn(
            f"{n_missing_metric} completed run(s) have no {metric!r} value at stage {stage!r}; left out",
            AnalysisWarning,
            stacklevel=2,
        )
    runs = runs.drop(columns=["full_image_tokens", "full_text_tokens"])
    runs.attrs["missing_baseline"] = missing
    runs.attrs["metric"] = metric
    runs.attrs["stage"] = stage
    return runs


def summarize_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged grid cells: one row per (model, image settings, text settings) of the runs in the analysis.

    ``metric_mean``/``metric_std`` are over seeds; ``drop`` is ``full_mean - metric_mean`` and ``drop_std`` the
    spread of the per-seed drops (the baseline mean is a constant within a cell); ``n_seeds`` counts the runs.
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
    cells["drop_std"] = cells["metric_std"]
    cells["metric"] = metric
    order = ["stage", "model", "params", "axis", "strategy", "tokens", "full_tokens", "n_seeds", "metric",
             "metric_mean", "metric_std", "drop", "drop_std", "full_mean", "full_std", "full_n",
             "image_strategy", "image_tokens", "text_strategy", "text_tokens"]
    return cells[order + [c for c in cells.columns if c not in order]]
