"""Drop-curve fits, measured and fitted minimum token lengths, bootstrap intervals, the scaling law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import compute_drops, drop_curve, fit_drop_curve, measured_min_tokens, summarize_cells
from analysis import fit_scaling_law, min_tokens_table
from analysis import synthetic
from analysis.fit import crossing_tokens, profile_fit
from analysis.minima import MIN_TOKENS_COLUMNS, bootstrap_crossing, is_resolved, residual_scale

IMAGE_GRID = np.array([5.0, 10, 17, 26, 37, 50])


@pytest.mark.parametrize("a, b", [(0.3, 0.5), (0.8, 1.4), (0.05, 3.0), (2.0, 0.1)])
def test_fit_recovers_the_parameters_of_a_noise_free_curve(a, b):
    drops = drop_curve(IMAGE_GRID, 65.0, a, b)
    fit = fit_drop_curve(IMAGE_GRID, drops, 65.0)
    assert fit.status == "ok"
    assert fit.a == pytest.approx(a, rel=1e-3) and fit.b == pytest.approx(b, rel=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9) and fit.rmse < 1e-6
    assert fit.crossing(1.0) == pytest.approx(float(crossing_tokens(65.0, a, b, 1.0)), rel=1e-3)


def test_fitted_curve_is_monotone_and_zero_at_full_length():
    rng = np.random.default_rng(3)
    drops = drop_curve(IMAGE_GRID, 65.0, 0.5, 1.2) + rng.normal(0, 0.5, IMAGE_GRID.size)
    fit = fit_drop_curve(IMAGE_GRID, drops, 65.0)
    t = np.geomspace(2, 65, 200)
    assert np.all(np.diff(fit.predict(t)) <= 1e-12)
    assert fit.predict(65.0) == pytest.approx(0.0)


def test_fit_with_too_few_points_says_so_instead_of_inventing_a_curve():
    fit = fit_drop_curve(np.array([17.0, 37.0]), np.array([3.0, 0.5]), 65.0)
    assert fit.status == "too_few_points" and "2 reduced" in fit.reason
    assert np.isnan(fit.a) and np.isnan(fit.crossing(1.0))


def test_no_drop_at_all_gives_a_flat_fit_without_a_crossing():
    fit = fit_drop_curve(IMAGE_GRID, np.array([-0.2, 0.1, -0.1, 0.0, -0.3, 0.1]), 65.0)
    assert fit.status == "flat" and fit.a == 0.0
    assert np.isnan(fit.crossing(1.0))


@pytest.mark.parametrize("drops", [[30.0, 0.0, 0.0], [19.0, 0.2, 0.0], [60.0, 0.0, 0.0]])
def test_a_sharp_knee_is_a_drop_not_a_flat_curve(drops):
    # the best fit is a knee with b at its bound and a tiny `a` (1e-21); it was once called flat and drawn at 0
    fit = fit_drop_curve(np.array([5.0, 17.0, 37.0]), np.array(drops), 65.0)
    assert fit.status == "ok"
    assert fit.predict(5.0) == pytest.approx(drops[0], abs=0.5)
    assert 5 < fit.crossing(1.0) < 17


def test_profile_fit_matches_the_point_fit_for_many_replicates_at_once():
    rng = np.random.default_rng(0)
    truth = drop_curve(IMAGE_GRID, 65.0, 0.6, 1.1)
    replicates = truth + rng.normal(0, 0.3, (50, IMAGE_GRID.size))
    a, b = profile_fit(np.log(65.0 / IMAGE_GRID), replicates, np.ones(IMAGE_GRID.size))
    for i in (0, 17, 49):
        single = fit_drop_curve(IMAGE_GRID, replicates[i], 65.0)
        assert a[i] == pytest.approx(single.a, rel=0.02) and b[i] == pytest.approx(single.b, rel=0.02)


def test_measured_minimum_is_the_shortest_qualifying_length_even_if_a_longer_one_fails():
    tokens = np.array([5.0, 10, 17, 26, 37, 50])
    drops = np.array([9.0, 0.9, 1.5, 0.5, 1.2, 0.2])  # 10 qualifies although 17 and 37 do not
    assert measured_min_tokens(tokens, drops, 65.0, 1.0) == 10.0


def test_measured_minimum_counts_a_drop_equal_to_the_tolerance_and_falls_back_to_full_length():
    tokens = np.array([17.0, 26, 37])
    assert measured_min_tokens(tokens, np.array([3.0, 70.0 - 69.0, 0.5]), 65.0, 1.0) == 26.0
    assert measured_min_tokens(tokens, np.array([3.0, 2.0, 1.5]), 65.0, 1.0) == 65.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-2, 20, allow_nan=False), min_size=1, max_size=7), st.floats(0, 5, allow_nan=False))
def test_measured_minimum_agrees_with_its_definition(drops, max_drop):
    tokens = np.array([5.0, 10, 17, 26, 37, 50, 60])[: len(drops)]
    expected = min([t for t, d in zip(tokens, drops) if d <= max_drop + 1e-9] + [65.0])
    assert measured_min_tokens(tokens, np.array(drops), 65.0, max_drop) == expected


def analyse(table: pd.DataFrame, max_drop: float = 1.0, n_boot: int = 400):
    runs = compute_drops(table)
    cells = summarize_cells(runs)
    result, fits = min_tokens_table(runs, cells, max_drop, n_boot=n_boot, seed=1)
    return result, fits, cells


def test_min_tokens_table_has_the_promised_columns_first():
    result, _, _ = analyse(synthetic.make_table(seeds=2, stages=("pretrain",)), n_boot=50)
    assert list(result.columns[:11]) == ["model", "params", "axis", "strategy", "full_tokens", "full_mean",
                                         "min_tokens_measured", "min_tokens_fit", "ci_low", "ci_high", "max_drop"]
    assert list(result.columns) == MIN_TOKENS_COLUMNS
    assert set(result.axis) == {"image", "text"} and len(result) == 3 * 8


@pytest.mark.parametrize("seeds, noise", [(1, 0.0), (1, 0.3), (3, 0.0), (3, 0.3)])
def test_true_minimum_lies_in_the_interval_and_measured_follows_the_definition(seeds, noise):
    table = synthetic.make_table(seeds=seeds, noise=noise, stages=("pretrain",), random_state=7)
    result, _, cells = analyse(table)
    truth = synthetic.true_min_tokens()
    merged = result.merge(truth, on=["model", "axis", "strategy"])
    assert len(merged) == 24 and (merged.fit_status == "ok").all()
    assert (merged.ci_low <= merged.min_tokens_fit).all() and (merged.min_tokens_fit <= merged.ci_high).all()
    covered = (merged.ci_low <= merged.true_min_tokens) & (merged.true_min_tokens <= merged.ci_high)
    assert covered.all() if noise == 0 else covered.mean() >= 0.9
    if noise == 0:  # the functional form is the generating one: the fit is exact, and so every curve resolved
        assert np.allclose(merged.min_tokens_fit, merged.true_min_tokens, rtol=1e-3)
        assert merged.resolved.all()
    for row in merged.itertuples():  # measured = shortest grid length whose seed-mean drop <= max_drop
        curve = cells[(cells.model == row.model) & (cells.axis == row.axis) & (cells.strategy == row.strategy)]
        expected = min(list(curve.loc[curve["drop"] <= 1.0, "tokens"]) + [row.full_tokens])
        assert row.min_tokens_measured == expected


def test_interval_is_honest_when_the_true_curve_has_another_shape():
    """A logistic drop curve (saturating near chance), measured without noise: the crossing lies in the interval."""
    full = 65.0

    def logistic(t):
        return 30 / (1 + np.exp(-(np.log(full / t) - 1.5) * 3)) - 30 / (1 + np.exp(4.5))

    fine = np.geomspace(1, full, 200_001)
    true_t = fine[np.argmax(logistic(fine) <= 1.0)]
    drops = logistic(IMAGE_GRID)
    fit = fit_drop_curve(IMAGE_GRID, drops, full, focus=4.0)
    values = [np.array([50.0 - d]) for d in drops]
    ci = bootstrap_crossing(IMAGE_GRID, values, np.array([50.0]), full, fit, 1.0, 300, np.random.default_rng(0))
    assert ci["ci_method"] == "residuals"
    assert ci["ci_low"] <= true_t <= ci["ci_high"]
    assert ci["ci_low"] <= fit.crossing(1.0) <= ci["ci_high"]


@pytest.mark.parametrize("estimate, low, high, resolved", [
    (12.0, 5.0, 17.0, True), (12.0, 4.0, 17.0, False), (12.0, 5.0, 20.0, False),
    (17.0, 5.0, 17.0, True), (17.0, 17.0, 37.0, True), (17.0, 5.0, 37.0, False),  # a grid length: either side
    (50.0, 37.0, 65.0, True), (0.0, 0.0, 5.0, True), (0.0, 0.0, 6.0, False),  # 0: a flat curve, below the grid
    (12.0, np.nan, 17.0, False),
])
def test_resolved_means_the_interval_lies_within_the_grid_lengths_around_the_minimum(estimate, low, high, resolved):
    assert is_resolved(np.array([5.0, 17.0, 37.0]), 65.0, estimate, low, high) is resolved


def test_one_seed_curves_pool_their_residual_noise():
    exact = (np.array([9.0, 3.0, 1.0]), np.array([9.0, 3.0, 1.0]), np.ones(3))  # fits perfectly by chance
    noisy = (np.array([10.0, 2.0, 2.0, 0.0]), np.array([9.0, 3.0, 1.0, 1.0]), np.ones(4))
    sigma, dof = residual_scale([exact, noisy])
    assert dof == 3 and sigma == pytest.approx(np.sqrt(4 / 3))
    fit = fit_drop_curve(IMAGE_GRID[:3], exact[0], 65.0)
    rng = np.random.default_rng(0)
    values = [np.array([50.0 - d]) for d in exact[0]]
    own = bootstrap_crossing(IMAGE_GRID[:3], values, np.array([50.0]), 65.0, fit, 2.0, 400, rng)
    pooled = bootstrap_crossing(IMAGE_GRID[:3], values, np.array([50.0]), 65.0, fit, 2.0, 400, rng,
                                residual_noise=(sigma, dof))
    assert pooled["ci_high"] - pooled["ci_low"] > own["ci_high"] - own["ci_low"]  # no false certainty


def test_seed_bootstrap_is_used_with_several_seeds_and_gets_narrower_with_more_seeds():
    widths = []
    for seeds, method in ((3, "seeds-pooled"), (12, "seeds")):
        table = synthetic.make_table({"m": 4e6}, seeds=seeds, noise=0.5, stages=("pretrain",), random_state=2,
                                     text_strategies=())
        result, _, _ = analyse(table)
        assert (result.ci_method == method).all()
        widths.append(np.median(np.log(result.ci_high / result.ci_low)))
    assert widths[1] < widths[0]


def test_model_without_baseline_gets_a_row_saying_so():
    table = synthetic.make_table(seeds=1, stages=("pretrain",))
    table = table[~((table.model == "cpu-l") & (table.image_strategy == "none") & (table.text_strategy == "none"))]
    with pytest.warns(UserWarning, match="cpu-l"):
        result, _, _ = analyse(table, n_boot=50)
    rows = result[result.model == "cpu-l"]
    assert (rows.fit_status == "no_baseline").all()
    assert rows[["min_tokens_measured", "min_tokens_fit", "ci_low", "ci_high"]].isna().all().all()
    assert (result[result.model != "cpu-l"].fit_status == "ok").all()


def test_scaling_law_recovers_an_exact_power_law_and_predicts_unseen_sizes():
    params = np.array([1e6, 4e6, 1.6e7, 6.4e7])
    min_tokens = pd.DataFrame({
        "model": [f"m{i}" for i in range(4)], "params": params, "axis": "image", "strategy": "resize",
        "min_tokens_fit": 300 * params ** -0.2, "stage": "pretrain",
    })
    laws, predictions = fit_scaling_law(min_tokens, predict_params=np.array([1e9]))
    law = laws.iloc[0]
    assert law.slope == pytest.approx(-0.2) and 10**law.intercept == pytest.approx(300)
    assert law.n_models == 4 and law.r2 == pytest.approx(1.0)
    prediction = predictions.iloc[0]
    assert prediction.predicted_min_tokens == pytest.approx(300 * 1e9 ** -0.2)
    assert prediction.extrapolated and prediction.prediction_low <= prediction.predicted_min_tokens


def test_no_size_is_predicted_to_need_more_than_the_full_length():
    params = np.array([1e6, 4e6, 1.6e7])
    min_tokens = pd.DataFrame({"model": ["a", "b", "c"], "params": params, "axis": "image", "strategy": "random",
                               "min_tokens_fit": [40.0, 30.0, 20.0], "full_tokens": 65.0, "stage": "pretrain"})
    _, predictions = fit_scaling_law(min_tokens, predict_params=np.array([1e3, 3e5, 1e9]))
    tiny, small, large = predictions.itertuples()
    assert tiny.predicted_min_tokens == tiny.prediction_high == 65 and tiny.at_full_length  # the line gives ~150
    assert small.predicted_min_tokens < 65 == small.prediction_high and not small.at_full_length
    assert large.predicted_min_tokens < 20 and not large.at_full_length
    other = min_tokens.assign(full_tokens=[65.0, 65.0, 197.0])  # no common full length: nothing to stop at
    _, predictions = fit_scaling_law(other, predict_params=np.array([1e3]))
    assert predictions.predicted_min_tokens.iloc[0] > 65 and not predictions.at_full_length.iloc[0]


def test_scaling_law_needs_two_models_and_default_predictions_skip_sizes_that_were_run():
    one = pd.DataFrame({"model": ["a"], "params": [1e6], "axis": "text", "strategy": "syntax",
                        "min_tokens_fit": [8.0], "stage": "pretrain"})
    laws, predictions = fit_scaling_law(one)
    assert laws.empty and predictions.empty
    two = pd.concat([one, one.assign(model="b", params=1e7, min_tokens_fit=6.0)])
    laws, predictions = fit_scaling_law(two)
    assert len(laws) == 1 and np.isnan(laws.iloc[0].slope_stderr)
    assert not set(predictions.params) & {1e6, 1e7} and len(predictions) > 0
