"""The drop curve: a monotone function of token length, fitted per (model, axis, strategy).

Functional form (a power law in the reduction factor ``t_full / t``, shifted to be zero at full length)::

    drop(t) = a * ((t_full / t) ** b - 1),    a >= 0,  1e-4 <= b <= 20

Why this form:

* it is 0 at the full length by construction (the drop is measured against that run), so no parameter is spent
  on the anchor and every reduced grid point informs the shape;
* with ``a, b >= 0`` it is monotone: the drop never shrinks as the sequence gets shorter, which is what the
  minimum-token-length question assumes;
* ``b`` spans the shapes seen in the CLIPA plots: ``b -> 0`` gives a drop linear in ``log t``
  (``a * b * log(t_full / t)``), ``b = 1`` a hyperbola, large ``b`` a sharp knee (flat, then a steep fall);
* for fixed ``b`` it is linear in ``a``, so ``a`` has a closed form (least squares, clipped at 0). The fit profiles
  ``b`` on a dense grid (robust: every grid value is a starting point, so no start can be wrong), then polishes
  the best one with ``scipy.optimize.minimize_scalar`` (bounded Brent), inside the bounds. The same closed form
  fits thousands of bootstrap replicates at once, without a Python loop.
* its inverse is closed form: the fitted curve crosses a tolerance ``max_drop`` at
  ``t = t_full / (1 + max_drop / a) ** (1 / b)``.

It is not bounded as ``t -> 0`` (real curves flatten near chance level); the fit can therefore down-weight points
far above the tolerance (``focus``), so that the shape near the tolerance, which decides the minimum token length,
is not bent by drops of tens of points at very short lengths.

A fit needs at least `MIN_POINTS` distinct reduced token lengths (two parameters plus one degree of freedom);
otherwise it reports ``too_few_points`` and no curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

MIN_POINTS = 3
B_MIN, B_MAX = 1e-4, 20.0
_B_GRID = np.geomspace(B_MIN, B_MAX, 49)  # coarse profile grid of b
_LOG_B_GRID = np.log(_B_GRID)
_FINE_OFFSETS = np.linspace(-1, 1, 17) * (_LOG_B_GRID[1] - _LOG_B_GRID[0])  # fine grid around the coarse optimum


@dataclass(frozen=True)
class DropCurveFit:
    """A fitted drop curve and how well it fits.

    ``status``: ``ok``; ``flat`` (no measurable drop, ``a = 0``: no crossing); ``too_few_points``; ``no_baseline``
    (set by `analysis.minima`); ``failed``. ``reason`` says more where there is more to say.
    """

    full_tokens: float
    a: float = np.nan
    b: float = np.nan
    status: str = "failed"
    reason: str = ""
    r2: float = np.nan
    rmse: float = np.nan
    n_points: int = 0
    weights: tuple[float, ...] = ()  # the weights of the final pass, one per point (for the bootstrap)

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "flat")

    def predict(self, tokens: np.ndarray | float) -> np.ndarray:
        """Fitted drop (percentage points) at ``tokens``."""
        return drop_curve(np.asarray(tokens, dtype=float), self.full_tokens, self.a, self.b)

    def crossing(self, max_drop: float) -> float:
        """Token length where the fitted drop reaches ``max_drop``; NaN when it never does (a flat curve)."""
        if not self.usable:
            return np.nan
        value = float(crossing_tokens(self.full_tokens, self.a, self.b, max_drop))
        return value if value > 0 else np.nan


def drop_curve(tokens: np.ndarray, full_tokens: float, a: float | np.ndarray, b: float | np.ndarray) -> np.ndarray:
    """``a * ((full_tokens / tokens) ** b - 1)``, computed stably as ``a * expm1(b * log(full / t))``."""
    return a * np.expm1(b * np.log(full_tokens / tokens))


def crossing_tokens(full_tokens: float, a: np.ndarray | float, b: np.ndarray | float, max_drop: float) -> np.ndarray:
    """Inverse of `drop_curve` at ``max_drop`` (vectorised); 0 where the curve never exceeds it (``a == 0``)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_t = np.log(full_tokens) - np.log1p(max_drop / a) / b
        t = np.exp(log_t)
    return np.where((a > 0) & (b > 0) & np.isfinite(t), t, 0.0)


