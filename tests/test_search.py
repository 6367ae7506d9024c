"""`sweep search`: the decision (bisection over a curve's lengths, seeds where a drop is within noise), its coverage
on synthetic curves with known crossings, the search section, and a small local search end to end."""
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from analysis.fit import crossing_tokens, drop_curve
from analysis.minima import measured_min_tokens
from analysis.synthetic import true_curve
from sweep.cli import main
from sweep.config import ConfigError
from sweep.grid import load_grid
from sweep.search import Curve, SearchSpec, judge

LENGTHS = [5, 10, 17, 26, 37, 50]
FULL = 65


def curve(lengths=LENGTHS, seeds=(0,)) -> Curve:
    return Curve("m", "image", "random", FULL, list(lengths), list(seeds), base=None, baseline=None)


def search(drop_of, spec: SearchSpec, sigma: float, rng, lengths=LENGTHS) -> tuple:
    """Run the decision loop on a curve whose run at length t measures 50 - drop_of(t) + noise; returns the last
    verdict and the runs it took (baseline included)."""
    c, values, runs = curve(lengths), {}, 0
    for _ in range(100):
        verdict = judge(c, values, spec, sigma)
        if not verdict.train:
            return verdict, runs
        for length, seeds in verdict.train:
            cell = values.setdefault(length, [])
            while len(cell) < seeds:
                cell.append(50.0 - (0.0 if length == FULL else drop_of(length)) + rng.normal(0, sigma))
                runs += 1
    raise AssertionError("the search did not end")


def test_the_bracket_holds_the_true_minimum_in_95_percent_of_synthetic_curves():
    """Curves of the analysis' generator (sizes, strategies, both stages) at the analysis' tolerance of 1 pp, with
    the generator's seed noise and twice it, at the default confidence; the true minimum is the generating curve's
    crossing, and the bracket (lower, upper] must hold it."""
    rng = np.random.default_rng(0)
    for sigma in (0.3, 0.6):
        spec = SearchSpec(max_drop=1.0, max_seeds=3, noise=sigma)
        hits, runs = 0, []
        for _ in range(200):
            params = 10 ** rng.uniform(5.5, 8.5)
            a, b = true_curve(params, "image", rng.choice(["random", "grid", "block", "resize"]),
                              rng.choice(["pretrain", "finetune"]))
            truth = float(crossing_tokens(FULL, a, b, 1.0))
            verdict, n = search(lambda t: float(drop_curve(np.float64(t), FULL, a, b)), spec, sigma, rng)
            hits += verdict.lower < truth <= verdict.upper
            runs.append(n)
        assert hits / 200 >= 0.95, (sigma, hits / 200)
        assert np.mean(runs) < 0.75 * (len(LENGTHS) + 1) * spec.max_seeds  # the grid at max_seeds seeds costs more


@given(st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=8, unique=True).map(sorted),
       st.floats(0.5, 10))
@settings(max_examples=200, deadline=None)
def test_without_noise_the_search_finds_the_grids_measured_minimum_by_bisection(drops_descending, max_drop):
    """For any monotone curve (drops shrinking with length) measured without noise, the search's measured
    minimum is the analysis' measured minimum of the full grid, with about log2 of the grid's runs."""
    assume(all(abs(d - max_drop) > 1e-3 for d in drops_descending))  # exactly at the tolerance is a tie forever
    drops = drops_descending[::-1]  # the shortest length drops most
    lengths = [5 + 7 * i for i in range(len(drops))]
    table = dict(zip(lengths, drops))
    spec = SearchSpec(max_drop=max_drop, max_seeds=1, noise=1e-6)
    verdict, runs = search(lambda t: table[t], spec, 1e-9, np.random.default_rng(0), lengths)
    assert verdict.measured == measured_min_tokens(np.array(lengths), np.array(drops), FULL, max_drop)
    assert verdict.resolved
    assert runs <= 1 + math.ceil(math.log2(len(lengths) + 1)) + 1  # the baseline, bisection, one guess to spare


