"""One run on several processes (CPU, gloo): the same losses and metrics as one process on the whole batch, with or
without gradient accumulation; rank 0 writes alone; a rank killed with SIGKILL costs only the steps since the last
checkpoint; torchrun starts the same run. (slow: they really train)"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from sweep.config import config_from_dict
from sweep.record import read_record, status_of
from sweep.train import run

pytestmark = pytest.mark.slow

# 20 pre-training steps of 32 pairs and 2 of fine-tuning; random masks and random words, so that every random
# draw of a step must be the same however the batch is split
SETTINGS = {**yaml.safe_load(open("grids/run-example.yaml")), "batch_size": 32, "pretrain_samples": 640,
            "finetune_samples": 64, "text_strategy": "random", "text_tokens": 8, "checkpoint_every": 5,
            "log_every": 1, "threads": 1, "eval_zeroshot_samples": 200, "eval_retrieval_samples": 200,
            "train_scenes": 2000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(config, out, world: int) -> list[subprocess.Popen]:
    """`world` processes of `sweep train`, with the variables torchrun would set."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "sweep", "train", str(config), "--quiet", "--out",
                                       str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs, timeout=300) -> list[str]:
    outputs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return outputs


def trajectory(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["losses"]


def write_config(tmp_path, **changes):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**SETTINGS, **changes}))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the whole batch on one process."""
    out = tmp_path_factory.mktemp("one") / "run"
    record = run(config_from_dict(SETTINGS), out, progress=False)
    assert record.status == "completed" and record.compute.world_size == 1
    return record, trajectory(out)


def assert_same_run(record, losses, reference):
    ref_record, ref_losses = reference
    assert record.status == "completed", record.error
    for stage in ("pretrain", "finetune"):
        assert len(losses[stage]) == len(ref_losses[stage])
        assert losses[stage] == pytest.approx(ref_losses[stage], abs=1e-4), stage
        assert record.metrics[stage] == ref_record.metrics[stage], stage
    assert record.compute.samples_seen == ref_record.compute.samples_seen


@pytest.mark.parametrize("micro_batch_size", [0, 8], ids=["2 ranks x 16", "2 ranks x 2 micro-batches x 8"])
def test_two_ranks_train_the_one_process_run(tmp_path, one_process, micro_batch_size):
    out = tmp_path / "run"
    wait_all(start_ranks(write_config(tmp_path, micro_batch_size=micro_batch_size), out, 2))
    record = read_record(out)
    assert record.compute.world_size == 2
    assert record.compute.stages["pretrain"].micro_batch_size == (micro_batch_size or 16)
    assert_same_run(record, trajectory(out), one_process)
    # rank 0 wrote alone: one result, one weights file, no stray temporary files
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == \
        ["checkpoint.pt", "config.yaml", "heartbeat", "model.pt", "result.json"]


def test_a_rank_killed_then_relaunched_resumes_every_rank(tmp_path, one_process):
    config, out = write_config(tmp_path), tmp_path / "run"
    procs = start_ranks(config, out, 2)
    deadline = time.time() + 180
    while not (out / "checkpoint.pt").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=180)  # rank 0 loses its peer and stops; nothing hangs
    for p in procs:
        p.communicate()
    assert procs[0].returncode != 0 and status_of(out) in (None, "failed")  # failed: rank 0 says why
    wait_all(start_ranks(config, out, 2))
    record = read_record(out)
    assert record.resumed and record.resumed[0].step > 0  # both ranks went on from the checkpoint
    assert_same_run(record, trajectory(out), one_process)


def test_torchrun_starts_the_same_run(tmp_path, one_process):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sweep", "train", str(write_config(tmp_path)), "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = read_record(out)
    assert record.compute.world_size == 2
    assert_same_run(record, trajectory(out), one_process)


def test_a_signal_on_one_rank_stops_every_rank_after_one_checkpoint(tmp_path):
    # 300 steps, checkpoints only on signals
    config, out = write_config(tmp_path, checkpoint_every=0, pretrain_samples=9600), tmp_path / "run"
    procs = start_ranks(config, out, 2)
    deadline = time.time() + 180
    while not (out / "heartbeat").exists():  # rank 0 is up
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(6)  # into the training loop
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only, as a preemption of one task would
    for p in procs:
        p.communicate(timeout=180)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 0 < saved["step"] < 300 and status_of(out) is None
    wait_all(start_ranks(config, out, 2))
    record = read_record(out)
    assert record.status == "completed" and record.resumed[0].step == saved["step"]
    assert len(trajectory(out)["pretrain"]) == 300


def test_two_ranks_train_on_distinct_shards_and_resume_only_on_two(tmp_path):
    from sweep.data.generate import make_data

    make_data(tmp_path / "demo", train_samples=512, shard_size=64, corrupt=2, zeroshot_samples=40,
              retrieval_images=20, progress=False)
    shards = str(tmp_path / "demo" / "shards" / "train-{00000..00007}.tar")
    # 510 usable samples (2 corrupt), unevenly over the ranks; each rank's epoch is 240 of them, a step 16
    config = write_config(tmp_path, dataset="webdataset", train_data=shards, workers=1, finetune_samples=0,
                          text_strategy="none", text_tokens=32, train_num_samples=480)
    out = tmp_path / "run"
    wait_all(start_ranks(config, out, 2))
    record = read_record(out)
    assert record.status == "completed" and record.compute.world_size == 2
    assert record.compute.stages["pretrain"].skipped_samples >= 2  # both ranks' counts, summed
    positions = torch.load(out / "checkpoint.pt", weights_only=False)["data"]
    assert len(positions) == 2
    read = [{s for s, n in enumerate(p["consumed"]) if n} for p in positions]
    assert read[0] and read[1] and not read[0] & read[1]  # each rank read its own streams of shards


def test_a_failure_on_another_rank_than_0_is_recorded_by_that_rank(tmp_path):
    """Rank 0 hears of rank 1's error only as a lost peer (which it does not record): rank 1 writes the record."""
    from sweep.data.generate import make_data

    make_data(tmp_path / "demo", train_samples=72, shard_size=64, zeroshot_samples=40, retrieval_images=20,
              progress=False)  # shards of 64 and 8 samples; with seed 0 rank 1 reads the short one first
    shards = str(tmp_path / "demo" / "shards" / "train-{00000..00001}.tar")
    config = write_config(tmp_path, dataset="webdataset", train_data=shards, workers=0, finetune_samples=0,
                          text_strategy="none", text_tokens=32, train_num_samples=64, seed=0)
    out = tmp_path / "run"
    procs = start_ranks(config, out, 2)
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outputs
    record = read_record(out)
    assert record.status == "failed" and record.error.endswith("(on rank 1)"), record.error
    assert "held 8 usable samples, fewer than its share (32) of train_num_samples" in record.error
    # an error every rank meets is rank 0's record
    procs = start_ranks(write_config(tmp_path, batch_size=33), tmp_path / "odd", 2)
    assert [p.communicate(timeout=300)[0] and p.returncode for p in procs] == [1, 1]
    record = read_record(tmp_path / "odd")
    assert record.error == "ValueError: batch_size 33 does not split into 2 equal rank batches; use a multiple of 2"
