"""One run, top to bottom: pre-train at reduced token lengths, optionally fine-tune at full length, evaluate after
each stage, and write the result record.

Everything random is a pure function of (seed, stage, step): the data order of an epoch, every mask, every word
choice. A run therefore resumes from its last checkpoint (model, optimizer, step) and ends exactly where an
uninterrupted run of the same config ends, on the same machine and thread count (on a GPU: the same data order
and masks, metrics within floating-point noise).

How a step executes (device, precision, compilation, micro-batches) lives in `step.py`; the training state and its
checkpoint in `state.py`; signals and the heartbeat in `signals.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import open_clip
import torch
import yaml
from tqdm import tqdm

from sweep.config import ConfigError, RunConfig, identity, read_yaml_mapping
from sweep.data import Data, load_data
from sweep.data.evalsets import RetrievalSet, ZeroshotSet, read_retrieval, read_zeroshot
from sweep.data.sources import open_source
from sweep.data.stream import Batch, Prefetched, StreamedBatches
from sweep.evaluate import evaluate_on_disk, feature_fns, retrieval, zeroshot
from sweep.flops import step_flops
from sweep.models import build_model, count_params, register_open_clip_configs, tower_params
from sweep.record import Compute, ResultRecord, read_record, result_mtime, status_of, write_record
from sweep.results import AlreadyRunning, EndedElsewhere, atomic_write, exclusive
from sweep.strategies.image import reduce_images, side_of
from sweep.strategies.text import TextReducer
from sweep.train.distributed import Distributed, RankZeroFailed, join, lost_peer, wrap
from sweep.train.signals import Interrupted, StopSignals, heartbeat
from sweep.train.state import TrainState
from sweep.train.step import (ContrastiveStep, Encoders, Runtime, compile_blocks, device_name, eager, lr_at,
                              make_optimizer)

STAGES = ("pretrain", "finetune")
STAGE_IDS = {"pretrain": 0, "finetune": 1}
# what the record's `metrics` may hold: each stage, and the pre-trained model at full length (eval_full_length)
EVALUATIONS = ("pretrain", "pretrain_full_length", "finetune")


class Diverged(RuntimeError):
    """The loss stopped being finite; the run ends as failed with this message."""


class Pruned(Exception):
    """The run's `report` callback (an Optuna trial's pruner) stopped it; the run ends as `pruned`."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"pruned at {stage} step {step}")
        self.stage, self.step = stage, step


# Called on rank 0 with (global step, metrics) at every evaluation of a run (every `eval_every` steps and at the
# end of each stage); True prunes the run. Steps count on across stages: the fine-tune's step 0 follows the last
# pre-training step.
Report = Callable[[int, dict[str, Any]], bool]


@functools.lru_cache(maxsize=8)
def text_reducer(text_strategy: str, text_tokens: int, context_length: int, spacy_model: str) -> TextReducer:
    """One reducer per setting and process, so the runs of a local worker share its prepared captions."""
    return TextReducer(text_strategy, text_tokens, context_length=context_length, spacy_model=spacy_model)


def generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded by a tuple of ints (e.g. seed, stage, step), independent across tuples."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    return torch.Generator(device).manual_seed(seed)


