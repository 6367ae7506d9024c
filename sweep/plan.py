"""What a grid costs before it runs: training FLOPs per run (counted exactly, on shapes only) and a time estimate.

FLOPs are sweep.flops.step_flops (forward + backward, counted from shapes) times the steps of each stage: the
same count the trainer records in result.json.
Time on this machine's CPU for the embedded sizes: FLOPs / the throughput of one real timed step of that model
(at full length, so reduced runs that waste more time on fixed costs come out a little optimistic), plus a fixed
per-run overhead for start-up and evaluation. Paper sizes are meant for GPUs: their GPU-hours are FLOPs / `tflops`
per GPU (effective, i.e. delivered, not peak) and their time is that shared by the run's GPUs (perfect scaling, so
a lower bound).
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Any

import torch

from sweep.config import RunConfig
from sweep.flops import step_flops
from sweep.models import MODELS, build_model

RUN_OVERHEAD_S = 3.0  # embedded default: data, model set-up and evaluation per run in a warm worker (2.5 s measured)


def run_flops(cfg: RunConfig) -> int:
    """Training FLOPs of a whole run: both stages' steps at their own lengths."""
    total = 0
    for stage, samples in (("pretrain", cfg.pretrain_samples), ("finetune", cfg.finetune_samples)):
        steps = samples // cfg.batch_size
        if steps:
            image_strategy, image_tokens, _, text_tokens = cfg.stage_settings(stage)
            total += steps * step_flops(cfg.model, image_strategy, image_tokens, text_tokens, cfg.batch_size)
    return total


@functools.lru_cache(maxsize=None)
def cpu_flops_per_second(model: str, threads: int) -> float:
    """Delivered FLOP/s of a real training step of `model` at full length on this CPU: the fastest of three timed
    steps, as other processes on a shared machine only ever slow a step down."""
    from sweep.train import ContrastiveStep, Runtime, make_optimizer

    spec = MODELS[model]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = build_model(model)
        cfg = RunConfig(model=model, device="cpu")
        step = ContrastiveStep(net, make_optimizer(net, cfg, 1e-4), Runtime.of(cfg), 0, cfg.grad_clip)
        batch = 32
        images = torch.rand(batch, 3, spec.image_size, spec.image_size)
        text = torch.randint(1, 49000, (batch, spec.text_tokens))
        text[:, -1] = 49407
        step(images, None, text)  # warm-up
        seconds = float("inf")
        for _ in range(3):
            tic = time.perf_counter()
            step(images, None, text).item()
            seconds = min(seconds, time.perf_counter() - tic)
    finally:
        torch.set_num_threads(previous)
    return step_flops(model, "none", spec.image_tokens, spec.text_tokens, batch) / seconds


def estimate(runs: list[RunConfig], threads: int, tflops: float, processes: int = 1) -> list[dict[str, Any]]:
    """Per run: FLOPs, estimated seconds and GPU-hours (0 for the CPU sizes) with `processes` per run (one per GPU;
    on the CPU, `threads` torch threads each), which share its steps."""
    out = []
    for cfg in runs:
        flops = run_flops(cfg)
        if cfg.spec.scale == "cpu":
            seconds = flops / (cpu_flops_per_second(cfg.model, threads) * max(1, processes)) + RUN_OVERHEAD_S
            gpu_hours = 0.0
        else:
            gpu_hours = flops / (tflops * 1e12) / 3600
            seconds = gpu_hours * 3600 / max(1, processes)
        out.append({"flops": flops, "seconds": seconds, "gpu_hours": gpu_hours})
    return out


def group_rows(runs: list[RunConfig], costs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs grouped by model and strategies, with their token lengths and summed cost."""
    groups: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"runs": 0, "image_tokens": set(),
                                                               "text_tokens": set(), "flops": 0, "seconds": 0.0,
                                                               "gpu_hours": 0.0, "longest": 0.0})
    for cfg, cost in zip(runs, costs):
        g = groups[(cfg.model, cfg.image_strategy, cfg.text_strategy)]
        g["runs"] += 1
        g["image_tokens"].add(cfg.image_tokens)
        g["text_tokens"].add(cfg.text_tokens)
        g["flops"] += cost["flops"]
        g["seconds"] += cost["seconds"]
        g["longest"] = max(g["longest"], cost["seconds"])
        g["gpu_hours"] += cost["gpu_hours"]
    return [{"model": m, "image_strategy": i, "text_strategy": t, **g,
             "image_tokens": sorted(g["image_tokens"], reverse=True),
             "text_tokens": sorted(g["text_tokens"], reverse=True)}
            for (m, i, t), g in sorted(groups.items(), key=lambda kv: (list(MODELS).index(kv[0][0]), kv[0][1:]))]


def human_flops(flops: float) -> str:
    for unit, scale in (("ZFLOP", 1e21), ("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops / 1e9:.2f} GFLOP"


def human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def human_gpu_hours(hours: float) -> str:
    return "-" if not hours else f"{hours:,.0f}" if hours >= 10 else f"{hours:.2f}"


def format_plan(rows: list[dict[str, Any]], parallel: int) -> str:
    lines = [f"{'model':<9} {'image_strategy':<14} {'text_strategy':<13} {'runs':>4}  {'image_tokens':<26} "
             f"{'text_tokens':<14} {'FLOPs':>11} {'time':>9} {'GPU-h':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<9} {r['image_strategy']:<14} {r['text_strategy']:<13} {r['runs']:>4}  "
                     f"{','.join(map(str, r['image_tokens'])):<26} {','.join(map(str, r['text_tokens'])):<14} "
                     f"{human_flops(r['flops']):>11} {human_seconds(r['seconds']):>9} "
                     f"{human_gpu_hours(r['gpu_hours']):>8}")
    total_runs = sum(r["runs"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    gpu_hours = sum(r["gpu_hours"] for r in rows)
    parallel = max(1, min(parallel, total_runs))  # never shorter than the longest run
    wall = max(seconds / parallel, max((r["longest"] for r in rows), default=0.0))
    lines.append(f"total: {total_runs} runs, {human_flops(flops)}, {human_seconds(seconds)} of run time, "
                 f"about {human_seconds(wall)} with {parallel} in parallel"
                 + (f", {human_gpu_hours(gpu_hours)} GPU-hours" if gpu_hours else ""))
    return "\n".join(lines)
