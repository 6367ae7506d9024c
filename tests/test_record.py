"""The result record: one definition that every reader uses, documented field by field, and older records load."""
import json
import re
from pathlib import Path

import pytest

from sweep.record import (Compute, Evaluation, RecordError, ResultRecord, StageCompute, StageMetrics, parse_record,
                          read_record, read_status, write_record)

DATA = Path(__file__).parent / "data"
DOC = Path(__file__).parent.parent / "docs" / "results.md"


def assert_kept(old, new, where="record"):
    """Every field of `old` is in `new` with the same value; `new` adds only nulls (and schema_version)."""
    if isinstance(old, dict):
        for key in old:
            assert key in new, f"{where}.{key} was lost"
            assert_kept(old[key], new[key], f"{where}.{key}")
        added = {k: v for k, v in new.items() if k not in old and k != "schema_version"}
        assert all(v is None for v in added.values()), f"{where} gained {added}"
    else:
        assert old == new and type(old) is type(new), f"{where}: {old!r} became {new!r}"


@pytest.mark.parametrize("name", ["result_before_schema_version_completed.json",
                                  "result_before_schema_version_failed.json"])
def test_records_written_before_schema_version_still_load_and_keep_every_field(name, tmp_path):
    raw = json.loads((DATA / name).read_text())
    record = read_record(DATA / name)
    assert record.schema_version == 1 and record.status == raw["status"] and record.run_id == raw["run_id"]
    assert_kept(raw, record.to_json())
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record


def test_the_old_completed_record_reads_as_rows_of_the_analysis():
    from analysis.load import load_results

    df = load_results(DATA / "result_before_schema_version_completed.json")
    assert list(df["stage"]) == ["pretrain", "finetune"]
    assert (df["image_tokens"] == 17).all() and df["zeroshot_top1"].between(0, 100).all()


def test_every_field_of_the_record_is_documented():
    text = DOC.read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", text))
    for model in (ResultRecord, StageMetrics, Compute, StageCompute, Evaluation):
        missing = set(model.model_fields) - documented
        assert not missing, f"{model.__name__} fields not in docs/results.md: {sorted(missing)}"


def test_readme_links_the_record_document():
    assert "docs/results.md" in (DOC.parent.parent / "README.md").read_text()


@pytest.mark.parametrize("raw,needle", [
    ([1, 2], "JSON object"),
    ({"status": "done"}, "status"),
    ({"image_tokens": "many"}, "image_tokens"),
    ({"image_tokens": -3}, "image_tokens"),
    ({"metrics": {"pretrain": {"zeroshot_top1": "high"}}}, "metrics.pretrain.zeroshot_top1"),
    ({"metrics": {"pretrain": [1]}}, "metrics.pretrain"),
    ({"compute": {"samples_seen": "lots"}}, "compute.samples_seen"),
    ({"resumed": [{"stage": "pretrain"}]}, "resumed.0.step"),
])
def test_malformed_records_say_which_field(raw, needle):
    with pytest.raises(RecordError, match=re.escape(needle)):
        parse_record({"status": "completed", **raw} if isinstance(raw, dict) else raw)


def test_status_is_the_one_field_a_record_must_have():
    with pytest.raises(RecordError, match="'status'"):
        parse_record({"run_id": "x", "model": "cpu-s"})
    assert parse_record({"status": "failed"}).metrics == {}


def test_settings_fall_back_to_config_and_unknown_fields_are_kept():
    record = parse_record({"status": "completed", "config": {"model": "cpu-m", "image_tokens": 26},
                           "vision_params": 12345,
                           "metrics": {"pretrain": {"zeroshot_top1": 3.0, "zeroshot_acc_macro": 2.5},
                                       "finetune": None}})
    assert (record.model, record.image_tokens) == ("cpu-m", 26)
    assert record.to_json()["vision_params"] == 12345
    assert set(record.stage_metrics()) == {"pretrain"}
    assert record.stage_metrics()["pretrain"].values() == {"zeroshot_top1": 3.0, "zeroshot_acc_macro": 2.5}


@pytest.mark.parametrize("content,expected", [
    (None, None),
    ('{"status": "completed", "run_id": "x"}', ("completed", "")),
    ('{"status": "failed", "error": "loss became nan at pretrain step 3"}',
     ("failed", "loss became nan at pretrain step 3")),
    ('{"status": "failed", "error": "Traceback\\n  line 1\\nValueError: x"}',
     ("failed", "Traceback line 1 ValueError: x")),
    ('{"status": "failed"}', ("failed", "failed without a reason")),
    ('{"status": "failed", "error": {"msg": "loss is nan"}}', ("failed", '{"msg": "loss is nan"}')),  # as JSON
])
def test_status_reads_only_what_it_needs(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "result.json").write_text(content)
    assert read_status(tmp_path) == expected


@pytest.mark.parametrize("content", ["", '{"status": "compl', '{"status": "maybe"}', "\x00\x01", "[]", "{}"])
def test_an_unreadable_record_is_a_failed_run_that_says_so(tmp_path, content):
    (tmp_path / "result.json").write_text(content)
    state, reason = read_status(tmp_path)
    assert state == "failed" and reason.startswith("result.json is unreadable")
    with pytest.raises(RecordError):
        read_record(tmp_path)
