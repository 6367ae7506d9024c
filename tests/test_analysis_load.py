"""Loading result.json directories and flat tables into the tidy table."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import AnalysisInputError, AnalysisWarning, load_results
from analysis.load import REQUIRED_TABLE_COLUMNS


def record(run_id: str, **overrides) -> dict:
    base = {
        "run_id": run_id, "sweep": "image", "status": "completed", "error": None,
        "model": "cpu-s", "params": 1_200_000, "image_strategy": "random", "image_tokens": 37,
        "text_strategy": "none", "text_tokens": 32, "seed": 0,
        "metrics": {
            "pretrain": {"zeroshot_top1": 40.0, "zeroshot_top5": 70.0, "i2t_r1": 20.0, "t2i_r1": 21.0,
                         "zeroshot_classes": 10},
            "finetune": {"zeroshot_top1": 43.0, "zeroshot_top5": 72.0, "i2t_r1": 22.0, "t2i_r1": 23.0,
                         "zeroshot_classes": 10},
        },
        "compute": {"samples_seen": 1000, "train_flops": 1e12, "wall_seconds": 5.0, "samples_per_second": 200.0},
        "config": {"lr": 1e-3}, "versions": {"torch": "x"},
    }
    base.update(overrides)
    return base


def write(root: Path, rel: str, content: str | dict) -> Path:
    path = root / rel / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_result_dir_is_read_recursively_one_row_per_run_and_stage(tmp_path):
    write(tmp_path, "image/a", record("a"))
    write(tmp_path, "deep/er/still/b", record("b", seed=1))
    df = load_results(tmp_path)
    assert len(df) == 4
    assert set(df["stage"]) == {"pretrain", "finetune"}
    assert set(df["run_id"]) == {"a", "b"}
    row = df[(df.run_id == "a") & (df.stage == "finetune")].iloc[0]
    assert row.zeroshot_top1 == 43.0 and row.i2t_r1 == 22.0 and row.zeroshot_classes == 10
    assert row.train_flops == 1e12 and row.samples_seen == 1000 and row.wall_seconds == 5.0
    for column in (*REQUIRED_TABLE_COLUMNS, "run_id", "sweep", "status", "error"):
        assert column in df.columns


@pytest.mark.parametrize("finetune", [None, {}, "absent"])
def test_missing_finetune_gives_only_pretrain_row(tmp_path, finetune):
    rec = record("a")
    if finetune == "absent":
        del rec["metrics"]["finetune"]
    else:
        rec["metrics"]["finetune"] = finetune
    write(tmp_path, "s/a", rec)
    df = load_results(tmp_path)
    assert list(df["stage"]) == ["pretrain"]


def test_corrupt_empty_and_half_written_files_are_skipped_with_a_warning_naming_each(tmp_path):
    write(tmp_path, "s/good", record("good"))
    empty = write(tmp_path, "s/empty", "")
    half = write(tmp_path, "s/half", json.dumps(record("half"))[:57])
    garbage = write(tmp_path, "s/garbage", "\x00\x01not json")
    not_object = write(tmp_path, "s/list", "[1, 2]")
    no_model = write(tmp_path, "s/nomodel", {k: v for k, v in record("x").items() if k != "model"})
    bad_tokens = write(tmp_path, "s/badtokens", record("y", image_tokens="many"))
    (tmp_path / "s" / "tmp").mkdir()
    (tmp_path / "s" / "tmp" / "result.json.tmp").write_text("{")  # an in-flight atomic write: not a result
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_results(tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)]
    assert set(df["run_id"]) == {"good"}
    for bad in (empty, half, garbage, not_object, no_model, bad_tokens):
        assert sum(str(bad) in m for m in messages) == 1, (bad, messages)
    assert len(df.attrs["skipped"]) == 6


def test_directory_with_only_unreadable_files_is_an_input_error(tmp_path):
    write(tmp_path, "s/a", "{")
    with pytest.warns(AnalysisWarning):
        with pytest.raises(AnalysisInputError, match="could be read"):
            load_results(tmp_path)


def test_failed_runs_are_kept_with_status_and_error(tmp_path):
    write(tmp_path, "s/ok", record("ok"))
    write(tmp_path, "s/bad", record("bad", status="failed", error="CUDA out of memory", metrics=None))
    df = load_results(tmp_path)
    failed = df[df.run_id == "bad"]
    assert len(failed) == 1
    assert failed.iloc[0].status == "failed" and failed.iloc[0].error == "CUDA out of memory"
    assert np.isnan(failed.iloc[0].zeroshot_top1)


def test_stage_settings_recorded_with_the_metrics_do_not_replace_the_run_settings(tmp_path):
    """The trainer writes each stage's own settings next to its metrics (a fine-tune runs at full length)."""
    rec = record("a")
    rec["metrics"]["finetune"].update(image_strategy="none", image_tokens=65, text_strategy="none", text_tokens=32)
    rec["metrics"]["pretrain"].update(image_strategy="random", image_tokens=37, text_strategy="none", text_tokens=32)
    rec["compute"].update(stages={"pretrain": {"steps": 10}}, train_seconds=4.0, threads=2)
    write(tmp_path, "s/a", rec)
    df = load_results(tmp_path)
    assert (df["image_tokens"] == 37).all() and (df["image_strategy"] == "random").all()
    assert df.set_index("stage").loc["finetune", "zeroshot_top1"] == 43.0
    assert (df["train_seconds"] == 4.0).all()


