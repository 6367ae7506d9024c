"""report.md: the figures, the minimum-token table, the scaling law, and everything that went wrong."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from .figures import human_flops, metric_label, pareto_cells
from .fit import B_MAX, B_MIN, MIN_POINTS
from .minima import FOCUS_FACTOR, MANY_SEEDS

_MAX_LISTED = 50


def markdown_table(frame: pd.DataFrame, columns: dict[str, tuple[str, Callable[[object], str]] | str]) -> str:
    """A GitHub-flavoured markdown table of ``frame``; ``columns`` maps column -> header or (header, formatter)."""
    headers, cells = [], []
    for column, spec in columns.items():
        header, fmt = (spec, _plain) if isinstance(spec, str) else spec
        headers.append(header)
        cells.append([fmt(v) for v in frame[column]] if column in frame else [""] * len(frame))
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in zip(*cells):
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |")
    return "\n".join(lines)


def _plain(value: object) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _num(digits: int) -> Callable[[object], str]:
    def fmt(value: object) -> str:
        try:
            value = float(value)
        except (TypeError, ValueError):
            return "–"
        return f"{value:.{digits}f}" if np.isfinite(value) else "–"

    return fmt


def _models(used: pd.DataFrame) -> str:
    """Each model with its size: total, and per encoder where the results have it (vision, text)."""
    sizes = used.groupby("model")[[c for c in ("params", "vision_params", "text_params") if c in used]].first()
    parts = []
    for model, row in sizes.iterrows():
        towers = [f"{name} {_params(row[f'{name}_params'])}" for name in ("vision", "text")
                  if f"{name}_params" in row and pd.notna(row[f"{name}_params"])]
        parts.append(f"{model} ({_params(row['params'])}{'; ' + ', '.join(towers) if towers else ''})")
    return ", ".join(parts)


def _params(value: object) -> str:
    from .figures import _human

    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    return _human(value) if np.isfinite(value) else "–"


def _tokens(value: object) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    if not np.isfinite(value):
        return "–"
    return f"{value:.0f}" if value == round(value) else f"{value:.1f}"


def _figure(lines: list[str], files: list[Path] | None, out: Path, title: str, missing: str | None) -> None:
    if missing is None:
        lines += ["_Figures were not drawn (switched off with `--no-figures`)._", ""]
    elif files:
        png, pdf = (f.relative_to(out).as_posix() for f in files)
        lines += [f"![{title}]({png})", "", f"[PDF]({pdf})", ""]
    else:
        lines += [f"_{missing}_", ""]


def _bullets(lines: list[str], items: Iterable[str]) -> None:
    items = list(items)
    for item in items[:_MAX_LISTED]:
        lines.append(f"- {item}")
    if len(items) > _MAX_LISTED:
        lines.append(f"- … and {len(items) - _MAX_LISTED} more")
    lines.append("")


def write_report(analysis, out: Path, figure_files: dict[str, list[Path] | None]) -> Path:
    """Write ``out/report.md`` for an `analysis.pipeline.Analysis`; figure paths are linked relative to ``out``."""
    a = analysis
    drawn = bool(figure_files)

    def why(reason: str) -> str | None:
        return reason if drawn else None

    runs = a.runs
    label = metric_label(a.metric)
    n_runs = len(runs)
    n_failed = int((runs["status"] != "completed").sum())
    used = runs[runs["in_analysis"]]
    seeds = f"{a.cells['n_seeds'].min()}–{a.cells['n_seeds'].max()}" if len(a.cells) else "–"
    lines = [
        "# Token-length sweep analysis",
        "",
        f"Input `{a.source}` · metric `{a.metric}` ({label}) · stage `{a.stage}` · tolerance "
        f"`max_drop` = {a.max_drop:g} pp · {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- runs: {n_runs} ({n_runs - n_failed} completed, {n_failed} failed or unfinished); "
        f"{len(used)} runs with a value at this stage are analysed",
        f"- models: {_models(used)}",
        f"- grid cells (seed-averaged): {len(a.cells)}; seeds per cell: {seeds}",
        f"- result files skipped as unreadable: {len(a.skipped)}",
        f"- models without a full-length baseline: {', '.join(a.missing_baseline) or 'none'}",
        "",
        "Files: `runs.csv` (one row per run), `drops.csv` (seed-averaged cells), `min_tokens.csv`, "
        "`scaling_law.csv`, `scaling_predictions.csv`, `figures/` (PNG and PDF).",
        "",
        "## Minimum token length",
        "",
        f"The shortest token length whose drop in {label} is at most {a.max_drop:g} pp: *measured* is the shortest "
        "grid length whose seed-mean drop qualifies (longer lengths are not required to qualify too); *fitted* is "
        f"where the fitted drop curve crosses the tolerance, with a {a.confidence:.0%} bootstrap interval (see "
        "Method).",
        "",
    ]
    mt = a.min_tokens
    lines.append(markdown_table(mt, {
        "model": "model", "axis_params": ("tower params", _params),
        "axis_params_column": ("of", lambda v: {"vision_params": "vision tower", "text_params": "text tower"}.get(
            v, "whole model")),
        "axis": "axis", "strategy": "strategy",
        "full_tokens": ("full tokens", _tokens), "full_mean": (f"full {a.metric}", _num(2)),
        "min_tokens_measured": ("measured", _tokens), "min_tokens_fit": ("fitted", _num(1)),
        "ci_low": ("CI low", _num(1)), "ci_high": ("CI high", _num(1)), "ci_method": "CI from",
        "fit_r2": ("fit R²", _num(3)), "fit_rmse": ("RMSE (pp)", _num(2)), "fit_status": "fit",
        "resolved": ("resolved", lambda v: "yes" if v is True or v == 1 else "no"),
    }))
    lines.append("")
    if len(mt):
        unresolved = mt[~mt["resolved"].astype(bool)]
        lines += [f"**Resolved: {len(mt) - len(unresolved)} of {len(mt)} curves** have a {a.confidence:.0%} interval "
                  "within the two grid lengths around the fitted minimum (0 below the shortest length, where nothing "
                  "is measurably lost).", ""]
        # those without an interval (no baseline, too few lengths) are listed below, with why
        unresolved = unresolved[unresolved["ci_low"].notna() | unresolved["ci_high"].notna()]
        if len(unresolved):
            lines += ["Not resolved (more seeds, or grid lengths nearer the minimum, would narrow them):", ""]
            _bullets(lines, (f"{r.model} / {r.axis} / {r.strategy}: interval {_tokens(r.ci_low)}–{_tokens(r.ci_high)} "
                             f"tokens" for r in unresolved.itertuples()))
    bad = mt[~mt["fit_status"].isin(["ok"])]
    if len(bad):
        lines += ["Curves without a usable crossing:", ""]
        _bullets(lines, (f"{r.model} / {r.axis} / {r.strategy}: {r.fit_status} – {r.fit_reason}"
                         for r in bad.itertuples()))

    lines += ["## Inverse scaling law", ""]
    _figure(lines, figure_files.get("min_tokens_vs_params"), out, "Minimum token length against encoder size",
            why("No figure: no minimum token length could be placed against a parameter count."))
    if len(a.laws):
        lines += ["`log10(min_tokens) = intercept + slope · log10(params)`, fitted on the fitted minima, with "
                  "`params` the size of the encoder the axis reduces (vision tower for image tokens, text tower "
                  "without its token embedding for text tokens). A negative slope is the inverse scaling law: "
                  "larger models tolerate shorter sequences.", ""]
        lines.append(markdown_table(a.laws, {
            "axis": "axis", "strategy": "strategy", "n_models": "models", "slope": ("slope", _num(3)),
            "slope_stderr": ("± s.e.", _num(3)), "intercept": ("intercept", _num(3)), "r2": ("R²", _num(3)),
        }))
        lines += ["", f"Predictions for sizes not run ({a.confidence:.0%} prediction interval; needs three or more "
                  "models; no size needs more than the full length, where a prediction and its interval stop):", ""]
        lines.append(markdown_table(a.predictions, {
            "axis": "axis", "strategy": "strategy", "params": ("tower params", _params),
            "predicted_min_tokens": ("predicted min tokens", _num(1)), "prediction_low": ("low", _num(1)),
            "prediction_high": ("high", _num(1)), "extrapolated": "extrapolated",
            "at_full_length": "at full length",
        }))
        lines.append("")
    else:
        lines += ["_No scaling law: it needs fitted minima for at least two sizes of the encoder an axis reduces "
                  "(models may share a tower: cpu-s and cpu-m have the same text tower)._", ""]

    lines += ["## Accuracy against token length", ""]
    _figure(lines, figure_files.get("accuracy_vs_tokens"), out, f"{label} against token length",
            why("No figure: no reduced-length runs."))
    lines += ["## Drop against token length", ""]
    _figure(lines, figure_files.get("drop_vs_tokens"), out, "Drop against token length with fitted curves",
            why("No figure: no reduced-length runs."))
    lines += ["## Accuracy against training compute", ""]
    _figure(lines, figure_files.get("accuracy_vs_compute"), out, "Accuracy against training compute",
            why("Skipped: the results have no `train_flops` column (compute is recorded in result.json files, "
                "not in flat tables unless they carry it)."))
    front = pareto_cells(a.cells)
    if len(front):
        lines += [f"The grid cells on the Pareto front (no cell reaches a higher {label} with less training "
                  "compute), by compute:", ""]
        lines.append(markdown_table(front, {
            "model": "model", "axis": "axis", "strategy": "strategy", "image_tokens": ("image tokens", _tokens),
            "text_tokens": ("text tokens", _tokens), "train_flops": ("training FLOPs", human_flops),
            "metric_mean": (a.metric, _num(2)), "n_seeds": ("seeds", _tokens),
        }))
        lines.append("")

    lines += [
        "## Method",
        "",
        "- **Drop** = mean over seeds of the model's full-length run (image_strategy `none` at its largest "
        "image_tokens, text_strategy `none` at its largest text_tokens, same stage) minus the run's value, in "
        "percentage points. Runs reduced on both axes are compared with the same both-full run and are not fitted.",
        "- **Drop curve** `drop(t) = a · ((t_full / t)^b − 1)`, `a ≥ 0`, "
        f"`{B_MIN:g} ≤ b ≤ {B_MAX:g}`: zero at full length, monotone, from log-linear (`b → 0`) to a sharp knee "
        "(large `b`). Fitted by weighted least squares on the seed means (weights: seeds per point, and points "
        f"far above the tolerance down-weighted by `1 / (1 + (drop / {FOCUS_FACTOR:g}·max_drop)²)`), `b` profiled "
        "on a grid and refined with scipy. R² and RMSE are on the seed means. A curve needs at least "
        f"{MIN_POINTS} reduced token lengths.",
        f"- **Interval** (`CI from`): `seeds` when every point and the baseline have {MANY_SEEDS} or more seeds "
        "(resampled within each token length and within the baseline); `seeds-pooled` with 2 to "
        f"{MANY_SEEDS - 1} seeds (each cell's mean drawn from the within-cell spread pooled over the curve and its "
        "baseline, with a chi-square draw for the uncertainty of that spread); `residuals` at one seed (the fit "
        "residuals pooled over every curve of the axis, plus the baseline's own error). The interval "
        "is the hull of the percentile interval of the fitted crossing, that of a model-free crossing (linear in "
        "log t between the measured grid point and the next shorter one), and that observed grid bracket: honest "
        "when the functional form is not exactly right.",
        "",
    ]

    lines += ["## Problems", ""]
    failed = a.failed_runs
    if len(failed):
        lines += [f"### Failed runs ({len(failed)}): listed, not plotted", ""]
        shown = failed.head(_MAX_LISTED)
        lines.append(markdown_table(shown, {
            "run_id": "run_id", "model": "model", "image_strategy": "image strategy",
            "image_tokens": ("image tokens", _tokens), "text_strategy": "text strategy",
            "text_tokens": ("text tokens", _tokens), "seed": ("seed", _tokens), "status": "status",
            "error": "error",
        }))
        if len(failed) > _MAX_LISTED:
            lines.append(f"\n… and {len(failed) - _MAX_LISTED} more (see runs.csv).")
        lines.append("")
    if a.skipped:
        lines += [f"### Skipped result files ({len(a.skipped)})", ""]
        _bullets(lines, (f"`{p}`: {r}" for p, r in a.skipped))
    other = [m for m in a.messages if not m.startswith("skipping ")]
    if other:
        lines += ["### Warnings", ""]
        _bullets(lines, other)
    if not (len(failed) or a.skipped or other):
        lines += ["None.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
