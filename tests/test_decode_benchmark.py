"""benchmarks/decode_speed.py, on the CPU: a GPU session runs it with `--device cuda` in its few minutes, so every
path but CUDA's runs here."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_speed import main  # noqa: E402


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
