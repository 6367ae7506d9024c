"""benchmarks/decode_speed.py, on the CPU: a GPU session runs it with `--device cuda` in its few minutes, so every
path but CUDA's runs here."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.data_speed import make_jpegs  # noqa: E402
from benchmarks.decode_speed import main, stream_safety  # noqa: E402


def test_the_decode_benchmark_times_both_sides_of_both_ways_and_the_loader_each_way(capsys):
    assert main(["--device", "cpu", "--sizes", "32", "--batch", "16", "--workers", "1", "--seconds", "0.05",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["part"], r.get("mode")) for r in rows] == [
        ("worker", None), ("trainer", None), ("loader", "workers"), ("loader", "device"), ("loader", "handover")]
    worker, trainer, *loaders = rows
    assert worker["workers_per_s"] > 0 and worker["ratio"] == worker["device_per_s"] / worker["workers_per_s"]
    assert trainer["decode_crops_per_s"] > 0 and trainer["decode_alone_per_s"] > 0
    for row in loaders:
        assert row["samples_per_s"] > 0 and row["trainer_cpu_us_per_sample"] > 0 and row["workers"] == 1


def test_the_stream_safety_check_runs_its_rounds_and_counts_nothing_wrong_where_nothing_is_queued(monkeypatch):
    # on the CPU every sum has run before the decode, so nothing can be overwritten: this runs the check's code,
    # which a GPU session would otherwise run first (the hazard itself needs CUDA's queued kernels)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None)
    row = stream_safety(make_jpegs()[:4], 6, torch.device("cpu"), rounds=2)
    assert row == {"part": "stream safety", "batch": 6, "rounds": 2, "corrupted_decode_crops": 0,
                   "corrupted_decode_jpeg": 0}
