"""What the analysis does with inputs a researcher's results directory really holds: the same run in two sweeps,
runs of different setups side by side, links, its own output table, non-metric columns, a bad --out."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import synthetic
from analysis.load import load_results
from analysis.pipeline import analyze, run_analysis
from tests.test_analysis_cli import MODELS, sweep

CONFIG = {"batch_size": 64, "pretrain_samples": 2560, "finetune_samples": 0, "lr": 1e-3, "seed": 0}


def results(root: Path, sweep_name: str, config: dict | None = None, models=MODELS, seeds: int = 1,
            axis: str = "image", shift: float = 0.0) -> Path:
    """A synthetic sweep of one axis written as result.json files, each record carrying `config` (with its own
    seed and token settings) as a trained run's does, and a run id that, like a real one, tells its setup apart;
    every accuracy moved by `shift` points."""
    strategies = {"image_strategies": ()} if axis == "text" else {"text_strategies": ()}
    table = synthetic.make_table(models, seeds=seeds, noise=0.2, stages=("pretrain",), **strategies)
    table["zeroshot_top1"] += shift
    for path in synthetic.write_result_files(table, root, sweep=sweep_name):
        record = json.loads(path.read_text())
        if config is not None:
            record["config"] = {**config, **{k: record[k] for k in ("model", "image_strategy", "image_tokens",
                                                                    "text_strategy", "text_tokens", "seed")}}
            record["run_id"] += f"_{config['pretrain_samples']}"
        path.write_text(json.dumps(record))
    return root


def analysed(path: Path, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze(load_results(path), n_boot=20, **options)


def test_the_same_run_in_two_sweeps_is_one_measurement_not_two_seeds(tmp_path):
    one = analysed(results(tmp_path / "one", "study", CONFIG))
    results(tmp_path / "two", "study", CONFIG)
    results(tmp_path / "two", "seed_noise", CONFIG)  # a seed study whose seed 0 repeats the study's runs
    two = analysed(tmp_path / "two")
    assert (two.cells["n_seeds"] == 1).all()
    pd.testing.assert_series_equal(two.min_tokens["min_tokens_fit"], one.min_tokens["min_tokens_fit"])
    assert any("found more than once" in m and "counted once" in m for m in two.messages)
    assert len(two.runs) == len(one.runs)


def test_each_run_is_compared_with_the_full_length_run_of_its_own_setup(tmp_path):
    # the two studies of the README, side by side under one results root: their budgets differ, and so do their
    # baselines (here by 10 points)
    image = results(tmp_path / "image", "image_strategies", CONFIG)
    text = results(tmp_path / "text", "text_strategies", {**CONFIG, "pretrain_samples": 6400}, axis="text",
                   shift=10.0)
    (tmp_path / "both").mkdir()
    for sweep_dir in (image / "image_strategies", text / "text_strategies"):
        sweep_dir.rename(tmp_path / "both" / sweep_dir.name)
    both = analysed(tmp_path / "both")
    assert not any("setup" in m for m in both.messages)
    alone = pd.concat([analysed(tmp_path / "both" / name).cells for name in ("image_strategies", "text_strategies")])
    merged = both.cells.merge(alone, on=["model", "setup_id", "axis", "strategy", "tokens"], suffixes=("", "_alone"))
    assert len(merged) == len(both.cells) and (merged["drop"] - merged["drop_alone"]).abs().max() < 1e-9
    assert set(both.cells["n_seeds"]) == {1}  # the two baselines of a model are not pooled as two seeds


def test_a_curve_that_pools_runs_of_different_setups_is_warned_about(tmp_path):
    results(tmp_path, "study", CONFIG)
    assert not any("setups" in m for m in analysed(tmp_path).messages)
    results(tmp_path, "smoke", {**CONFIG, "pretrain_samples": 256}, models={"cpu-s": MODELS["cpu-s"]})
    mixed = analysed(tmp_path)
    messages = [m for m in mixed.messages if "setups" in m]
    assert len(messages) == 4  # one per image strategy of cpu-s
    assert all(m.startswith("cpu-s / image /") and "smoke" in m and "study" in m and "setup_id" in m
               for m in messages)
    assert set(mixed.runs["setup_id"]) == set(load_results(tmp_path)["setup_id"]) and "" not in set(
        mixed.runs["setup_id"])


def test_a_curves_interval_comes_from_the_runs_its_fit_uses_each_against_its_own_baseline():
    def interval(setups: dict[str, tuple[float, bool]]) -> list[float]:  # setup -> (its level, has a baseline)
        rows, rng = [], np.random.default_rng(0)
        for setup, (level, based) in setups.items():
            for seed in range(3):
                for tokens in [65] * based + [50, 37, 26, 17, 10, 5]:
                    rows.append(dict(model="cpu-s", params=1e6, image_strategy="random" if tokens < 65 else "none",
                                     image_tokens=tokens, text_strategy="none", text_tokens=32, seed=seed,
                                     stage="pretrain", setup_id=setup,
                                     zeroshot_top1=level - 0.8 * ((65 / tokens) ** 1.4 - 1) + rng.normal(0, 0.2)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = analyze(pd.DataFrame(rows), n_boot=200).min_tokens.iloc[0]
        return row[["min_tokens_fit", "ci_low", "ci_high", "bracket_low", "bracket_high"]].to_list()

    # a setup without a baseline is left out of the curve, its interval included
    assert interval({"A": (70.0, True), "B": (40.0, False)}) == interval({"A": (70.0, True)})
    # two setups whose baselines are 30 points apart: each run's drop is from its own setup's baseline
    assert interval({"A": (70.0, True), "B": (40.0, True)}) == pytest.approx(interval({"A": (70.0, True),
                                                                                      "B": (70.0, True)}))


def test_symlinked_sweeps_are_read_and_a_link_loop_is_not_followed(tmp_path):
    results(tmp_path / "elsewhere", "study")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "study").symlink_to(tmp_path / "elsewhere" / "study")
    (tmp_path / "root" / "study" / "loop").symlink_to(tmp_path / "root")
    table = load_results(tmp_path / "root")
    assert len(table) == len(load_results(tmp_path / "elsewhere")) > 0


def test_an_analysis_runs_csv_can_be_analysed_again(tmp_path):
    first = run_analysis(results(tmp_path, "study", CONFIG), tmp_path / "a", n_boot=20, figures=False)[0]
    again = run_analysis(tmp_path / "a" / "runs.csv", tmp_path / "b", n_boot=20, figures=False)[0]
    pd.testing.assert_series_equal(again.min_tokens["min_tokens_fit"], first.min_tokens["min_tokens_fit"])


@pytest.mark.parametrize("metric", ["params", "seed", "image_tokens", "train_flops", "zeroshot_classes", "drop"])
def test_a_column_that_is_not_a_metric_is_refused_in_one_line(tmp_path, metric):
    path = results(tmp_path, "study", CONFIG)
    code, _, err = sweep(str(path), "--out", str(tmp_path / "out"), "--metric", metric, "--no-figures")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"unknown metric column {metric!r}" in err
    assert not (tmp_path / "out").exists()


def test_completed_runs_without_the_analysed_stage_are_named_in_a_warning(tmp_path):
    results(tmp_path, "study", CONFIG)
    for path in list((tmp_path / "study").glob("cpu-l-random*/result.json"))[:3]:
        record = json.loads(path.read_text())
        record["metrics"] = {"finetune": record["metrics"]["pretrain"]}
        path.write_text(json.dumps(record))
    result = analysed(tmp_path, stage="pretrain")
    [message] = [m for m in result.messages if "have no 'zeroshot_top1' value" in m]
    assert message.startswith("3 completed run(s)") and "cpu-l-random" in message


@pytest.mark.parametrize("out", ["a_file", "a_file/below"])
def test_an_out_path_on_a_file_is_one_line_and_exit_2(tmp_path, out):
    path = results(tmp_path, "study", CONFIG)
    (tmp_path / "a_file").write_text("keep me")
    code, _, err = sweep(str(path), "--out", str(tmp_path / out), "--no-figures")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "a_file: is a file" in err
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_a_table_that_cannot_be_written_fails_the_analysis_while_figures_are_drawn(tmp_path):
    path = results(tmp_path, "study", CONFIG)
    (tmp_path / "out" / "runs.csv").mkdir(parents=True)  # runs.csv cannot be written: a directory holds the name
    with pytest.raises(IsADirectoryError):
        run_analysis(path, tmp_path / "out", n_boot=20, jobs=2)


def test_an_axis_is_sized_by_one_kind_of_parameter_count(tmp_path):
    results(tmp_path, "study", CONFIG)
    for path in (tmp_path / "study").glob("*/result.json"):  # cpu-s from before encoder sizes were recorded
        record = json.loads(path.read_text())
        if record["model"] != "cpu-s":
            record["vision_params"] = record["params"] / 8
        path.write_text(json.dumps(record))
    result = analysed(tmp_path)
    assert (result.min_tokens["axis_params_column"] == "params").all()
    assert (result.min_tokens["axis_params"] == result.min_tokens["params"]).all()
    assert any("no vision_params for 'cpu-s'" in m for m in result.messages)
    for path in (tmp_path / "study").glob("cpu-s*/result.json"):
        record = json.loads(path.read_text())
        record["vision_params"] = record["params"] / 8
        path.write_text(json.dumps(record))
    sized = analysed(tmp_path).min_tokens
    assert (sized["axis_params_column"] == "vision_params").all()
    assert (sized["axis_params"] == sized["params"] / 8).all()


def test_the_scaling_figure_names_its_interval_and_joins_models_of_one_size():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from analysis.pipeline import make_figures

    table = synthetic.make_table(MODELS, seeds=1, stages=("pretrain",), image_strategies=("random",),
                                 text_strategies=("truncation",))
    table["vision_params"] = table["params"] / 8
    table["text_params"] = table["model"].map({"cpu-s": 3e5, "cpu-m": 3e5, "cpu-l": 9e5})  # s and m share a tower
    for confidence, n_boot in ((0.5, 50), (0.95, 0)):
        result = analyze(table, n_boot=n_boot, confidence=confidence)
        fig = make_figures(result, ("min_tokens_vs_params",))["min_tokens_vs_params"]
        FigureCanvasAgg(fig).draw()
        image, text = fig.axes
        rows = result.min_tokens[result.min_tokens["axis"] == "image"]
        legend = [t.get_text() for t in fig.legends[0].get_texts()]  # what the markers mean, for every panel
        # fitted crossings whose interval the grid resolves are filled, the others open, and the legend says so
        fitted = [line for line in image.get_lines() if line.get_marker() == "o" for _ in line.get_xdata()]
        open_points = sum(line.get_markerfacecolor() == "white" for line in fitted)
        if n_boot:
            assert rows["resolved"].any() and not rows["resolved"].all()  # both kinds are drawn
            assert {"fitted, resolved", "fitted, not resolved", "bars: 50% interval"} <= set(legend)
            assert open_points == (~rows["resolved"]).sum()
        else:
            assert "fitted crossing" in legend and open_points == 0
        # fitted minima below the shortest grid length are extrapolated: that length is drawn
        assert "shortest length trained" in legend
        assert any(np.allclose(line.get_ydata(), rows["shortest_tokens"].iloc[0]) for line in image.get_lines())
        assert [t.get_text() for t in text.get_xticklabels() if t.get_text()] == ["cpu-s / cpu-m\n300k", "cpu-l\n900k"]
        assert text.get_xlabel().startswith("text parameters")
        # the two models of one size stand side by side around their shared tick, not on top of each other
        shared = [x for line in text.get_lines() if line.get_marker() == "o" for x in line.get_xdata() if x < 6e5]
        assert len(shared) == 2 and min(shared) < 3e5 < max(shared)


def test_the_report_says_how_each_interval_was_made(tmp_path):
    from analysis.report import write_report

    result = analyze(synthetic.make_table(MODELS, seeds=3, stages=("pretrain",), text_strategies=()), n_boot=20)
    assert set(result.min_tokens["ci_method"]) == {"seeds-pooled"}
    text = write_report(result, tmp_path, {}).read_text()
    assert "`seeds-pooled` with 2 to 7 seeds" in text and "`residuals` at one seed" in text


def test_a_sweep_where_every_run_failed_says_so():
    from analysis.errors import AnalysisInputError

    table = synthetic.make_table(MODELS, seeds=1, stages=("pretrain",), text_strategies=())
    table["run_id"], table["sweep"], table["status"], table["error"] = table.index.astype(str), "s", "failed", "NaN"
    with pytest.raises(AnalysisInputError, match=f"no completed run among {len(table)} "):
        analyze(table, n_boot=0)


def test_the_report_lists_the_cells_on_the_compute_pareto_front(tmp_path):
    from analysis.figures import pareto_cells, with_compute
    from analysis.report import write_report

    result = analyze(synthetic.make_table(MODELS, seeds=2, stages=("pretrain",)), n_boot=0)
    cells, front = with_compute(result.cells), pareto_cells(result.cells)
    assert 1 < len(front) < len(cells)
    for index, cell in cells.iterrows():  # on the front exactly when no cell is cheaper (or as cheap) and better
        beaten = ((cells["train_flops"] <= cell["train_flops"]) & (cells["metric_mean"] > cell["metric_mean"])).any()
        assert beaten != (index in front.index)
    text = write_report(result, tmp_path, {}).read_text()
    listed = text.split("on the Pareto front")[1].split("\n\n")[1].splitlines()[2:]  # table rows, after the header
    assert [row.split(" | ")[0].strip("| ") for row in listed] == list(front["model"])
    assert listed[-1].split(" | ")[1] == "full"  # the largest full-length run costs most and scores best here


def test_a_stage_row_carries_the_compute_of_the_stages_up_to_it(tmp_path):
    from analysis.load import parse_result_record

    record = {"run_id": "r", "status": "completed", "model": "cpu-s", "image_strategy": "random",
              "image_tokens": 17, "text_strategy": "none", "text_tokens": 16, "seed": 0,
              "metrics": {stage: {"zeroshot_top1": 10.0} for stage in ("pretrain", "pretrain_full_length",
                                                                        "finetune")},
              "compute": {"samples_seen": 3000, "train_flops": 7e12, "train_seconds": 9.0, "wall_seconds": 12.0,
                          "stages": {"pretrain": {"flops_per_step": 1e11, "steps": 50, "samples": 2500,
                                                  "train_seconds": 6.0},
                                     "finetune": {"flops_per_step": 4e11, "steps": 5, "samples": 500,
                                                  "train_seconds": 3.0}}}}
    rows = {row["stage"]: row for row in parse_result_record(record)}
    assert rows["pretrain"]["train_flops"] == rows["pretrain_full_length"]["train_flops"] == 5e12
    assert rows["pretrain"]["samples_seen"] == 2500 and rows["pretrain"]["train_seconds"] == 6.0
    assert (rows["finetune"]["train_flops"], rows["finetune"]["samples_seen"]) == (7e12, 3000)
    assert rows["pretrain"]["wall_seconds"] == 12.0  # the run's: its stages' wall times are not recorded apart
    del record["compute"]["stages"]  # an older record, or another tool's: the run's totals stand
    assert parse_result_record(record)[0]["train_flops"] == 7e12


def test_a_trials_run_is_analysed_only_where_a_launch_of_the_study_asked_for_it(tmp_path):
    root = results(tmp_path / "r", "study", CONFIG)
    baseline = next(p for p in (root / "study").glob("*/result.json") if "none65" in p.parent.name)
    record = json.loads(baseline.read_text())
    baseline.write_text(json.dumps({**record, "trial": {"study": "cpu-s.abc", "number": 3}}))
    assert record["run_id"] not in set(load_results(root)["run_id"])  # tuning, not the study
    (root / "study" / "manifest.json").write_text(json.dumps(
        {"runs": {baseline.parent.name: {"launched": True, "trials": ["cpu-s#3"]}}, "launches": []}))
    assert record["run_id"] in set(load_results(root)["run_id"])  # `launch --from-tune` asked for that run
