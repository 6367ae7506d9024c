"""`sweep analyze` end to end: outputs, warnings, figures, bad input, `python -m analysis`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import synthetic
from analysis.cli import register
from analysis.pipeline import FIGURE_NAMES

REPO = Path(__file__).resolve().parents[1]
MODELS = {"cpu-s": 1.2e6, "cpu-m": 4.8e6, "cpu-l": 19e6}


def sweep(*argv: str) -> tuple[int, str, str]:
    """Run ``sweep analyze ...`` the way the main ``sweep`` command will: through `register`."""
    parser = argparse.ArgumentParser(prog="sweep")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    table = synthetic.make_table(MODELS, seeds=2, noise=0.2)
    synthetic.write_result_files(table, root, sweep="grid")
    bad = root / "grid"
    (bad / "corrupt").mkdir()
    (bad / "corrupt" / "result.json").write_text("{not json at all")
    (bad / "empty").mkdir()
    (bad / "empty" / "result.json").write_text("")
    (bad / "half").mkdir()
    (bad / "half" / "result.json").write_text('{"run_id": "half", "model": "cpu-s", "metrics": {"pretr')
    (bad / "failed").mkdir()
    (bad / "failed" / "result.json").write_text(json.dumps({
        "run_id": "failed-run", "sweep": "grid", "status": "failed", "error": "CUDA out of memory",
        "model": "cpu-l", "params": 19e6, "image_strategy": "random", "image_tokens": 5, "text_strategy": "none",
        "text_tokens": 32, "seed": 9, "metrics": None,
    }))
    return root


@pytest.fixture(scope="module")
def analysed(results_dir) -> tuple[Path, str, str]:
    code, out, err = sweep(str(results_dir), "--bootstrap", "200")
    assert code == 0, err
    return results_dir / "analysis", out, err


def test_default_output_is_beside_the_results_with_tables_figures_and_report(analysed):
    out, stdout, _ = analysed
    for name in ("runs.csv", "drops.csv", "min_tokens.csv", "scaling_law.csv", "scaling_predictions.csv",
                 "report.md"):
        assert (out / name).stat().st_size > 0, name
    for name in FIGURE_NAMES:
        for suffix in (".png", ".pdf"):
            assert (out / "figures" / f"{name}{suffix}").stat().st_size > 10_000, name + suffix
        pdf = (out / "figures" / f"{name}.pdf").read_bytes()
        assert b"/FontFile2" in pdf and b"/Type3" not in pdf, name  # TrueType embedded: venues refuse Type 3
    assert "report.md" in stdout


def test_min_tokens_csv_starts_with_the_agreed_columns(analysed):
    out, _, _ = analysed
    header = (out / "min_tokens.csv").read_text().splitlines()[0].split(",")
    assert header[:11] == ["model", "params", "axis", "strategy", "full_tokens", "full_mean", "min_tokens_measured",
                           "min_tokens_fit", "ci_low", "ci_high", "max_drop"]
    table = pd.read_csv(out / "min_tokens.csv")
    assert set(table["axis"]) == {"image", "text"} and len(table) == 3 * 8
    assert (table["max_drop"] == 1.0).all()
    assert (table["ci_low"] <= table["min_tokens_fit"]).all() and (table["min_tokens_fit"] <= table["ci_high"]).all()


def test_runs_csv_has_one_row_per_run_including_the_failed_one(analysed):
    out, _, _ = analysed
    runs = pd.read_csv(out / "runs.csv")
    assert runs["run_id"].is_unique
    assert len(runs) == 3 * 41 * 2 + 1
    failed = runs[runs["run_id"] == "failed-run"].iloc[0]
    assert failed["status"] == "failed" and failed["error"] == "CUDA out of memory"
    assert not failed["in_analysis"]


def test_corrupt_empty_and_half_written_files_are_named_on_stderr_and_in_the_report(analysed, results_dir):
    out, _, stderr = analysed
    report = (out / "report.md").read_text()
    for name in ("corrupt", "empty", "half"):
        path = str(results_dir / "grid" / name / "result.json")
        assert any(path in line and line.startswith("warning:") for line in stderr.splitlines()), name
        assert path in report
    assert "failed-run" in report and "CUDA out of memory" in report


def test_report_shows_every_figure_and_the_minimum_token_table(analysed):
    out, _, _ = analysed
    report = (out / "report.md").read_text()
    for name in FIGURE_NAMES:
        assert f"](figures/{name}.png)" in report
    assert "## Minimum token length" in report and "## Inverse scaling law" in report
    assert "| cpu-s |" in report


def test_table_input_writes_beside_the_file_and_notes_the_missing_compute_figure(tmp_path):
    table = synthetic.make_table(MODELS, seeds=1, stages=("finetune",)).drop(
        columns=["train_flops", "samples_seen", "wall_seconds"])
    path = tmp_path / "paper.csv"
    table.to_csv(path, index=False)
    code, _, err = sweep(str(path), "--bootstrap", "50", "--max-drop", "2.5", "--metric", "zeroshot_top5")
    assert code == 0, err
    out = tmp_path / "analysis"
    result = pd.read_csv(out / "min_tokens.csv")
    assert (result["max_drop"] == 2.5).all() and (result["stage"] == "finetune").all()
    assert (result["metric"] == "zeroshot_top5").all()
    assert not (out / "figures" / "accuracy_vs_compute.png").exists()
    assert "no `train_flops`" in (out / "report.md").read_text()


def test_model_without_baseline_is_reported_and_the_rest_is_analysed(tmp_path):
    table = synthetic.make_table(MODELS, seeds=1, stages=("pretrain",))
    table = table[~((table.model == "cpu-m") & (table.image_strategy == "none") & (table.text_strategy == "none"))]
    table.to_parquet(tmp_path / "t.parquet")
    code, _, err = sweep(str(tmp_path / "t.parquet"), "--bootstrap", "50", "--no-figures")
    assert code == 0
    assert "warning: model 'cpu-m': no full-length baseline" in err
    result = pd.read_csv(tmp_path / "analysis" / "min_tokens.csv")
    assert (result.loc[result.model == "cpu-m", "fit_status"] == "no_baseline").all()
    assert result.loc[result.model != "cpu-m", "min_tokens_fit"].notna().all()
    assert "cpu-m" in (tmp_path / "analysis" / "report.md").read_text()


@pytest.mark.parametrize(
    "make, argv, needle",
    [
        (lambda d: d / "missing.csv", [], "missing.csv: no such file"),
        (lambda d: _write(d / "t.csv", synthetic.make_table(MODELS, seeds=1)), ["--metric", "accuracy"],
         "'accuracy'"),
        (lambda d: _write(d / "t.csv", synthetic.make_table(MODELS, seeds=1, stages=("pretrain",))),
         ["--stage", "finetune"], "stage 'finetune'"),
        (lambda d: _write(d / "t.csv", synthetic.make_table(MODELS, seeds=1).iloc[:0]), [], "empty table"),
        (lambda d: _write(d / "t.csv", synthetic.make_table(MODELS, seeds=1).drop(columns="text_tokens")), [],
         "'text_tokens'"),
    ],
)
def test_bad_input_is_one_line_on_stderr_exit_2_and_nothing_written(tmp_path, make, argv, needle):
    path = make(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = sweep(str(path), "--out", str(out), *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and path.name in err
    assert not out.exists() and not (tmp_path / "analysis").exists()


def _write(path: Path, table: pd.DataFrame) -> Path:
    table.to_csv(path, index=False)
    return path


def test_python_dash_m_analysis_runs_standalone(tmp_path):
    path = _write(tmp_path / "t.csv", synthetic.make_table(MODELS, seeds=1, stages=("pretrain",)))
    proc = subprocess.run([sys.executable, "-m", "analysis", str(path), "--out", str(tmp_path / "o"),
                           "--no-figures", "--bootstrap", "20"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "min_tokens.csv").exists()
    help_text = subprocess.run([sys.executable, "-m", "analysis", "--help"], cwd=REPO, capture_output=True,
                               text=True).stdout
    assert "--max-drop" in help_text and "--metric" in help_text


def test_figures_have_labels_log_token_axes_error_bars_legends_and_the_tolerance_line():
    import matplotlib.collections

    from analysis.pipeline import analyze, make_figures

    result = analyze(synthetic.make_table(MODELS, seeds=3, stages=("pretrain",)), max_drop=1.5, n_boot=50)
    figures = make_figures(result)
    for name, fig in figures.items():
        assert fig is not None, name
        assert fig.legends or any(ax.get_legend() for ax in fig.axes), name
        for ax in fig.axes:
            if ax.get_visible():  # the panels of a row share their axes' labels, set on its first panel
                assert ax.get_xscale() == "log", (name, ax.get_title())
                assert ax.get_xlabel() and ax.get_ylabel() or not ax.get_subplotspec().is_first_col(), \
                    (name, ax.get_title())
    for name in ("accuracy_vs_tokens", "drop_vs_tokens"):
        panels = [ax for ax in figures[name].axes if ax.get_visible()]
        assert len(panels) == 8
        assert all(any(isinstance(c, matplotlib.collections.LineCollection) for c in ax.collections)
                   for ax in panels)  # error bars over seeds
    for ax in (a for a in figures["drop_vs_tokens"].axes if a.get_visible()):
        assert any(np.allclose(line.get_ydata(), 1.5) for line in ax.get_lines())  # the tolerance line
    scaling = figures["min_tokens_vs_params"].axes[0]
    assert scaling.get_yscale() == "log"


def drawn_tick_labels(axis):
    """The tick labels matplotlib draws: those of ticks inside the view, with text."""
    low, high = sorted(axis.get_view_interval())
    return [t.label1 for t in axis.get_major_ticks() + axis.get_minor_ticks()
            if low <= t.get_loc() <= high and t.label1.get_visible() and t.label1.get_text()]


def test_figures_keep_every_label_inside_the_page_and_apart_from_the_others():
    from analysis.pipeline import analyze, make_figures

    both = synthetic.make_table(MODELS, seeds=2, stages=("pretrain",))
    both["vision_params"] = both["params"] / 8  # the towers' own sizes, as records carry them
    image_only = both[both["text_strategy"] == "none"]  # one panel per figure row: the narrowest figures
    figures = [(f"{name} ({what})", fig) for what, table in (("both axes", both), ("image axis", image_only))
               for name, fig in make_figures(analyze(table, max_drop=1.5, n_boot=50)).items()]
    for name, fig in figures:
        assert_labels_inside_and_apart(name, fig)


def assert_labels_inside_and_apart(name, fig):
    """`fig` fits a paper's text width, every label inside the page, no two tick labels of an axis on top of each
    other, and no legend over a panel, its labels or another legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # places the labels where they are drawn
    renderer = canvas.get_renderer()
    ticks = {id(t): t for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for t in [*(k.label1 for k in axis.get_major_ticks() + axis.get_minor_ticks())]}
    drawn = [t for t in fig.findobj(Text) if id(t) not in ticks and t.get_visible() and t.get_text().strip()]
    drawn += [t for ax in fig.axes if ax.get_visible() for axis in (ax.xaxis, ax.yaxis)
              for t in drawn_tick_labels(axis)]
    assert fig.get_figwidth() <= 7.5, (name, fig.get_figwidth())
    panels = [ax.get_tightbbox(renderer, bbox_extra_artists=[]) for ax in fig.axes if ax.get_visible()]
    legends = [legend.get_window_extent(renderer) for legend in fig.legends + [ax.get_legend() for ax in fig.axes]
               if legend is not None]
    for i, legend in enumerate(legends):
        assert not any(legend.overlaps(other) for other in panels + legends[i + 1:]), name
    page = fig.bbox
    for text in drawn:
        if text.axes is not None and not text.axes.get_visible():
            continue
        box = text.get_window_extent(renderer)
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 \
            and box.y1 <= page.y1 + 1, (name, text.get_text())
    for ax in fig.axes:
        if ax.get_visible():
            for axis in (ax.xaxis, ax.yaxis):
                boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_tick_labels(axis)]
                for i, (a, box_a) in enumerate(boxes):
                    for b, box_b in boxes[i + 1:]:
                        assert not box_a.overlaps(box_b), (name, ax.get_title(), a, b)