def test_a_length_within_noise_of_the_tolerance_gets_more_seeds_up_to_max_seeds():
    spec = SearchSpec(max_drop=5.0, max_seeds=3, noise=2.0)
    c = curve([5, 17, 37])
    verdict = judge(c, {FULL: [30.0], 17: [25.5]}, spec, 2.0)  # drop 4.5: well within noise of 5
    assert (17, 2) in verdict.train and (FULL, 2) in verdict.train and not verdict.resolved
    verdict = judge(c, {FULL: [30.0, 30.1, 29.9], 17: [25.5, 25.4, 25.6], 5: [10.0]}, spec, 2.0)
    assert verdict.train == [(37, 1)]  # 17 stays within noise at 3 seeds: is 37 surely tolerated?
    verdict = judge(c, {FULL: [30.0, 30.1, 29.9], 17: [25.5, 25.4, 25.6], 5: [10.0], 37: [30.0]}, spec, 2.0)
    assert not verdict.train and not verdict.resolved and "17 within noise" in verdict.why
    assert (verdict.lower, verdict.upper, verdict.measured) == (5, 37, 17)  # 17 is the measured minimum, unsure
    sure = judge(c, {FULL: [30.0], 17: [29.0], 5: [10.0]}, spec, 0.1)
    assert not sure.train and sure.resolved and (sure.lower, sure.upper, sure.measured) == (5, 17, 17)


# ------------------------------------------------------------------------------------------------ the section

TINY = {
    "sweep": "tiny_search",
    "settings": {"model": "cpu-s", "pretrain_samples": 256, "finetune_samples": 64, "batch_size": 32,
                 "eval_zeroshot_samples": 200, "eval_retrieval_samples": 40, "train_scenes": 500},
    "axes": {"image_strategy": ["random"], "image_tokens": [50, 37, 26, 17, 10, 5]},
    "analysis": {"max_drop": 3.0},  # the search judges at the analysis' tolerance
    "search": {"max_seeds": 1, "noise": 1.0},
}


