"""Minimum token length per (model, axis, strategy) at a tolerance, measured and fitted, with a bootstrap interval.

* **measured**: the shortest grid length whose seed-mean drop is at most ``max_drop`` (the definition in
  analysis/README.md: longer lengths are *not* required to qualify too, so a noisy non-monotone curve can give a
  short answer). The full length always qualifies (its drop is 0 by definition), so a curve where nothing qualifies
  answers the full length.
* **fitted**: where the fitted drop curve (`analysis.fit`) crosses ``max_drop``; a real number, NaN when the fit is
  not usable. The fit down-weights points whose drop is far above the tolerance (``focus`` of `fit_drop_curve`,
  `FOCUS_FACTOR` x ``max_drop``): a two-parameter form cannot follow both the 1-point drops and the 30-point drops of
  a curve that saturates near chance, and the crossing depends only on the former.
* **interval** ``[ci_low, ci_high]``, by bootstrap (vectorised: every replicate is fitted at once):

  - ``seeds`` when every point (and the baseline) has at least `MANY_SEEDS` seeds: seeds are resampled with
    replacement within each token length, and within the baseline, so baseline noise moves the whole curve as it
    really does (the resampled means are rescaled by ``sqrt(n / (n - 1))``, the bootstrap's known shrinkage);
  - ``seeds-pooled`` with 2 to `MANY_SEEDS` - 1 seeds: a cell's own spread over 2-7 seeds is too noisy to resample
    (with 3 seeds a 95% interval undercovers badly), so each cell's mean is drawn from the spread pooled over all
    cells of the curve and the baseline, Student-t style (one chi-square draw per replicate for the uncertainty of
    that spread);
  - ``residuals`` otherwise (one seed): the fitted curve plus normal noise at one run's spread estimated from the
    fit residuals (scaled to one run, two degrees of freedom spent per curve), pooled over every curve of the axis
    (one curve's 3-7 points leave 1-5 degrees of freedom: a curve that happens to fit its few points closely would
    otherwise claim a falsely narrow interval), Student-t style; plus one draw per replicate shared by all points
    for the baseline run's own error, which shifts the whole curve and is invisible in the residuals.

  The percentile interval of the fitted crossing assumes the functional form is right. To stay honest when it is
  not, the reported interval is the hull of (1) that interval, (2) the bootstrap percentile interval of a model-free
  estimate, the crossing interpolated linearly in ``log t`` between the measured minimum and the next shorter grid
  length, and (3) that observed grid bracket ``[next shorter length, measured]`` itself: for a monotone curve
  measured without noise the true crossing lies in that bracket whatever its shape. The interval therefore always
  holds the fitted value (with at least +-0.5% around it, the fit's numerical precision, which a noise-free table
  would otherwise reduce to a zero-width interval) and is never narrower than what the grid can resolve.

  A ``flat`` fit (no measurable drop) has no fitted crossing (NaN), but its interval is still reported: where the
  crossing may lie given the noise (0 as the lower end means "every length may be tolerated").
* **resolved**: the interval lies within the two grid lengths around the fitted minimum (0 below the shortest
  length, for a flat curve), so the grid has answered the question at this tolerance; `is_resolved`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .drop import AXES, BASELINE_KEYS
from .errors import AnalysisWarning
from .load import TOWER_COLUMNS
from .fit import DropCurveFit, crossing_tokens, fit_drop_curve, profile_fit

# Drops are differences of means of percentages: compare with a little slack so that 70.0 - 69.0 <= 1.0 holds.
_EPS = 1e-9
# A noise-free table gives a zero-width bootstrap interval; keep the fit's numerical precision (relative) around it.
_MIN_HALF_WIDTH = 0.005
# With at least this many seeds in every cell, seeds are resampled as they are; with fewer, from their pooled spread.
MANY_SEEDS = 8
# Points whose fitted drop is FOCUS_FACTOR x max_drop count half as much as points near the tolerance.
FOCUS_FACTOR = 4.0
MIN_TOKENS_COLUMNS = [
    "model", "params", "axis", "strategy", "full_tokens", "full_mean", "min_tokens_measured", "min_tokens_fit",
    "ci_low", "ci_high", "max_drop", "axis_params", "axis_params_column",
    "stage", "metric", "fit_status", "fit_reason", "fit_a", "fit_b", "fit_r2", "fit_rmse", "n_points",
    "seeds_per_point", "ci_method", "confidence", "n_boot", "bracket_low", "bracket_high", "shortest_tokens",
    "extrapolated", "resolved",
]


def axis_params(table: pd.DataFrame) -> pd.DataFrame:
    """`table` (min_tokens rows) with `axis_params`, the size of the encoder whose tokens the axis reduces
    (vision_params for image tokens, text_params for text tokens), as the paper plots it, and `axis_params_column`
    naming where it came from. An axis where some model lacks its encoder's size (records from before it was
    recorded) is sized by the total `params` for every model, with a warning: one axis never mixes the two."""
    table = table.copy()
    table["axis_params_column"] = ""
    for axis, rows in table.groupby("axis").groups.items():
        column = {"image": "vision_params", "text": "text_params"}[axis]
        sizes = table.loc[rows, column].astype(float)
        if not np.isfinite(sizes).all():
            lacking = sorted(table.loc[rows][~np.isfinite(sizes)]["model"].unique())
            if np.isfinite(sizes).any():
                warnings.warn(f"{axis} axis: no {column} for {', '.join(map(repr, lacking))}; every model on it is "
                              f"sized by its total params instead", AnalysisWarning, stacklevel=2)
            column, sizes = "params", table.loc[rows, "params"].astype(float)
        table.loc[rows, "axis_params"], table.loc[rows, "axis_params_column"] = sizes, column
    return table


def _one_point_per_length(curve: pd.DataFrame) -> pd.DataFrame:
    """A curve's cells sorted by length, one per length: cells of several setups at one length (a curve that pools
    setups, which `compute_drops` warns about) become one, their drops averaged over all their seeds."""
    curve = curve.sort_values("tokens")
    if not curve["tokens"].duplicated().any():
        return curve
    weighted = curve.assign(drop=curve["drop"] * curve["n_seeds"]).groupby("tokens", sort=True)
    merged = weighted.first()
    merged["n_seeds"] = weighted["n_seeds"].sum()
    merged["drop"] = weighted["drop"].sum() / merged["n_seeds"]
    return merged.reset_index()


def focus_scale(max_drop: float) -> float:
    """Drop (pp) above which points count less in the fit: a few times the tolerance (see `fit_drop_curve`)."""
    return FOCUS_FACTOR * max(max_drop, 0.25)


def measured_min_tokens(tokens: np.ndarray, drops: np.ndarray, full_tokens: float, max_drop: float) -> float:
    """The shortest length whose mean drop is at most ``max_drop`` (the full length always qualifies)."""
    if not np.isfinite(full_tokens) or not np.all(np.isfinite(drops)):
        return np.nan
    tokens = np.asarray(tokens, dtype=float)
    qualifying = tokens[np.asarray(drops) <= max_drop + _EPS]
    return float(min(qualifying.min(initial=np.inf), full_tokens))


def grid_crossing(sorted_tokens: np.ndarray, drops: np.ndarray, full_tokens: float, max_drop: float):
    """Per replicate (rows of ``drops``; columns follow ``sorted_tokens``, ascending): the grid bracket and the
    crossing interpolated inside it.

    Returns ``(below, at, interpolated)``: ``at`` is the measured minimum, ``below`` the next shorter grid length
    (``at`` itself when it is the shortest) and ``interpolated`` the point between them where the mean drop, linear
    in ``log t``, reaches ``max_drop`` (a model-free estimate of the crossing).
    """
    grid = np.asarray(sorted_tokens, dtype=float)
    drops = np.atleast_2d(drops)
    if not np.any(grid == full_tokens):
        grid = np.append(grid, full_tokens)
        drops = np.column_stack([drops, np.zeros(len(drops))])
    qualifies = drops <= max_drop + _EPS
    qualifies[:, -1] = True  # the full length (drop 0 by definition) always qualifies
    first = np.argmax(qualifies, axis=1)
    below_index = np.maximum(first - 1, 0)
    rows = np.arange(len(drops))
    d_at, d_below = drops[rows, first], drops[rows, below_index]
    log_at, log_below = np.log(grid[first]), np.log(grid[below_index])
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.clip((max_drop - d_below) / (d_at - d_below), 0.0, 1.0)
    share = np.where(first > 0, np.nan_to_num(share, nan=1.0), 1.0)
    interpolated = np.exp(log_below + share * (log_at - log_below))
    return grid[below_index], grid[first], interpolated


def is_resolved(grid_tokens: np.ndarray, full_tokens: float, estimate: float, ci_low: float, ci_high: float) -> bool:
    """Whether the interval ``[ci_low, ci_high]`` lies within the two grid lengths around the ``estimate``.

    The grid runs from 0 (every length of the grid tolerated) over the reduced lengths to the full length; the
    estimate is the fitted minimum, or 0 for a flat curve (nothing measurably lost). Where the estimate is a grid
    length itself, either bracket next to it may hold the interval. Ends are compared with the fit's numerical
    precision (``_MIN_HALF_WIDTH``), the slack the interval itself keeps around the estimate.
    """
    if not (np.isfinite(ci_low) and np.isfinite(ci_high) and np.isfinite(estimate)):
        return False
    grid = np.unique(np.concatenate([[0.0, full_tokens], np.asarray(grid_tokens, dtype=float)]))
    slack = 1 + _MIN_HALF_WIDTH
    for low, high in zip(grid[:-1], grid[1:]):
        if low / slack <= estimate <= high * slack and low / slack <= ci_low and ci_high <= high * slack:
            return True
    return False


def _resampled_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of ``values`` with the spread rescaled by sqrt(n / (n - 1)).

    The plain bootstrap of a mean has variance ``(n - 1) / n`` times the usual estimate: with the 2-5 seeds of a sweep
    that is 20-50% too narrow, so the deviations are scaled back up.
    """
    n = len(values)
    mean = values.mean()
    means = values[rng.integers(0, n, (n_boot, n))].mean(1)
    return mean + (means - mean) * np.sqrt(n / (n - 1))