def profile_fit(log_ratio: np.ndarray, drops: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares fits of many replicates at once (no Python loop over replicates).

    ``log_ratio``: ``log(t_full / t)`` per point (K,); ``drops``: (B, K) replicates; ``weights``: (K,). For every
    ``b`` of a coarse log grid ``a`` is the clipped closed-form optimum; around each replicate's best coarse ``b`` a
    fine grid, then a parabola through the three best fine points (in log b), refines it. Returns ``a``, ``b`` (B,).
    """
    drops = np.atleast_2d(drops)
    weighted = drops * weights
    x = np.expm1(np.outer(log_ratio, _B_GRID))  # (K, G)
    sxx = weights @ (x * x)
    sxy = weighted @ x  # (B, G)
    a = np.clip(sxy / sxx, 0.0, None)
    best = np.argmin(a * (a * sxx - 2.0 * sxy), axis=1)

    fine = np.clip(_LOG_B_GRID[best][:, None] + _FINE_OFFSETS[None, :], _LOG_B_GRID[0], _LOG_B_GRID[-1])
    a_fine, sse_fine = _closed_form(log_ratio, weighted, weights, np.exp(fine))  # (B, F)
    j = np.clip(np.argmin(sse_fine, axis=1), 1, len(_FINE_OFFSETS) - 2)
    rows = np.arange(len(drops))
    s_lo, s_mid, s_hi = sse_fine[rows, j - 1], sse_fine[rows, j], sse_fine[rows, j + 1]
    denom = s_lo - 2 * s_mid + s_hi
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.clip(np.where(denom > 0, 0.5 * (s_lo - s_hi) / denom, 0.0), -1.0, 1.0)
    b_ref = np.clip(np.exp(fine[rows, j] + shift * (_FINE_OFFSETS[1] - _FINE_OFFSETS[0])), B_MIN, B_MAX)
    a_ref, sse_ref = _closed_form(log_ratio, weighted, weights, b_ref[:, None])
    j_best = np.argmin(sse_fine, axis=1)
    better = sse_ref[:, 0] < sse_fine[rows, j_best]
    return (np.where(better, a_ref[:, 0], a_fine[rows, j_best]),
            np.where(better, b_ref, np.exp(fine[rows, j_best])))


def _closed_form(log_ratio: np.ndarray, weighted: np.ndarray, weights: np.ndarray, b: np.ndarray):
    """Optimal ``a`` (clipped at 0) and SSE up to a constant, for replicate-specific ``b`` of shape (B, F)."""
    x = np.expm1(b[:, :, None] * log_ratio[None, None, :])  # (B, F, K)
    sxx = (x * x) @ weights
    sxy = np.einsum("bfk,bk->bf", x, weighted)
    a = np.clip(sxy / sxx, 0.0, None)
    return a, a * (a * sxx - 2.0 * sxy)


def fit_drop_curve(
    tokens: np.ndarray,
    drops: np.ndarray,
    full_tokens: float,
    weights: np.ndarray | None = None,
    focus: float | None = None,
) -> DropCurveFit:
    """Fit `drop_curve` to mean drops at ``tokens`` (``weights``: seeds per point); report R^2 and RMSE (pp).

    ``focus`` (percentage points, e.g. a few times the tolerance): when given, a second pass down-weights points by
    ``1 / (1 + (fitted drop / focus) ** 2)``, i.e. treats the error of a point as growing with its drop. Drops of tens
    of points at very short lengths then no longer decide the curve's shape near the tolerance, which is the part
    the minimum token length depends on; with the right functional form both passes agree.
    """
    tokens = np.asarray(tokens, dtype=float)
    drops = np.asarray(drops, dtype=float)
    weights = np.ones_like(drops) if weights is None else np.asarray(weights, dtype=float)
    keep = np.isfinite(tokens) & np.isfinite(drops) & (tokens > 0) & (weights > 0)
    tokens, drops, weights = tokens[keep], drops[keep], weights[keep]
    n_reduced = int(np.unique(tokens[tokens < full_tokens]).size)
    if not np.isfinite(full_tokens):
        return DropCurveFit(full_tokens, status="failed", reason="no full-length baseline", n_points=n_reduced)
    if n_reduced < MIN_POINTS:
        return DropCurveFit(
            full_tokens, status="too_few_points",
            reason=f"{n_reduced} reduced token length(s), need {MIN_POINTS}", n_points=n_reduced,
        )
    log_ratio = np.log(full_tokens / tokens)
    a, b, _ = _fit(log_ratio, drops, weights)
    fit_weights = weights
    if focus is not None and np.isfinite(a) and a > 0:
        fit_weights = weights / (1.0 + (a * np.expm1(b * log_ratio) / focus) ** 2)
        a, b, _ = _fit(log_ratio, drops, fit_weights)
    if not (np.isfinite(a) and np.isfinite(b)):
        return DropCurveFit(full_tokens, status="failed", reason="optimiser gave non-finite parameters",
                            n_points=n_reduced)
    # Goodness of fit on the seed means, weighted by seeds only (not by the focus), so it reads plainly.
    sse = float(np.sum(weights * (a * np.expm1(b * log_ratio) - drops) ** 2))
    mean = np.sum(weights * drops) / np.sum(weights)
    sst = float(np.sum(weights * (drops - mean) ** 2))
    r2 = 1.0 - sse / sst if sst > 0 else np.nan
    rmse = float(np.sqrt(sse / np.sum(weights)))
    fit = dict(full_tokens=full_tokens, r2=r2, rmse=rmse, n_points=n_reduced, weights=tuple(fit_weights))
    # Flat is judged on the fitted drops, not on `a`: a sharp knee (b near B_MAX) has a tiny `a` (1e-21 for a 30-pp
    # drop at 5 of 65 tokens) times a huge reduction term, and is anything but flat.
    if not np.any(a * np.expm1(b * log_ratio) > 1e-9):
        return DropCurveFit(a=0.0, b=b, status="flat", reason="no measurable drop: best monotone fit is 0 everywhere",
                            **fit)
    reason = f"b at its bound {b:g}" if b >= B_MAX * 0.999 or b <= B_MIN * 1.001 else ""
    return DropCurveFit(a=a, b=b, status="ok", reason=reason, **fit)


def _fit(log_ratio: np.ndarray, drops: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    """Weighted least squares of `drop_curve`: (a, b, SSE).

    Variable projection: for fixed b the optimal a is closed form, so the two-parameter problem is a one-dimensional
    one in log b. The dense grid in `profile_fit` picks the basin (every grid value is a start), and Brent's bounded
    method (``scipy.optimize.minimize_scalar``) polishes inside it.
    """
    a_grid, b_grid = (float(v[0]) for v in profile_fit(log_ratio, drops[None, :], weights))

    def profile(log_b: float) -> tuple[float, float]:
        x = np.expm1(np.exp(log_b) * log_ratio)
        a = max(float(np.sum(weights * x * drops) / np.sum(weights * x * x)), 0.0)
        return a, float(np.sum(weights * (a * x - drops) ** 2))

    best = (a_grid, b_grid, profile(np.log(b_grid))[1])
    step = float(_LOG_B_GRID[1] - _LOG_B_GRID[0])
    lo, hi = max(np.log(b_grid) - step, np.log(B_MIN)), min(np.log(b_grid) + step, np.log(B_MAX))
    try:
        result = minimize_scalar(lambda lb: profile(lb)[1], bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-7})
        a_opt, sse_opt = profile(float(result.x))
        if np.isfinite(sse_opt) and sse_opt <= best[2]:
            best = (a_opt, float(np.exp(result.x)), sse_opt)
    except (ValueError, FloatingPointError):
        pass  # keep the grid optimum
    return best