class Pixels:
    """uint8 images -> the normalised float tensors open_clip's ViTs expect, on the run's device."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return (images.float() / 255.0 - self.mean) / self.std


class EpochOrder:
    """Sample position -> training scene index: every epoch visits every scene once, in an order set by the seed."""

    def __init__(self, n: int, seed: int, stage: str):
        self.n, self.seed, self.stage, self._perms = n, seed, STAGE_IDS[stage], {}

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        positions = torch.arange(step * batch_size, (step + 1) * batch_size)
        epochs, within = positions // self.n, positions % self.n
        out = torch.empty(batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(self.n, generator=generator(self.seed, self.stage, epoch))}
            sel = epochs == epoch
            out[sel] = self._perms[epoch][within[sel]]
        return out


class InMemoryBatches:
    """This rank's `rows` of the batches of the embedded pool, in EpochOrder, from `step` on (the same interface as
    StreamedBatches)."""

    skipped = 0  # rendered scenes never fail

    def __init__(self, data: Data, seed: int, stage: str, batch_size: int, step: int, rows: slice):
        self.data, self.batch_size, self.step, self.rows = data, batch_size, step, rows
        self.order = EpochOrder(len(data.train_captions), seed, stage)

    def next_batch(self) -> Batch:
        idx = self.order.batch(self.step, self.batch_size)[self.rows].tolist()
        self.step += 1
        return Batch(self.data.train_images[idx], [self.data.train_captions[i] for i in idx], [str(i) for i in idx],
                     tokens=None)

    def position(self) -> None:
        return None  # the step is the position

    def start(self) -> None:
        pass  # no loader: the pool is in memory

    def close(self) -> None:
        pass


def training_batches(cfg: RunConfig, stage: str, data: Data | None, state: TrainState,
                     text: TextReducer | None = None, here: Distributed = Distributed(), workers: int = 0,
                     device: torch.device = torch.device("cpu")) -> InMemoryBatches | StreamedBatches | Prefetched:
    """Where this rank's batches of a stage come from: its rows of the embedded pool's batches, or its streams of
    the files, streamed from `state.data` on (their captions tokenised by the loader workers where `text`
    allows; their JPEGs decoded on `device` with `decode: device`; for a GPU run received by a thread of their
    own, into pinned memory)."""
    if cfg.dataset == "synthetic":
        return InMemoryBatches(data, cfg.seed, stage, cfg.batch_size, state.step, here.rows(cfg.batch_size))
    if here.world_size > 1 and cfg.train_num_samples is None:
        raise ValueError("a run on several processes on files needs train_num_samples (at most the training set's "
                         "usable samples): each process ends every epoch after its share of it, so that they stay in "
                         "step and never read one shard at once")
    positions = state.data or [None] * here.world_size
    if len(positions) != here.world_size:
        raise RuntimeError(f"the checkpoint was written by a run on {len(positions)} processes and this one has "
                           f"{here.world_size}: the streams of a file dataset are split by rank, so resume it on "
                           f"{len(positions)} (sweep launch --rerun-failed with that many processes)")
    image_strategy, image_tokens, _, _ = cfg.stage_settings(stage)
    size = cfg.spec.image_size
    if image_strategy == "resize":  # decode straight to the reduced resolution: small images cost less to load
        size = side_of(image_tokens) * cfg.spec.patch_size
    source = open_source(cfg.dataset, cfg.train_data, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
    batches = StreamedBatches(source, seed=cfg.seed, stage=STAGE_IDS[stage],
                              batch_size=cfg.batch_size // here.world_size, image_size=size, workers=workers,
                              epoch_samples=cfg.train_num_samples, position=positions[here.rank], text=text,
                              rank=here.rank, ranks=here.world_size, pin=device.type == "cuda",
                              decode_on=device if cfg.decode == "device" else None,
                              min_crop_scale=cfg.min_crop_scale)
    return Prefetched(batches) if device.type == "cuda" else batches


def train_stage(model, encoders, cfg: RunConfig, runtime: Runtime, here: Distributed, stage: str, data: Data | None,
                eval_sets: dict, pixels: Pixels, state: TrainState, run_dir: Path, stop: StopSignals,
                progress: bool, started: float, report: Report | None = None) -> None:
    """Run (or finish) one stage on this rank, updating `state` in place; checkpoints as it goes (rank 0).
    Evaluates every `eval_every` steps and at the end, telling `report` (which may prune the run)."""
    samples = cfg.pretrain_samples if stage == "pretrain" else cfg.finetune_samples
    steps = samples // cfg.batch_size  # e.g. 6400 // 64 = 100; a tail that does not fill a batch is dropped
    image_strategy, image_tokens, text_strategy, text_tokens = cfg.stage_settings(stage)
    patch, stage_id = cfg.spec.patch_size, STAGE_IDS[stage]
    text = text_reducer(text_strategy, text_tokens, cfg.spec.text_tokens, cfg.spacy_model)
    if cfg.dataset == "synthetic":
        text.prepare(data.train_captions)  # tokenise (and tag) every caption before the clock starts
    else:
        text.prepare(["a caption"])  # loads the tokenizer (and tagger) before the clock starts
    peak = cfg.lr if stage == "pretrain" else cfg.finetune_lr
    optimizer = make_optimizer(model, cfg, peak)
    if state.stage == stage and state.optimizer is not None:  # resuming this stage
        optimizer.load_state_dict(state.optimizer)
        state.optimizer = None
    else:
        state.stage, state.step, state.data = stage, 0, None
    step_fn = ContrastiveStep(model, optimizer, runtime, cfg.micro_batch_size, cfg.grad_clip, here, encoders)
    batches = training_batches(cfg, stage, data, state, text, here, runtime.workers, runtime.device)
    rows = here.rows(cfg.batch_size)  # this rank's rows of every batch
    batches.start()  # the loader workers start decoding before the clock starts
    stats = state.compute.setdefault(stage, {"train_seconds": 0.0})
    if cfg.dataset != "synthetic":  # the loader processes it started: as many as its streams keep busy
        stats["loader_workers"] = batches.workers
    # every step of a stage has the same shapes, hence the same FLOPs
    stats["flops_per_step"] = step_flops(cfg.model, image_strategy, image_tokens, text_tokens, cfg.batch_size)
    losses = state.losses.setdefault(stage, [])
    pending: list[torch.Tensor] = []  # losses of the steps since the last read-back, still on the device
    window = time.perf_counter()

    def read_back() -> None:
        """Wait for the device, time the steps since the last read-back, keep their losses, stop on a non-finite
        one. The only place the loop synchronises with the device."""
        nonlocal window
        if not pending:
            return
        values = torch.stack(pending).float().tolist()
        stats["train_seconds"] += time.perf_counter() - window
        pending.clear()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise Diverged(f"loss became {value} at {stage} step {state.step - len(values) + i}")
        losses.extend(round(v, 5) for v in values)
        bar.set_postfix(loss=f"{values[-1]:.3f}")
        window = time.perf_counter()

    def save() -> None:
        """Every rank at once: rank 0 writes the checkpoint, the others wait until it is on disk."""
        nonlocal window
        read_back()  # never checkpoint a diverged state
        # where each rank's data goes on after the steps done so far (files; the step says it for the embedded data)
        positions = here.gather((batches.position(), batches.skipped))
        state.data = [p for p, _ in positions] if cfg.dataset != "synthetic" else None
        stats["skipped_samples"] = sum(skipped for _, skipped in positions)
        if state.data:
            stats["broken_shards"] = sum(p["broken_shards"] for p in state.data)
        here.on_main(lambda: state.save(run_dir, model, optimizer, cfg.to_dict(), started))  # the others wait
        window = time.perf_counter()

    # the fine-tune's steps count on from the pre-training's, so that a trial's reports are one increasing series
    offset = cfg.pretrain_samples // cfg.batch_size if stage == "finetune" else 0

    def evaluate_now(done: int, may_prune: bool = True) -> dict[str, Any]:
        """Rank 0 evaluates after `done` steps of the stage and tells `report`; a prune stops every rank."""
        nonlocal window
        read_back()  # a diverged model is not evaluated

        def on_main() -> tuple[dict[str, Any], bool]:
            found = evaluate(model, cfg, runtime, cfg.stage_settings(stage), stage_id, data, eval_sets, pixels)
            state.evals.append({"stage": stage, "step": done, "metrics": found})
            return found, bool(report and report(offset + done, found)) and may_prune

        found, prune = here.on_main(on_main) or ({}, False)  # an evaluation that fails stops every rank
        if here.broadcast(prune):
            raise Pruned(stage, done)
        window = time.perf_counter()  # evaluation is not training time
        return found

    model.train()
    first = state.step
    bar = tqdm(range(state.step, steps), desc=stage, initial=state.step, total=steps, leave=False,
               dynamic_ncols=True, disable=None if progress and here.main else True)  # None: only on a terminal
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, peak, cfg.warmup_fraction)
            batch = batches.next_batch()  # uint8 images [B, 3, H, W] and their B captions (B / ranks on each rank)
            gen = generator(cfg.seed, stage_id, step, 1, device=runtime.device)  # this step's masks, on the device
            # word choices are made on the host: on the CPU from the same generator as the masks (after them), on a
            # GPU from a host generator of their own
            text_gen = gen if runtime.device.type == "cpu" else generator(cfg.seed, stage_id, step, 2)
            # images [B, 3, 64, 64] = 8 x 8 patches + class token = 65 tokens; a masking strategy at 17 keeps 16
            # patches per sample (keep [B, 16]), `resize` shrinks the image to 32 px = 4 x 4 patches instead; masks and
            # words are drawn for the whole batch, each rank keeping its rows
            images, keep = reduce_images(pixels(batch.images), image_strategy, image_tokens, patch, gen, rows,
                                         cfg.batch_size)
            tokens = batch.tokens if batch.tokens is not None else text(batch.captions, text_gen, rows.start)
            # contrastive loss over the B x B image-text similarities; the step's FLOPs scale ~ with the tokens kept
            pending.append(step_fn(images, keep, tokens.to(runtime.device, non_blocking=True)))
            state.step = step + 1
            if step == first:  # compiles and warms up: timed apart too, so that a steady rate can leave it out
                before = stats["train_seconds"]
                read_back()
                stats["first_step_seconds"] = stats.get("first_step_seconds", 0.0) + stats["train_seconds"] - before
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
                evaluate_now(step + 1)  # before a checkpoint of the same step, which then holds it
            signum = here.largest(stop.signum)  # a signal on any rank stops every rank, after one checkpoint
            if signum:
                save()
                stop.honour(step + 1, signum)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                save()
            elif (step + 1) % cfg.log_every == 0:
                read_back()
    finally:
        batches.close()  # its loader workers and thread stop with the stage
    read_back()
    bar.close()
    stats["steps"] = steps
    stats["samples"] = steps * cfg.batch_size
    # pairs per forward/backward pass on one rank: what fitted, after any halving
    rows = cfg.batch_size // here.world_size
    stats["micro_batch_size"] = min(step_fn.micro_batch_size or rows, rows)
    # the other ranks wait for rank 0's metrics; a run whose training is over is not pruned
    found = {stage: evaluate_now(steps, may_prune=stage == "pretrain" and cfg.finetune_samples > 0)}
    if stage == "pretrain" and cfg.eval_full_length:  # the pre-trained model at full length, as a fine-tune
        found["pretrain_full_length"] = here.on_main(lambda: evaluate(
            model, cfg, runtime, cfg.stage_settings("finetune"), STAGE_IDS[stage], data, eval_sets, pixels))
    state.metrics.update(here.broadcast(found))
    save()


def load_eval_sets(cfg: RunConfig) -> dict[str, ZeroshotSet | RetrievalSet]:
    """The run's evaluation sets on disk, listed (not decoded) once per run."""
    return {e.name: read_zeroshot(e.data, e.zeroshot_classnames, e.zeroshot_templates) if e.type == "zeroshot"
            else read_retrieval(e.data, e.csv_img_key, e.csv_caption_key, e.csv_separator) for e in cfg.eval_sets}