def test_settings_fall_back_to_the_resolved_config(tmp_path):
    rec = record("a")
    for key in ("model", "image_strategy", "image_tokens"):
        rec["config"][key] = rec.pop(key)
    write(tmp_path, "s/a", rec)
    df = load_results(tmp_path)
    assert df.iloc[0].model == "cpu-s" and df.iloc[0].image_tokens == 37


def flat_table() -> pd.DataFrame:
    return pd.DataFrame({
        "model": ["cpu-s", "cpu-s"], "params": [1e6, 1e6], "image_strategy": ["none", "random"],
        "image_tokens": [65, 37], "text_strategy": ["none", "none"], "text_tokens": [32, 32], "seed": [0, 0],
        "stage": ["pretrain", "pretrain"], "zeroshot_top1": [50.0, 48.0],
    })


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_flat_table_loads_with_ids_and_defaults(tmp_path, suffix):
    path = tmp_path / f"paper{suffix}"
    table = flat_table()
    table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
    df = load_results(path)
    assert len(df) == 2
    assert df["run_id"].is_unique and (df["status"] == "completed").all() and (df["sweep"] == "paper").all()
    assert list(df["zeroshot_top1"]) == [50.0, 48.0]


def test_blank_strategy_in_a_table_means_full_sequence(tmp_path):
    table = flat_table()
    table.loc[0, "image_strategy"] = None
    table.to_csv(tmp_path / "t.csv", index=False)
    assert load_results(tmp_path / "t.csv").iloc[0].image_strategy == "none"


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda t: t.drop(columns="zeroshot_top1"), "zeroshot_top1"),
        (lambda t: t.drop(columns="stage"), "stage"),
        (lambda t: t.assign(image_tokens=["65", "lots"]), "image_tokens"),
        (lambda t: t.assign(params=["1M", "1M"]), "params"),
        (lambda t: t.iloc[:0], None),
    ],
)
def test_bad_table_is_an_input_error_naming_file_and_field(tmp_path, change, field):
    path = tmp_path / "bad.csv"
    change(flat_table()).to_csv(path, index=False)
    with pytest.raises(AnalysisInputError) as info:
        load_results(path)
    assert "bad.csv" in str(info.value)
    if field:
        assert field in str(info.value) and info.value.field == field


def test_missing_path_and_unknown_file_type_are_input_errors(tmp_path):
    with pytest.raises(AnalysisInputError, match="no such file"):
        load_results(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AnalysisInputError, match="expected a results directory"):
        load_results(tmp_path / "notes.txt")


def test_progress_bar_only_for_many_files_and_never_when_switched_off(tmp_path):
    from tqdm import tqdm

    from analysis.load import _progress

    many = [tmp_path / f"{i}.json" for i in range(100)]
    assert isinstance(_progress(many, True), tqdm)
    assert _progress(many, False) is many
    assert _progress(many[:3], True) == many[:3]