def residual_scale(curves: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """One run's noise from fit residuals, pooled: ``curves`` holds (seed-mean drops, fitted drops, seeds per
    point) per curve. Residuals of seed means are brought to one run's scale; each curve spends two degrees of
    freedom on its fit. Returns (standard deviation, degrees of freedom)."""
    squares = sum(float(np.sum(c * (d - f) ** 2)) for d, f, c in curves)
    dof = sum(max(len(d) - 2, 1) for d, _, _ in curves)
    return float(np.sqrt(squares / dof)), dof


def bootstrap_crossing(
    tokens: np.ndarray,
    point_values: list[np.ndarray],
    baseline_values: np.ndarray,
    full_tokens: float,
    fit: DropCurveFit,
    max_drop: float,
    n_boot: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
    residual_noise: tuple[float, int] | None = None,
) -> dict:
    """Bootstrap interval of the fitted crossing, widened to the grid bracket (see the module docstring).

    ``residual_noise`` (one run's standard deviation, degrees of freedom) is used where the points have a single
    seed; by default it comes from this curve's own residuals."""
    tokens = np.asarray(tokens, dtype=float)
    order = np.argsort(tokens)
    tokens = tokens[order]
    point_values = [point_values[i] for i in order]
    counts = np.array([len(v) for v in point_values], dtype=float)
    base_mean = float(np.mean(baseline_values))
    drops = np.array([base_mean - np.mean(v) for v in point_values])
    log_ratio = np.log(full_tokens / tokens)

    groups = [baseline_values, *point_values]
    if counts.min() >= MANY_SEEDS and len(baseline_values) >= MANY_SEEDS:
        method = "seeds"
        base = _resampled_means(baseline_values, n_boot, rng)
        replicates = np.empty((n_boot, len(tokens)))
        for k, values in enumerate(point_values):
            replicates[:, k] = base - _resampled_means(values, n_boot, rng)
    elif counts.min() >= 2 and len(baseline_values) >= 2:
        method = "seeds-pooled"
        # Few seeds: each cell's own spread (1-4 degrees of freedom) is too noisy to resample from. Pool the
        # within-cell spread of the curve's cells and the baseline, and draw each cell's mean from it, with one
        # shared chi-square draw per replicate for the uncertainty of the pooled spread itself (Student-t).
        dof = sum(len(v) - 1 for v in groups)
        pooled = np.sqrt(sum(((v - v.mean()) ** 2).sum() for v in groups) / dof)
        scale = pooled * np.sqrt(dof / rng.chisquare(dof, n_boot))
        sizes = np.array([len(v) for v in groups], dtype=float)
        means = np.array([v.mean() for v in groups])
        draws = means + rng.standard_normal((n_boot, len(groups))) * scale[:, None] / np.sqrt(sizes)
        replicates = draws[:, :1] - draws[:, 1:]
    else:
        method = "residuals"
        fitted = fit.predict(tokens)
        sigma, dof = residual_noise if residual_noise is not None else residual_scale([(drops, fitted, counts)])
        # One run's noise from the residuals (pooled over the table's curves where given), Student-t style: one
        # chi-square draw per replicate for the uncertainty of that spread itself.
        scale = sigma * np.sqrt(dof / rng.chisquare(dof, n_boot))
        noise = rng.standard_normal((n_boot, len(tokens))) * scale[:, None] / np.sqrt(counts)
        # The baseline's own error shifts every drop of the curve alike; residuals cannot show it, so add it.
        shift = rng.standard_normal(n_boot) * scale / np.sqrt(len(baseline_values))
        replicates = fitted + noise + shift[:, None]

    weights = np.asarray(fit.weights)[order] if len(fit.weights) == len(tokens) else counts
    a, b = profile_fit(log_ratio, replicates, weights)
    crossings = crossing_tokens(full_tokens, a, b, max_drop)
    low_q, high_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    boot_low, boot_high = np.quantile(crossings, [low_q, high_q])
    _, _, interpolated = grid_crossing(tokens, replicates, full_tokens, max_drop)
    observed_below, observed_at, _ = grid_crossing(tokens, drops[None, :], full_tokens, max_drop)
    point = fit.crossing(max_drop)
    ci_low = np.nanmin([boot_low, np.quantile(interpolated, low_q), observed_below[0], point * (1 - _MIN_HALF_WIDTH)])
    ci_high = np.nanmax([boot_high, np.quantile(interpolated, high_q), observed_at[0], point * (1 + _MIN_HALF_WIDTH)])
    return {
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "ci_method": method,
        "bracket_low": float(observed_below[0]),
        "bracket_high": float(observed_at[0]),
    }


def min_tokens_table(
    runs: pd.DataFrame,
    cells: pd.DataFrame,
    max_drop: float = 1.0,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[pd.DataFrame, dict[tuple[str, str, str], DropCurveFit]]:
    """Minimum token lengths (columns `MIN_TOKENS_COLUMNS`) and the fitted curves, keyed by (model, axis, strategy).

    ``runs`` come from `analysis.drop.compute_drops`, ``cells`` from `analysis.drop.summarize_cells`.
    """
    rng = np.random.default_rng(seed)
    metric = runs.attrs.get("metric") or (runs["metric"].iloc[0] if len(runs) else "zeroshot_top1")
    stage = runs.attrs.get("stage", "")
    used = runs[runs["in_analysis"]].reset_index(drop=True)
    values = used[metric].to_numpy(dtype=float)
    by_cell = used.groupby(["model", "axis", "strategy", "setup_id", "tokens"], sort=False).indices
    full_rows = used[used["axis"] == "full"]
    base_positions = {  # per (model, setup_id): where its full-length runs are
        key: full_rows.index.to_numpy()[idx] for key, idx in full_rows.groupby(BASELINE_KEYS).indices.items()
    }
    curves = cells[cells["axis"].isin(AXES)]
    rows, fits, measured = [], {}, []
    for (model, axis, strategy), curve in curves.groupby(["model", "axis", "strategy"], sort=True):
        based = [s for s in curve["setup_id"].unique() if (model, s) in base_positions]
        curve = _one_point_per_length(curve[curve["setup_id"].isin(based)] if based else curve)
        tokens = curve["tokens"].to_numpy(dtype=float)
        drops = curve["drop"].to_numpy(dtype=float)
        weights = curve["n_seeds"].to_numpy(dtype=float)
        full = float(curve["full_tokens"].iloc[0])
        row = {
            "model": model, "params": curve["params"].iloc[0],
            **{c: float(curve[c].iloc[0]) if c in curve.columns else np.nan for c in TOWER_COLUMNS},
            "axis": axis, "strategy": strategy,
            "full_tokens": full, "full_mean": curve["full_mean"].iloc[0], "max_drop": max_drop,
            "stage": stage, "metric": metric, "n_points": len(tokens), "seeds_per_point": int(weights.min()),
            "shortest_tokens": float(tokens.min()),
            "confidence": confidence, "n_boot": n_boot, "resolved": False,
        }
        if not based:
            fit = DropCurveFit(full, status="no_baseline", reason=f"model {model!r} has no full-length baseline")
        else:
            fit = fit_drop_curve(tokens, drops, full, weights, focus=focus_scale(max_drop))
            row["min_tokens_measured"] = measured_min_tokens(tokens, drops, full, max_drop)
            row["min_tokens_fit"] = fit.crossing(max_drop)
            row["extrapolated"] = bool(row["min_tokens_fit"] < row["shortest_tokens"]) if np.isfinite(
                row["min_tokens_fit"]) else False
            if fit.usable:
                measured.append((row, fit, tokens, drops, weights, based))
        fits[(model, axis, strategy)] = fit
        row.update(fit_status=fit.status, fit_reason=fit.reason, fit_a=fit.a, fit_b=fit.b, fit_r2=fit.r2,
                   fit_rmse=fit.rmse)
        rows.append(row)
    # Curves measured at one seed learn their noise from fit residuals: pooled over every curve of the axis, as
    # one curve's three to seven points leave it one to five degrees of freedom.
    noise = {axis: residual_scale([(d, f.predict(t), w) for r, f, t, d, w, _ in measured if r["axis"] == axis])
             for axis in {r["axis"] for r, *_ in measured}}
    for row, fit, tokens, drops, weights, based in measured:
        model, key = row["model"], (row["model"], row["axis"], row["strategy"])
        if n_boot > 0:
            # The runs of the setups the curve keeps, each setup's moved by its own baseline's distance from the
            # curve's (all its setups' baseline runs): the resampled drops are then the ones fitted, each run's
            # against its own setup's baseline
            base = {s: values[base_positions[(model, s)]] for s in based}
            common = np.concatenate(list(base.values())).mean()
            shift = {s: common - base[s].mean() if len(based) > 1 else 0.0 for s in based}
            point_values = [np.concatenate([values[by_cell[(*key, s, t)]] + shift[s] for s in based
                                            if (*key, s, t) in by_cell]) for t in tokens]
            baseline = np.concatenate([base[s] + shift[s] for s in based])
            row.update(bootstrap_crossing(tokens, point_values, baseline,
                                          row["full_tokens"], fit, max_drop, n_boot, rng, confidence,
                                          residual_noise=noise[row["axis"]]))
        estimate = 0.0 if fit.status == "flat" else row["min_tokens_fit"]
        row["resolved"] = is_resolved(tokens, row["full_tokens"], estimate, row.get("ci_low", np.nan),
                                      row.get("ci_high", np.nan))
    table = axis_params(pd.DataFrame(rows, columns=[*MIN_TOKENS_COLUMNS, *TOWER_COLUMNS]))[MIN_TOKENS_COLUMNS]
    if len(table):
        table = table.sort_values(["axis", "strategy", "params", "model"], kind="stable").reset_index(drop=True)
    return table, fits
