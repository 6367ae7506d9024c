"""One optimizer step: micro-batches with the loss over the whole batch give the one-shot gradient; the runtime
settings resolve as documented; a run asked to use a GPU that is not there fails with the reason."""
import copy
import os

import pytest
import torch

from sweep.config import config_from_dict
from sweep.models import build_model
from sweep.strategies.image import reduce_images
from sweep.train import ContrastiveStep, Runtime, make_optimizer, run
from sweep.train.step import gpu_workers


def batch(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 64, 64, generator=gen)
    tokens = torch.randint(1, 49000, (n, 32), generator=gen)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    return images, tokens


def gradients_after_one_step(model, micro_batch_size, images, keep, tokens):
    cfg = config_from_dict({"device": "cpu"})
    step = ContrastiveStep(model, make_optimizer(model, cfg, 1e-3), Runtime.of(cfg), micro_batch_size, grad_clip=0)
    loss = step(images, keep, tokens)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("strategy,tokens", [("none", 65), ("random", 17), ("block", 26), ("resize", 17)])
@pytest.mark.parametrize("micro_batch_size", [1, 4, 5, 15])
def test_accumulated_gradients_equal_the_one_shot_gradient(strategy, tokens, micro_batch_size):
    torch.manual_seed(0)
    model = build_model("cpu-s")
    images, text = batch()
    images, keep = reduce_images(images, strategy, tokens, 8, torch.Generator().manual_seed(1))
    loss_one, grads_one = gradients_after_one_step(copy.deepcopy(model), 0, images, keep, text)
    loss_acc, grads_acc = gradients_after_one_step(copy.deepcopy(model), micro_batch_size, images, keep, text)
    torch.testing.assert_close(loss_acc, loss_one, rtol=1e-5, atol=1e-5)  # the loss over the whole batch
    assert set(grads_acc) == set(grads_one)
    for name, grad in grads_one.items():  # logit_scale included: its gradient is taken once, not per micro-batch
        torch.testing.assert_close(grads_acc[name], grad, rtol=1e-4, atol=1e-4, msg=name)


def test_a_micro_batch_as_large_as_the_batch_is_the_one_shot_step():
    torch.manual_seed(0)
    model = build_model("cpu-s")
    images, text = batch(8)
    one = gradients_after_one_step(copy.deepcopy(model), 0, images, None, text)
    same = gradients_after_one_step(copy.deepcopy(model), 8, images, None, text)
    assert torch.equal(one[0], same[0]) and all(torch.equal(one[1][k], same[1][k]) for k in one[1])


def test_a_gpu_run_leaves_one_of_its_cores_to_training_and_the_rest_to_loader_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert gpu_workers() == 11  # a Slurm task with 12 cores, or a node of 12 with one rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks share the node's cores
    assert gpu_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert gpu_workers() == 16  # at most 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert gpu_workers() == 1


def test_runtime_resolves_auto_by_the_device():
    cpu = Runtime.of(config_from_dict({"device": "cpu"}))
    # a CPU run decodes its files between steps: its threads already use the cores
    assert (cpu.device.type, cpu.precision, cpu.compile, cpu.workers) == ("cpu", "fp32", False, 0)
    forced = Runtime.of(config_from_dict({"device": "cpu", "precision": "bf16", "compile": True, "workers": 3}))
    assert (forced.precision, forced.compile, forced.workers) == ("bf16", True, 3)
    auto = Runtime.of(config_from_dict({}))
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("raw,field", [({"device": "gpu"}, "device"), ({"device": "cuda:01"}, "device"),
                                       ({"precision": "fp16"}, "precision"),
                                       ({"compile": "yes"}, "compile"), ({"micro_batch_size": -1}, "micro_batch_size"),
                                       ({"log_every": 0}, "log_every")])
def test_bad_runtime_settings_fail_at_load_time(raw, field):
    with pytest.raises(Exception) as info:
        config_from_dict(raw, "run.yaml")
    assert f"run.yaml: {field}:" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_run_asked_for_a_missing_gpu_fails_with_the_reason(tmp_path, capsys):
    from sweep.cli import main

    assert main(["train", "grids/run-example.yaml", "--out", str(tmp_path / "r"), "--quiet",
                 "--set", "device=cuda"]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    record = (tmp_path / "r" / "result.json").read_text()
    assert '"status": "failed"' in record and "no CUDA device" in record


@pytest.mark.slow
def test_a_compiled_run_on_the_cpu_matches_the_eager_run(tmp_path):
    small = {"model": "cpu-s", "image_strategy": "random", "image_tokens": 17, "pretrain_samples": 512,
             "batch_size": 64, "train_scenes": 300, "eval_zeroshot_samples": 40, "eval_retrieval_samples": 40,
             "device": "cpu", "threads": 2}
    eager = run(config_from_dict(small), tmp_path / "eager", progress=False)
    torch._dynamo.reset()
    compiled = run(config_from_dict({**small, "compile": True, "micro_batch_size": 32}), tmp_path / "compiled",
                   progress=False)
    assert compiled.status == "completed" and compiled.compute.model_dump()["compiled"] is True
    # the blocks really ran compiled: one graph per tower and grad mode (the accumulation's no-grad pass), the
    # image tower's graph shared by its blocks (recompiling per block would make more, or fall back to eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    assert compiled.final_loss["pretrain"] == pytest.approx(eager.final_loss["pretrain"], rel=1e-3)


def test_activation_checkpointing_changes_memory_not_gradients():
    torch.manual_seed(0)
    model = build_model("cpu-s")
    images, text = batch(8)
    plain = gradients_after_one_step(copy.deepcopy(model), 0, images, None, text)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.visual.transformer.grad_checkpointing
    again = gradients_after_one_step(checkpointed, 4, images, None, text)
    for name, grad in plain[1].items():
        torch.testing.assert_close(again[1][name], grad, rtol=1e-4, atol=1e-4, msg=name)
