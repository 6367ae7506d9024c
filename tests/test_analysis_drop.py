"""Drop against the full-length run: axes, baselines, seed averaging, missing baselines."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from analysis import AnalysisWarning, compute_drops, summarize_cells
from analysis.drop import validate_request
from analysis.errors import AnalysisInputError

COLUMNS = ["model", "params", "image_strategy", "image_tokens", "text_strategy", "text_tokens", "seed", "stage",
           "zeroshot_top1"]


def table(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["run_id"] = [f"r{i}" for i in range(len(df))]
    df["sweep"], df["status"], df["error"] = "s", "completed", ""
    return df


def grid(model="m", params=1e6, base=(50.0, 52.0), stage="pretrain"):
    return [
        (model, params, "none", 65, "none", 32, 0, stage, base[0]),
        (model, params, "none", 65, "none", 32, 1, stage, base[1]),
        (model, params, "random", 37, "none", 32, 0, stage, 47.0),
        (model, params, "random", 37, "none", 32, 1, stage, 49.0),
        (model, params, "none", 65, "truncation", 8, 0, stage, 50.5),
        (model, params, "grid", 17, "syntax", 8, 0, stage, 40.0),
    ]


def test_axis_strategy_and_tokens_follow_what_differs_from_the_baseline():
    runs = compute_drops(table(grid()))
    by = runs.set_index("run_id")
    assert list(by.loc[["r0", "r1"], "axis"]) == ["full", "full"]
    assert (by.loc["r2", "axis"], by.loc["r2", "strategy"], by.loc["r2", "tokens"]) == ("image", "random", 37)
    assert (by.loc["r4", "axis"], by.loc["r4", "strategy"], by.loc["r4", "tokens"]) == ("text", "truncation", 8)
    assert by.loc["r4", "full_tokens"] == 32 and by.loc["r2", "full_tokens"] == 65
    assert by.loc["r5", "axis"] == "both" and by.loc["r5", "strategy"] == "grid+syntax"


def test_drop_is_seed_mean_baseline_minus_run_in_points():
    runs = compute_drops(table(grid()))
    by = runs.set_index("run_id")
    assert by.loc["r2", "drop"] == pytest.approx(51.0 - 47.0)
    assert by.loc["r4", "drop"] == pytest.approx(0.5)
    assert by.loc["r5", "drop"] == pytest.approx(11.0)  # both axes reduced: against the both-full run


def test_cells_average_seeds_and_keep_spread_and_count():
    cells = summarize_cells(compute_drops(table(grid())))
    cell = cells[(cells.axis == "image") & (cells.tokens == 37)].iloc[0]
    assert cell.n_seeds == 2
    assert cell.metric_mean == pytest.approx(48.0)
    assert cell.metric_std == pytest.approx(np.std([47.0, 49.0], ddof=1))
    assert cell["drop"] == pytest.approx(3.0) and cell.full_mean == pytest.approx(51.0) and cell.full_n == 2
    # one run's drop against one baseline run varies with both: sqrt(2 + 2) from std 1.41 on each side
    assert cell.full_std == pytest.approx(np.sqrt(2)) and cell["drop_std"] == pytest.approx(2.0)
    lone = summarize_cells(compute_drops(table(grid()[1:])))  # a baseline of one run has no spread to add
    assert lone[(lone.axis == "image")].drop_std.iloc[0] == pytest.approx(np.sqrt(2))


def test_stages_are_compared_within_themselves():
    rows = grid() + [(m, p, i, it, t, tt, s, "finetune", v + 3) for m, p, i, it, t, tt, s, _, v in grid()]
    df = table(rows)
    df["run_id"] = [f"r{i % len(grid())}" for i in range(len(df))]  # one run, two stages
    runs = compute_drops(df, stage="finetune")
    assert len(runs) == len(grid())
    assert (runs.stage == "finetune").all()
    assert runs.set_index("image_tokens").loc[37, "drop"].tolist() == pytest.approx([4.0, 2.0])


def test_model_without_baseline_warns_by_name_and_gets_nan_drops():
    rows = grid("small") + [r for r in grid("large", 1e7) if not (r[2] == "none" and r[4] == "none")]
    with pytest.warns(AnalysisWarning, match="'large'.*no full-length baseline"):
        runs = compute_drops(table(rows))
    assert runs[runs.model == "large"]["drop"].isna().all()
    assert runs[(runs.model == "small") & (runs.axis != "full")]["drop"].notna().all()
    assert runs.attrs["missing_baseline"] == ["large"]


def test_a_known_model_without_baseline_is_told_its_own_full_length_not_its_longest_run():
    # only image runs at 37 tokens are left: the largest length in the table is not the model's full length
    rows = [r for r in grid("cpu-m") if r[2] == "random"] + [r for r in grid("unknown") if r[2] == "random"]
    with pytest.warns(AnalysisWarning) as warned:
        runs = compute_drops(table(rows))
    said = " ".join(str(w.message) for w in warned)
    assert "'cpu-m': no full-length baseline" in said and "at 65 image tokens and text_strategy 'none' at 32" in said
    assert (runs[runs.model == "cpu-m"].full_tokens == 65).all() and (runs[runs.model == "cpu-m"].axis == "image").all()
    assert "'unknown': no full-length baseline" in said and "at 37 image tokens" in said  # all there is to go by


def test_failed_runs_are_listed_but_not_in_the_analysis():
    df = table(grid())
    df.loc[2, "status"], df.loc[2, "error"], df.loc[2, "zeroshot_top1"] = "failed", "OOM", np.nan
    extra = df.iloc[[0]].assign(run_id="never", status="failed", stage="", zeroshot_top1=np.nan, error="killed")
    runs = compute_drops(pd.concat([df, extra], ignore_index=True))
    assert {"r2", "never"} <= set(runs.run_id)
    assert not runs.set_index("run_id").loc[["r2", "never"], "in_analysis"].any()
    cells = summarize_cells(runs)
    assert cells[(cells.axis == "image")].n_seeds.tolist() == [1]


def test_no_warning_when_every_model_has_a_baseline():
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnalysisWarning)
        compute_drops(table(grid("a") + grid("b", 2e6)))


def test_unknown_metric_or_stage_is_an_input_error_naming_the_field():
    df = table(grid())
    with pytest.raises(AnalysisInputError, match="'i2t_r1'"):
        validate_request(df, "i2t_r1", "pretrain", "x.csv")
    with pytest.raises(AnalysisInputError, match="stage 'finetune'"):
        validate_request(df, "zeroshot_top1", "finetune", "x.csv")