def test_close_full_lengths_and_model_sizes_get_labels_apart(tmp_path):
    from analysis.load import load_results
    from analysis.pipeline import analyze, make_figures

    # ViT-L-16 and ViT-H-14 pre-train at 197 and 257 tokens, and are 1.5x apart in vision parameters on an axis that
    # ViT-S-16 stretches
    rows = []
    for model, params, vision, full in (("ViT-S-16", 43e6, 22e6, 197), ("ViT-L-16", 428e6, 303e6, 197),
                                        ("ViT-H-14", 632e6, 450e6, 257)):
        for strategy, tokens in [("none", full), *(("random", t) for t in (101, 65, 50, 17))]:
            for seed in range(2):
                rows.append(dict(model=model, params=params, vision_params=vision, image_strategy=strategy,
                                 image_tokens=tokens, text_strategy="none", text_tokens=32, seed=seed,
                                 stage="pretrain", zeroshot_top1=60 - 150 / tokens + 0.2 * seed))
    pd.DataFrame(rows).to_csv(tmp_path / "paper.csv", index=False)
    figures = make_figures(analyze(load_results(tmp_path / "paper.csv"), max_drop=1.0, n_boot=20))
    for name, fig in figures.items():
        if fig is not None:
            assert_labels_inside_and_apart(name, fig)