def evaluate(model, cfg: RunConfig, runtime: Runtime, settings: tuple[str, int, str, int], stage_id: int,
             data: Data | None, eval_sets: dict[str, ZeroshotSet | RetrievalSet], pixels: Pixels
             ) -> dict[str, Any]:
    """Metrics of the model at `settings` (image strategy and tokens, text strategy and tokens): the embedded
    sets under their own names (zeroshot_top1, i2t_r1, ...), each set on disk as <name>_<metric>."""
    image_strategy, image_tokens, text_strategy, text_tokens = settings
    text = text_reducer(text_strategy, text_tokens, cfg.spec.text_tokens, cfg.spacy_model)
    image_features, text_features = feature_fns(
        model, pixels,
        lambda images, gen: reduce_images(images, image_strategy, image_tokens, cfg.spec.patch_size, gen),
        text, seed=cfg.seed + 1000 * stage_id, device=runtime.device)
    model.eval()
    metrics: dict[str, Any] = {}
    with runtime.autocast(), eager():
        if cfg.eval_embedded:
            metrics.update(zeroshot(image_features, text_features, data.zeroshot_images, data.zeroshot_labels,
                                    data.classnames, data.templates))
            metrics.update(retrieval(image_features, text_features, data.retrieval_images,
                                     data.retrieval_captions))
        for name, eval_set in eval_sets.items():
            found = evaluate_on_disk(image_features, text_features, eval_set, cfg.spec.image_size, runtime.workers)
            metrics.update({f"{name}_{key}": value for key, value in found.items()})
    model.train()
    metrics.update(image_strategy=image_strategy, image_tokens=image_tokens, text_strategy=text_strategy,
                   text_tokens=text_tokens)
    return metrics


