"""benchmarks/gpu_speed.py, on the CPU: a GPU session has minutes for it, so its every path but CUDA's runs here."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_speed import checks, main, timed_steps  # noqa: E402
from sweep.config import load_run_config  # noqa: E402


def test_the_gpu_benchmark_measures_every_strategy_against_full_length_and_checks_the_targets(capsys):
    assert main(["--device", "cpu", "--models", "cpu-s", "--batch", "32", "--steps", "1", "--tokens", "17",
                 "--seconds", "60", "--compile", "off", "--open-clip-batch", "16", "--workers", "0", "--json",
                 "--profile"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # open_clip_train on the same model beside ours, at the comparison's batch
    comparison, = [r for r in rows if "ours_over_open_clip" in r]
    assert comparison["batch"] == 16 and comparison["open_clip_samples_per_second"] > 0
    assert comparison["ours_over_open_clip"] == pytest.approx(  # of rates rounded to 0.1 samples/s in the row
        comparison["ours_samples_per_second"] / comparison["open_clip_samples_per_second"], abs=2e-3)
    # where a step's time goes: full length and the shortest at the batch, full length at the comparison's
    profiles = [r for r in rows if "profiled" in r]
    assert [(p["profiled"], p["batch"]) for p in profiles] == [("none 65", 32), ("random 17", 32), ("none 65", 16)]
    assert all(p["ms_per_step"] > 0 for p in profiles)
    for p in profiles:  # the step's named ranges, and the towers' forward rates
        assert set(p["phase_ms"]) == {"vision forward", "text forward", "backward", "optimizer"}
        assert all(ms > 0 for ms in p["phase_ms"].values()) and all(t > 0 for t in p["forward_tflops"].values())
    assert profiles[0]["phase_ms"]["vision forward"] > profiles[1]["phase_ms"]["vision forward"]  # 65 vs 17 tokens
    rows = [r for r in rows if "strategy" in r]
    assert [(r["strategy"], r["image_tokens"]) for r in rows] == [
        ("none", 65), ("random", 17), ("grid", 17), ("block", 17), ("resize", 17)]
    full = rows[0]
    assert full["speedup"] == full["ideal_speedup"] == 1.0
    for r in rows:
        assert r["samples_per_second"] > 0 and r["micro"] == 32 and r["batch"] == 32 and r["steps"] == 1
        assert r["ideal_speedup"] >= 1 and r["efficiency"] == round(r["speedup"] / r["ideal_speedup"], 3)
    # the targets apply to paper sizes: a ViT-B-16 row below 0.85 at 17 tokens fails, one above passes
    paper = [{**r, "model": "ViT-B-16"} for r in rows]
    paper[1]["efficiency"], paper[2]["efficiency"] = 0.5, 0.9
    found = checks(paper, [{"model": "ViT-B-16", "batch": 32, "ours_over_open_clip": 1.4}])
    assert [ok for ok, _ in found] == [True, False]
    assert checks(rows, []) == []  # nothing to check for a CPU size


def test_a_time_budget_times_fewer_long_steps_but_never_fewer_than_two():
    assert timed_steps(8, None, 5.0) == 8  # no budget: --steps
    assert timed_steps(8, 6.0, 0.3) == 8  # short steps: all of them
    assert timed_steps(8, 6.0, 1.8) == 4  # ViT-B-16 accumulating 4 passes at batch 4096
    assert timed_steps(8, 6.0, 14.0) == 2
    assert timed_steps(1, 6.0, 14.0) == 1  # never more than asked


def test_the_gpu_check_recipe_is_a_valid_run_of_vit_b16_at_17_tokens():
    cfg = load_run_config("grids/gpu_check.yaml")
    assert (cfg.model, cfg.image_strategy, cfg.image_tokens, cfg.batch_size) == ("ViT-B-16", "random", 17, 1024)
    assert cfg.pretrain_samples // cfg.batch_size == 48 and cfg.device == "auto"
