"""The inverse scaling law: minimum token length against model parameters, a straight line on log-log axes.

``log10(min_tokens) = intercept + slope * log10(params)`` is fitted by ordinary least squares per (axis, strategy)
on the models whose fitted minimum is finite. ``params`` is the size of the encoder the axis reduces (the
`axis_params` of the minima table: vision parameters for image tokens, text parameters without the token embedding
for text tokens), as the paper plots it. The CLIPA finding is a negative slope: larger models tolerate shorter
sequences. Predictions for sizes that were not run come with a 95% prediction interval when at least three models
were fitted (with two the line is exact and no interval can be given). No size needs more than the full length (its
drop is 0 by definition): where the fitted models share one full length, a prediction and its interval stop there
(`at_full_length`: the line reached it; such a size is predicted to tolerate no reduction at all).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import stdtrit

LAW_COLUMNS = ["stage", "axis", "strategy", "value", "n_models", "slope", "slope_stderr", "intercept", "r2",
               "params_min", "params_max", "models"]
PREDICTION_COLUMNS = ["stage", "axis", "strategy", "params", "predicted_min_tokens", "prediction_low",
                      "prediction_high", "extrapolated", "at_full_length"]


def default_prediction_params(params: np.ndarray, count: int = 6) -> np.ndarray:
    """Round parameter counts (1, 3 x 10^k) around the sizes run, leaving out the sizes themselves."""
    params = np.asarray(params, dtype=float)
    params = params[np.isfinite(params) & (params > 0)]
    if params.size == 0:
        return np.array([])
    low, high = params.min() / 10, params.max() * 10
    candidates = np.array([m * 10.0**k for k in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
                           for m in (1, 3)])
    candidates = candidates[(candidates >= low) & (candidates <= high)]
    near_run = np.any(np.abs(np.log10(candidates)[:, None] - np.log10(params)[None, :]) < 0.05, axis=1)
    candidates = candidates[~near_run]
    if candidates.size > count:
        candidates = candidates[np.round(np.linspace(0, candidates.size - 1, count)).astype(int)]
    return candidates


def fit_scaling_law(
    min_tokens: pd.DataFrame,
    value: str = "min_tokens_fit",
    predict_params: np.ndarray | None = None,
    confidence: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (axis, strategy): the log-log line of ``value`` against ``params`` and its predictions.

    Returns (laws with `LAW_COLUMNS`, predictions with `PREDICTION_COLUMNS`); a group with fewer than two usable
    models gives no row.
    """
    laws, predictions = [], []
    size = "axis_params" if "axis_params" in min_tokens.columns else "params"
    ok = min_tokens[np.isfinite(min_tokens[value].astype(float)) & (min_tokens[value] > 0)
                    & np.isfinite(min_tokens[size].astype(float)) & (min_tokens[size] > 0)]
    for (axis, strategy), group in ok.groupby(["axis", "strategy"], sort=True):
        fulls = group["full_tokens"].unique() if "full_tokens" in group else []
        full = float(fulls[0]) if len(fulls) == 1 else np.nan  # models of other full lengths: no common cap
        group = group.groupby("model", as_index=False).agg(params=(size, "first"), y=(value, "first"))
        if len(group) < 2 or group["params"].nunique() < 2:
            continue
        x = np.log10(group["params"].to_numpy(dtype=float))
        y = np.log10(group["y"].to_numpy(dtype=float))
        n = len(x)
        slope, intercept = np.polyfit(x, y, 1)
        resid = y - (intercept + slope * x)
        sxx = float(np.sum((x - x.mean()) ** 2))
        s = float(np.sqrt(np.sum(resid**2) / (n - 2))) if n > 2 else np.nan
        sst = float(np.sum((y - y.mean()) ** 2))
        stage = min_tokens["stage"].iloc[0] if "stage" in min_tokens else ""
        laws.append({
            "stage": stage, "axis": axis, "strategy": strategy, "value": value, "n_models": n,
            "slope": slope, "slope_stderr": s / np.sqrt(sxx) if n > 2 else np.nan, "intercept": intercept,
            "r2": 1 - np.sum(resid**2) / sst if n > 2 and sst > 0 else np.nan,
            "params_min": 10 ** x.min(), "params_max": 10 ** x.max(),
            "models": ", ".join(group["model"]),
        })
        sizes = min_tokens.loc[min_tokens["axis"] == axis, size].to_numpy(dtype=float)
        at = default_prediction_params(sizes) if predict_params is None else np.asarray(predict_params, float)
        x0 = np.log10(at)
        y0 = intercept + slope * x0
        if n > 2:
            half = stdtrit(n - 2, 0.5 + confidence / 2) * s * np.sqrt(1 + 1 / n + (x0 - x.mean()) ** 2 / sxx)
        else:
            half = np.full_like(x0, np.nan)
        for p, mid, h in zip(at, y0, half):
            predictions.append({
                "stage": stage, "axis": axis, "strategy": strategy, "params": float(p),
                "predicted_min_tokens": np.fmin(10**mid, full), "prediction_low": np.fmin(10 ** (mid - h), full),
                "prediction_high": np.fmin(10 ** (mid + h), full),
                "extrapolated": bool(p < 10 ** x.min() or p > 10 ** x.max()), "at_full_length": bool(10**mid >= full),
            })
    return pd.DataFrame(laws, columns=LAW_COLUMNS), pd.DataFrame(predictions, columns=PREDICTION_COLUMNS)