def versions(cfg: RunConfig) -> dict[str, str | None]:
    """The code a run's result came from; for a syntax run also the tagger (`spacy_pipeline`: package and version,
    or a folder's name, version and hash), as its tags shape which words a caption keeps."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "git_commit": commit}
    for pkg in ("torch", "open_clip_torch", "numpy", "inverse-scaling-sweep"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    if cfg.text_strategy == "syntax":
        from sweep.strategies.syntax import pipeline_id

        out["spacy"] = version("spacy")
        out["spacy_pipeline"] = pipeline_id(cfg.spacy_model)
    return out


def check_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume a directory that holds a different run."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        # compared as run identities: a setting added since the directory was written reads as its old behaviour
        previous, current = dict(identity(read_yaml_mapping(saved, "run settings"))), dict(identity(cfg))
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ConfigError(changed[0],
                              f"differs from the run already in {run_dir} (changed: {', '.join(changed)}); "
                              f"use another --out directory", saved)


def run(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, handle_signals: bool = True,
        report: Report | None = None, trial: dict[str, Any] | None = None, since: float = 0.0) -> ResultRecord:
    """Train one run to completion (resuming if `run_dir` holds a checkpoint) and write its result.json.

    Returns the result record. A run whose result.json is already `completed`, or was written at or after `since`
    (a launch's start: another worker of the launch ran it, and it failed), is not trained again; a run that
    another process is training raises AlreadyRunning. On several processes (torchrun, a multi-task Slurm job)
    every rank calls this: rank 0 holds the directory (lock, heartbeat, every file written), the others follow.
    `report` hears every evaluation and may prune the run (`Report`); `trial` (study, number) goes into the record
    of a run trained as an Optuna trial.
    """
    run_dir = Path(run_dir)
    here = join(torch.device(device_name(cfg)).type)  # the backend: NCCL for cuda, gloo for cpu
    with contextlib.ExitStack() as held:
        verdict: tuple[str, str] = ("train", "")
        if here.main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                check_run_dir(cfg, run_dir)
                held.enter_context(exclusive(run_dir))
                if status_of(run_dir) == "completed":
                    verdict = ("completed", "")
                elif (result_mtime(run_dir) or 0) >= since > 0:
                    verdict = ("EndedElsewhere", f"{run_dir} ended since this launch started")
                else:
                    atomic_write(run_dir / "config.yaml",
                                 lambda p: Path(p).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
                    held.enter_context(heartbeat(run_dir / "heartbeat"))
            except Exception as err:
                here.broadcast((type(err).__name__, str(err)))  # the other ranks stop with it
                raise
        verdict = here.broadcast(verdict)
        if verdict[0] in ("AlreadyRunning", "EndedElsewhere"):
            raise {"AlreadyRunning": AlreadyRunning, "EndedElsewhere": EndedElsewhere}[verdict[0]](verdict[1])
        if verdict[0] not in ("train", "completed"):
            raise RuntimeError(f"rank 0 could not start the run: {verdict[0]}: {verdict[1]}")
        if verdict[0] == "completed":
            return read_record(run_dir)
        return _run(cfg, run_dir, here, progress, handle_signals, report, trial)


def _run(cfg: RunConfig, run_dir: Path, here: Distributed, progress: bool, handle_signals: bool,
         report: Report | None, trial: dict[str, Any] | None) -> ResultRecord:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    record: dict[str, Any] = dict(  # the fields of the ResultRecord that _finish writes
        run_id=run_dir.name, sweep=run_dir.parent.name, status="completed", model=cfg.model,
        image_strategy=cfg.image_strategy, image_tokens=cfg.image_tokens, text_strategy=cfg.text_strategy,
        text_tokens=cfg.text_tokens, seed=cfg.seed, config=cfg.to_dict(), versions=versions(cfg),
        open_clip_model=cfg.spec.open_clip_name, trial=trial)
    state, runtime = TrainState(), None
    try:
        runtime = Runtime.of(cfg, here.local_rank)
        if cfg.batch_size % here.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} does not split into {here.world_size} equal rank "
                             f"batches; use a multiple of {here.world_size}")
        data = None
        if cfg.dataset == "synthetic" or cfg.eval_embedded:
            data = load_data(cfg.dataset, cfg.data_seed, cfg.train_scenes, cfg.spec.image_size,
                             cfg.eval_zeroshot_samples, cfg.eval_retrieval_samples)
            if data.train_images is not None:  # the pool on the device: a batch is a gather there, no host copy
                data = dataclasses.replace(data, train_images=data.train_images.to(runtime.device))
        eval_sets = here.on_main(lambda: load_eval_sets(cfg)) or {}  # rank 0 evaluates
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)  # initialised on the CPU: the same weights whatever the device
        record["params"] = count_params(model)
        record["vision_params"], record["text_params"] = tower_params(model)
        state = TrainState.load(run_dir, model)  # every rank resumes from the same checkpoint
        model.to(runtime.device)
        model.set_grad_checkpointing(cfg.grad_checkpointing)
        if runtime.compile:
            compile_blocks(model)
        encoders = wrap(Encoders(model), here, runtime.device)  # DDP on several ranks
        pixels = Pixels(runtime.device)
        with StopSignals(handle_signals) as stop:
            for stage in STAGES:
                samples = cfg.pretrain_samples if stage == "pretrain" else cfg.finetune_samples
                if samples and stage not in state.metrics:
                    train_stage(model, encoders, cfg, runtime, here, stage, data, eval_sets, pixels, state, run_dir,
                                stop, progress, started, report)
        here.on_main(lambda: torch.save(model.state_dict(), run_dir / "model.pt"))
        record["weights"] = "model.pt"
    except Diverged as err:  # every rank sees the same losses, so every rank ends here at the same step
        record.update(status="failed", error=str(err))
    except Pruned as err:  # every rank heard rank 0's verdict; no final weights
        record.update(status="pruned", pruned_at={"stage": err.stage, "step": err.step})
    except (Interrupted, SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:  # any other failure is recorded so `sweep status` can say why, then re-raised
        if here.world_size > 1 and lost_peer(err):  # as a killed one-process run: no record, resumed on a relaunch
            raise
        record.update(status="failed", error=f"{type(err).__name__}: {err}" + ("" if here.main else
                                                                                f" (on rank {here.rank})"))
        # Written by the rank that failed, whichever it is: rank 0 hears of another rank's error only as a lost peer.
        # An error every rank meets (a setting they all refuse) is rank 0's to record: the others give it a moment.
        if here.main:
            _finish(record, state, runtime, here, started, run_dir)
        elif not isinstance(err, RankZeroFailed):
            time.sleep(1.0)
            if (result_mtime(run_dir) or 0) < started:
                _finish(record, state, runtime, here, started, run_dir)
        raise
    finished = here.on_main(lambda: _finish(record, state, runtime, here, started, run_dir))  # others wait for it
    return finished or read_record(run_dir)


def _finish(fields: dict[str, Any], state: TrainState, runtime: Runtime | None, here: Distributed, started: float,
            run_dir: Path) -> ResultRecord:
    compute = state.compute
    samples = sum(c.get("samples", 0) for c in compute.values())
    train_seconds = sum(c.get("train_seconds", 0.0) for c in compute.values())
    # the rate of the finished stages only: a failed stage's seconds went into no counted sample
    finished_seconds = sum(c["train_seconds"] for c in compute.values() if "samples" in c)
    where = {}
    if runtime is not None:
        where = {"device": str(runtime.device), "precision": runtime.precision, "compiled": runtime.compile,
                 "workers": runtime.workers}
        if runtime.device.type == "cuda":
            where["device_name"] = torch.cuda.get_device_name(runtime.device)
    record = ResultRecord(
        **fields,
        metrics={key: state.metrics.get(key) for key in EVALUATIONS if key in STAGES or key in state.metrics},
        compute=Compute(
            samples_seen=samples,
            # FLOPs of forward + backward (sweep.flops.step_flops) x the stage's steps
            train_flops=sum((c.get("flops_per_step") or 0) * c.get("steps", 0) for c in compute.values()),
            wall_seconds=round(state.elapsed + time.time() - started, 3),
            train_seconds=round(train_seconds, 3),
            samples_per_second=round(samples / finished_seconds, 2) if finished_seconds else None,
            stages=compute,
            threads=torch.get_num_threads(),
            world_size=here.world_size,
            **where),
        resumed=state.resumed,  # where each restart picked up (empty: never interrupted)
        final_loss={stage: float(np.mean(v[-20:])) for stage, v in state.losses.items() if v},
        evals=state.evals,
    )
    write_record(run_dir, record)
    return record


def load_trained_model(run_dir: str | Path) -> open_clip.CLIP:
    """The final weights of a run, loaded the open_clip way (create_model with pretrained=path)."""
    register_open_clip_configs()
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    from sweep.sizes import MODELS
    return open_clip.create_model(MODELS[cfg["model"]].open_clip_name, pretrained=str(run_dir / "model.pt"))