def write(tmp_path: Path, grid: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


@pytest.mark.parametrize("section, raw, field", [
    ("search", {"max_drop": 0}, "search.max_drop"),
    ("search", {"confidence": 1.0}, "search.confidence"),
    ("search", {"stage": "warmup"}, "search.stage"),
    ("search", {"max_seeds": 0}, "search.max_seeds"),
    ("search", {"budget": 0}, "search.budget"),
    ("search", {"tolerance": 1}, "search.tolerance"),
    ("analysis", {"metric": "imagenet_top1"}, "analysis.metric"),  # no eval set named imagenet
    ("analysis", {"stage": "pretrain_full_length"}, "analysis.stage"),  # needs eval_full_length
    ("analysis", {"max_drop": -1}, "analysis.max_drop"),
    ("analysis", {"tolerance": 5}, "analysis.tolerance"),
])
def test_a_bad_search_or_analysis_section_is_one_line_naming_its_field(tmp_path, capsys, section, raw, field):
    path = write(tmp_path, {**TINY, section: raw})
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert err.value.field == field, str(err.value)
    assert main([section if section == "search" else "launch", str(path), "--results", str(tmp_path / "results")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_fewer_max_seeds_than_the_grid_has_is_refused(tmp_path):
    grid = {**TINY, "axes": {**TINY["axes"], "seed": [0, 1]}}
    with pytest.raises(ConfigError, match="fewer than the grid's 2 seeds"):
        load_grid(write(tmp_path, grid))


def test_a_search_on_a_grid_without_reduced_runs_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no reduced-length runs") as err:
        load_grid(write(tmp_path, {**TINY, "axes": {"seed": [0, 1]}}))
    assert err.value.field == "search"


def test_the_report_counts_extra_seeds_apart_from_the_grids_runs(tmp_path):
    from sweep.grid import run_id
    from sweep.search import plan, report

    grid = load_grid(write(tmp_path, {**TINY, "search": {"max_seeds": 3, "noise": 1.0}}))
    found = plan(grid, tmp_path / "results")
    (c,) = found.curves
    extra = {run_id(c.config(17, 1)), run_id(c.config(17, 2))}  # two more seeds at a length near the tolerance
    found.ended[c.label] = {r.run_id for r in grid.runs} | extra
    totals = report(grid, tmp_path / "results", found).splitlines()[-1]
    assert totals.startswith("runs: 7 trained of the grid's 7 (100%) and 2 more with seeds the grid lacks,"), totals


def test_curves_that_differ_in_another_setting_are_searched_apart(tmp_path):
    from sweep.search import plan

    grid = load_grid(write(tmp_path, {**TINY, "axes": {**TINY["axes"], "lr": [1.0e-3, 4.0e-3]}}))
    found = plan(grid, tmp_path / "results")
    labels = sorted(c.label for c in found.curves)
    assert labels == ["cpu-s image random lr=0.001", "cpu-s image random lr=0.004"]
    assert sorted(found.verdicts) == labels and sorted(found.ended) == labels
    assert len({r.config.lr for r in found.runs}) == 2  # each curve starts its own search
    # each curve's baseline counts towards the seed noise once: 4 degrees of freedom from these two pairs of seeds
    from sweep.search import curves_of, pooled_noise

    first, second = curves_of(grid.runs)
    values = {first.label: {65: [50.0, 52.0], 17: [1.0, 2.0]}, second.label: {65: [40.0, 46.0], 17: [1.0, 2.0]}}
    assert pooled_noise([first, second], values, prior=1.0) == pytest.approx(math.sqrt((2 + 0.5 + 18 + 0.5) / 4))


def test_a_grid_length_at_the_full_length_is_refused_for_a_search(tmp_path):
    with pytest.raises(ConfigError, match="image_tokens 65 is cpu-s's full length"):
        load_grid(write(tmp_path, {**TINY, "axes": {**TINY["axes"], "image_tokens": [65, 37, 17]}}))


def test_an_unreadable_completed_record_ends_its_run_without_a_value(tmp_path):
    from sweep.search import plan

    grid = load_grid(write(tmp_path, TINY))
    baseline = next(r for r in plan(grid, tmp_path / "results").runs if r.baseline)
    (tmp_path / "results" / grid.sweep / baseline.run_id).mkdir(parents=True)
    (tmp_path / "results" / grid.sweep / baseline.run_id / "result.json").write_text(
        '{"status": "completed", "metrics": {"finetune": {"zeroshot_top1": NaN}}}')  # NaN: refused by the parser
    found = plan(grid, tmp_path / "results")
    assert "unreadable result.json" in found.failed[baseline.run_id]


def test_a_failed_run_stops_its_curve_and_rerun_failed_trains_it_once_more(tmp_path, capsys):
    from sweep.search import plan

    path = write(tmp_path, TINY)
    grid, results = load_grid(path), tmp_path / "results"
    first = plan(grid, results).runs  # the baseline and the middle length
    for run in first:
        (results / grid.sweep / run.run_id).mkdir(parents=True)
        (results / grid.sweep / run.run_id / "result.json").write_text(
            '{"status": "failed", "error": "loss became nan at pretrain step 3"}')
    found = plan(grid, results)
    assert not found.runs and set(found.failed) == {r.run_id for r in first}
    assert "loss became nan" in found.verdicts["cpu-s image random"].why
    assert {r.run_id for r in plan(grid, results, retry=set(found.failed)).runs} == {r.run_id for r in first}

    command = ["search", str(path), "--results", str(results), "--executor", "local", "--quiet"]
    assert main(command) == 1  # nothing left to train, but the curve is not resolved
    captured = capsys.readouterr()
    assert "2 needed runs ended without zeroshot_top1" in captured.err and "--rerun-failed" in captured.err
    assert "loss became nan" in captured.out  # the report's state
    assert main([*command, "--rerun-failed", "--dry-run"]) == 0
    assert "round 1: 2 runs" in capsys.readouterr().out


def test_rerun_failed_trains_the_failed_runs_even_when_they_spent_the_budget(tmp_path):
    from sweep.search import plan

    grid, results = load_grid(write(tmp_path, {**TINY, "search": {**TINY["search"], "budget": 2}})), tmp_path / "r"
    first = plan(grid, results).runs
    assert len(first) == 2
    for run in first:
        (results / grid.sweep / run.run_id).mkdir(parents=True)
        (results / grid.sweep / run.run_id / "result.json").write_text('{"status": "failed", "error": "nan"}')
    found = plan(grid, results)
    assert found.spent == 2 and not found.runs
    # charged once, when they first ended: trained again although no new run has room
    assert {r.run_id for r in plan(grid, results, retry=set(found.failed)).runs} == {r.run_id for r in first}


def test_seeds_added_to_the_grid_are_trained_at_every_length_measured_before_it_is_resolved():
    spec = SearchSpec(max_drop=5.0, max_seeds=2, noise=0.1)
    one = judge(curve([5, 17, 37]), {FULL: [30.0], 17: [29.0], 5: [10.0]}, spec, 0.1)
    assert one.resolved and not one.train
    two = judge(curve([5, 17, 37], seeds=(0, 1)), {FULL: [30.0], 17: [29.0], 5: [10.0]}, spec, 0.1)
    assert not two.resolved and {(FULL, 2), (17, 2), (5, 2)} <= set(two.train)


@pytest.mark.parametrize("section", [{}, None])
def test_the_search_stage_defaults_to_the_analysis_default_and_a_bare_section_is_every_default(tmp_path, section):
    raw = {k: v for k, v in TINY.items() if k != "analysis"}
    raw = {**raw, "settings": {**raw["settings"], "finetune_samples": 0}, "search": section}
    assert load_grid(write(tmp_path, raw)).search.stage == "pretrain"  # no fine-tune: what the analysis reads


def test_a_baseline_the_grid_leaves_out_is_not_called_an_extra_seed(tmp_path):
    from sweep.grid import run_id
    from sweep.search import plan, report

    grid = load_grid(write(tmp_path, {**TINY, "baselines": False}))
    found = plan(grid, tmp_path / "results")
    (c,) = found.curves
    found.ended[c.label] = {run_id(c.config(c.full, 0)), run_id(c.config(17, 0))}
    totals = report(grid, tmp_path / "results", found).splitlines()[-1]
    assert "1 trained of the grid's 6 (17%) and 1 more full-length baselines the grid leaves out," in totals


def test_more_seeds_of_a_baseline_the_grid_has_are_extra_seeds(tmp_path):
    from sweep.grid import run_id
    from sweep.search import plan, report

    grid = load_grid(write(tmp_path, {**TINY, "search": {"max_seeds": 2, "noise": 1.0}}))
    found = plan(grid, tmp_path / "results")
    (c,) = found.curves
    found.ended[c.label] = {run_id(c.config(c.full, 0)), run_id(c.config(c.full, 1)), run_id(c.config(17, 0))}
    totals = report(grid, tmp_path / "results", found).splitlines()[-1]
    assert "2 trained of the grid's 7 (29%) and 1 more with seeds the grid lacks," in totals


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_a_local_search_trains_part_of_the_grid_and_launch_completes_it_without_retraining(tmp_path, capsys):
    path = write(tmp_path, TINY)
    results = tmp_path / "results"
    assert main(["search", str(path), "--results", str(results), "--executor", "local", "--max-parallel", "2",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "round 1: 2 runs" in out  # the baseline and the middle length, together
    grid = load_grid(path)
    folder = results / grid.sweep
    trained = {p.parent.name for p in folder.glob("*/result.json")}
    assert trained < {r.run_id for r in grid.runs}  # ordinary runs of the grid, and not all of them
    line = next(line for line in out.splitlines() if line.startswith("cpu-s image random"))
    measured = float(line.split()[5])
    from analysis.pipeline import analyze
    from analysis.load import load_results

    searched = analyze(load_results(folder), stage="finetune", max_drop=3.0, n_boot=50).min_tokens
    assert searched["min_tokens_measured"].iloc[0] == measured  # the analysis reads the searched directory
    assert re.search(rf"runs: {len(trained)} trained of the grid's 7", out)
    mtimes = {rid: (folder / rid / "result.json").stat().st_mtime for rid in trained}
    assert main(["search", str(path), "--results", str(results), "--executor", "local", "--quiet"]) == 0
    assert "round" not in capsys.readouterr().out  # a relaunch of a finished search trains nothing
    assert main(["launch", str(path), "--results", str(results), "--executor", "local", "--quiet"]) == 0
    assert f"{len(trained)} completed and 0 failed already" in capsys.readouterr().out
    assert all((folder / rid / "result.json").stat().st_mtime == t for rid, t in mtimes.items())
    assert len(list(folder.glob("*/result.json"))) == 7
    # analyze reads the sweep as the grid's analysis: section says, from the manifest launch wrote
    assert main(["analyze", str(folder), "--no-figures", "--bootstrap", "50", "--no-progress"]) == 0
    assert "metric zeroshot_top1, stage finetune, max_drop 3 pp" in capsys.readouterr().out
    table = pd.read_csv(folder / "analysis" / "min_tokens.csv")
    assert (table["max_drop"] == 3.0).all() and (table["stage"] == "finetune").all()
    resolved = int(table["resolved"].sum())
    assert f"**Resolved: {resolved} of 1 curves**" in (folder / "analysis" / "report.md").read_text()


def test_the_search_takes_the_analysis_sections_reading_unless_it_sets_its_own(tmp_path):
    grid = load_grid(write(tmp_path, {**TINY, "analysis": {"metric": "i2t_r1", "max_drop": 4.0}}))
    assert (grid.search.metric, grid.search.max_drop, grid.search.stage) == ("i2t_r1", 4.0, "finetune")
    own = load_grid(write(tmp_path, {**TINY, "search": {"max_drop": 2.0}}))
    assert own.search.max_drop == 2.0 and own.analysis.max_drop == 3.0
