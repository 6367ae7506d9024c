"""One run, top to bottom: pre-train at reduced token lengths, optionally fine-tune at full length, evaluate after
each stage, and write the result record.

Everything random is a pure function of (seed, stage, step): the data order of an epoch, every mask, every word
choice. A run therefore resumes from its last checkpoint (model, optimizer, step) and ends exactly where an
uninterrupted run of the same config ends, on the same machine and thread count.

Files in the run directory:
    config.yaml          the fully resolved RunConfig (a rerun with another config is refused)
    checkpoint.pt        the latest resumable state, replaced atomically every `checkpoint_every` steps and on
                         SIGTERM / SIGUSR2
    model.pt             final weights, an open_clip state dict (see `load_trained_model`)
    result.json          the result record (sweep/record.py, docs/results.md), written atomically once the run
                         has ended
    heartbeat            touched every 10 s while the run is alive (read by `sweep status`)
    .lock                held (flock) by the one process training the run
"""
from __future__ import annotations

import functools
import math
import platform
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import yaml
from open_clip.loss import ClipLoss
from tqdm import tqdm

from sweep.config import ConfigError, RunConfig, identity
from sweep.data import Data, load_data
from sweep.evaluate import feature_fns, retrieval, zeroshot
from sweep.flops import step_flops
from sweep.models import build_model, count_params, encode_image, encode_text, register_open_clip_configs
from sweep.record import Compute, ResultRecord, read_record, status_of, write_record
from sweep.results import atomic_write, exclusive
from sweep.strategies.image import reduce_images
from sweep.strategies.text import TextReducer

STAGES = ("pretrain", "finetune")
STAGE_IDS = {"pretrain": 0, "finetune": 1}


class Diverged(RuntimeError):
    """The loss stopped being finite; the run ends as failed with this message."""


class Interrupted(RuntimeError):
    """A SIGTERM/SIGUSR2 arrived; a checkpoint was written and a rerun resumes from it."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint written, "
                         f"rerun on the same directory to resume")


@functools.lru_cache(maxsize=8)
def text_reducer(text_strategy: str, text_tokens: int, context_length: int, spacy_model: str) -> TextReducer:
    """One reducer per setting and process, so the runs of a local worker share its prepared captions."""
    return TextReducer(text_strategy, text_tokens, context_length=context_length, spacy_model=spacy_model)


def generator(*keys: int) -> torch.Generator:
    """A torch generator seeded by a tuple of ints (e.g. seed, stage, step), independent across tuples."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def lr_at(step: int, steps: int, peak: float, warmup_fraction: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at the last step."""
    warmup = int(warmup_fraction * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, lr: float) -> torch.optim.AdamW:
    # as in CLIP/open_clip: no weight decay on gains, biases, the logit scale and other 0/1-d parameters
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    # fused: one kernel for the whole update instead of a Python loop of elementwise ops; on CPU the per-op update
    # of the 49408 x width token embedding otherwise costs as much as the transformer at 17 image tokens
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(cfg.beta1, cfg.beta2), eps=1e-6,
                             fused=True)


class Pixels:
    """uint8 images -> the normalised float tensors open_clip's ViTs expect."""

    def __init__(self):
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
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


class StopSignals:
    """Turn SIGTERM/SIGUSR2 (a kill, a Slurm preemption or time-out) into a request the loop honours between
    steps: it writes a checkpoint, then hands the signal to whoever handled it before (submitit requeues the
    job there), else stops with `Interrupted`."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self, enabled: bool):
        self.enabled, self.received, self.previous = enabled, [], {}

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            self.previous = {s: signal.signal(s, lambda signum, frame: self.received.append(signum))
                             for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __bool__(self) -> bool:
        return bool(self.received)

    def honour(self, step: int) -> None:
        """Called after the checkpoint is written."""
        signum = self.received[0]
        handler = self.previous.get(signum)
        self.__exit__()
        if callable(handler):
            handler(signum, None)
        raise Interrupted(signum, step)


@contextmanager
def heartbeat(path: Path, every: float = 10.0):
    """Touch `path` every few seconds from a thread, so `sweep status` can tell a live run from a dead one."""
    done = threading.Event()

    def beat() -> None:
        while True:
            path.touch()
            if done.wait(every):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def train_step(model, optimizer, loss_fn, images: torch.Tensor, keep: torch.Tensor | None, tokens: torch.Tensor,
               grad_clip: float) -> torch.Tensor:
    """One AdamW step on a reduced batch; returns the loss. A non-finite loss updates nothing."""
    loss = loss_fn(encode_image(model, images, keep), encode_text(model, tokens), model.logit_scale.exp())
    if not torch.isfinite(loss):
        return loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    with torch.no_grad():  # CLIP caps the temperature at 100
        model.logit_scale.clamp_(0, math.log(100))
    return loss


def train_stage(model, cfg: RunConfig, stage: str, data: Data, pixels: Pixels, state: dict, run_dir: Path,
                stop: StopSignals, progress: bool) -> None:
    """Run (or finish) one stage, updating `state` in place; checkpoints as it goes."""
    samples = cfg.pretrain_samples if stage == "pretrain" else cfg.finetune_samples
    steps = samples // cfg.batch_size  # e.g. 6400 // 64 = 100; a tail that does not fill a batch is dropped
    image_strategy, image_tokens, text_strategy, text_tokens = cfg.stage_settings(stage)
    patch = cfg.spec.patch_size
    text = text_reducer(text_strategy, text_tokens, cfg.spec.text_tokens, cfg.spacy_model)
    text.prepare(data.train_captions)  # tokenise (and tag) every caption before the clock starts
    peak = cfg.lr if stage == "pretrain" else cfg.finetune_lr
    optimizer = make_optimizer(model, cfg, peak)
    start = 0
    if state.get("stage") == stage and "optimizer" in state:
        optimizer.load_state_dict(state.pop("optimizer"))
        start = state["step"]
    order = EpochOrder(len(data.train_captions), cfg.seed, stage)
    loss_fn = ClipLoss()
    stats = state.setdefault("compute", {}).setdefault(stage, {"train_seconds": 0.0})
    # every step of a stage has the same shapes, hence the same FLOPs
    stats["flops_per_step"] = step_flops(cfg.model, image_strategy, image_tokens, text_tokens, cfg.batch_size)
    losses = state.setdefault("losses", {}).setdefault(stage, [])

    def save(next_step: int) -> None:
        ckpt = {**{k: v for k, v in state.items() if not k.startswith("_")}, "stage": stage, "step": next_step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": cfg.to_dict(),
                "elapsed": state["elapsed"] + time.time() - state["_started"]}
        atomic_write(run_dir / "checkpoint.pt", lambda path: torch.save(ckpt, path))

    model.train()
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, leave=False, dynamic_ncols=True,
               disable=None if progress else True)  # None: only on a terminal
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak, cfg.warmup_fraction)
        tic = time.perf_counter()
        idx = order.batch(step, cfg.batch_size)
        gen = generator(cfg.seed, STAGE_IDS[stage], step, 1)  # every mask of this step, reproducible on resume
        # images [B, 3, 64, 64] = 8 x 8 patches + class token = 65 tokens; a masking strategy at 17 keeps 16
        # patches per sample (keep [B, 16]), `resize` shrinks the image to 32 px = 4 x 4 patches instead
        images, keep = reduce_images(pixels(data.train_images[idx]), image_strategy, image_tokens, patch, gen)
        tokens = text([data.train_captions[i] for i in idx.tolist()], gen)  # [B, text_tokens]
        # contrastive loss over the B x B image-text similarities; the step's FLOPs scale ~ with the tokens kept
        loss = train_step(model, optimizer, loss_fn, images, keep, tokens, cfg.grad_clip)
        if not torch.isfinite(loss):
            raise Diverged(f"loss became {loss.item()} at {stage} step {step}")
        stats["train_seconds"] += time.perf_counter() - tic
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if stop:
            save(step + 1)
            stop.honour(step + 1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    bar.close()
    stats["steps"] = steps
    stats["samples"] = steps * cfg.batch_size
    state["metrics"][stage] = evaluate(model, cfg, stage, data, pixels)
    state["stage"], state["step"] = stage, steps
    save(steps)


def evaluate(model, cfg: RunConfig, stage: str, data: Data, pixels: Pixels) -> dict[str, Any]:
    image_strategy, image_tokens, text_strategy, text_tokens = cfg.stage_settings(stage)
    text = text_reducer(text_strategy, text_tokens, cfg.spec.text_tokens, cfg.spacy_model)
    image_features, text_features = feature_fns(
        model, pixels,
        lambda images, gen: reduce_images(images, image_strategy, image_tokens, cfg.spec.patch_size, gen),
        text, seed=cfg.seed + 1000 * STAGE_IDS[stage])
    model.eval()
    metrics = {**zeroshot(image_features, text_features, data.zeroshot_images, data.zeroshot_labels,
                          data.classnames, data.templates),
               **retrieval(image_features, text_features, data.retrieval_images, data.retrieval_captions)}
    model.train()
    metrics.update(image_strategy=image_strategy, image_tokens=image_tokens, text_strategy=text_strategy,
                   text_tokens=text_tokens)
    return metrics


def versions() -> dict[str, str | None]:
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
    return out


def check_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume a directory that holds a different run."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        # compared as run identities: a setting added since the directory was written reads as its old behaviour
        previous, current = dict(identity(yaml.safe_load(saved.read_text()) or {})), dict(identity(cfg))
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ConfigError(changed[0],
                              f"differs from the run already in {run_dir} (changed: {', '.join(changed)}); "
                              f"use another --out directory", saved)


def run(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, handle_signals: bool = True
        ) -> ResultRecord:
    """Train one run to completion (resuming if `run_dir` holds a checkpoint) and write its result.json.

    Returns the result record. A run whose result.json is already `completed` is not trained again; a run that
    another process is training raises AlreadyRunning.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir(cfg, run_dir)
    with exclusive(run_dir):
        if status_of(run_dir) == "completed":
            return read_record(run_dir)
        atomic_write(run_dir / "config.yaml",
                     lambda p: Path(p).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
        with heartbeat(run_dir / "heartbeat"):
            return _run(cfg, run_dir, progress, handle_signals)


def _run(cfg: RunConfig, run_dir: Path, progress: bool, handle_signals: bool) -> ResultRecord:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tic = time.time()
    record: dict[str, Any] = dict(  # the fields of the ResultRecord that _finish writes
        run_id=run_dir.name, sweep=run_dir.parent.name, status="completed", model=cfg.model,
        image_strategy=cfg.image_strategy, image_tokens=cfg.image_tokens, text_strategy=cfg.text_strategy,
        text_tokens=cfg.text_tokens, seed=cfg.seed, config=cfg.to_dict(), versions=versions(),
        open_clip_model=cfg.spec.open_clip_name)
    state: dict = {"metrics": {}, "elapsed": 0.0, "_started": tic}
    try:
        data = load_data(cfg.dataset, cfg.data_seed, cfg.train_scenes, cfg.spec.image_size,
                         cfg.eval_zeroshot_samples, cfg.eval_retrieval_samples)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        record["params"] = count_params(model)
        if (run_dir / "checkpoint.pt").exists():
            state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
            model.load_state_dict(state.pop("model"))
            state.setdefault("resumed", []).append({"stage": state["stage"], "step": state["step"]})
        state["_started"] = tic
        pixels = Pixels()
        with StopSignals(handle_signals) as stop:
            for stage in STAGES:
                samples = cfg.pretrain_samples if stage == "pretrain" else cfg.finetune_samples
                if samples and stage not in state["metrics"]:
                    train_stage(model, cfg, stage, data, pixels, state, run_dir, stop, progress)
        torch.save(model.state_dict(), run_dir / "model.pt")
        record["weights"] = "model.pt"
    except Diverged as err:
        record.update(status="failed", error=str(err))
    except (Interrupted, SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:  # any other failure is recorded so `sweep status` can say why, then re-raised
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        _finish(record, state, tic, run_dir)
        raise
    return _finish(record, state, tic, run_dir)


def _finish(fields: dict[str, Any], state: dict, tic: float, run_dir: Path) -> ResultRecord:
    compute = state.get("compute", {})
    samples = sum(c.get("samples", 0) for c in compute.values())
    train_seconds = sum(c.get("train_seconds", 0.0) for c in compute.values())
    record = ResultRecord(
        **fields,
        metrics={stage: state["metrics"].get(stage) for stage in STAGES},
        compute=Compute(
            samples_seen=samples,
            # FLOPs of forward + backward (sweep.flops.step_flops) x the stage's steps
            train_flops=sum((c.get("flops_per_step") or 0) * c.get("steps", 0) for c in compute.values()),
            wall_seconds=round(state.get("elapsed", 0.0) + time.time() - tic, 3),
            train_seconds=round(train_seconds, 3),
            samples_per_second=round(samples / train_seconds, 2) if train_seconds else None,
            stages=compute,
            threads=torch.get_num_threads()),
        resumed=state.get("resumed", []),  # where each restart picked up (empty: never interrupted)
        final_loss={stage: float(np.mean(v[-20:])) for stage, v in state.get("losses", {}).items() if v},
    )
    write_record(run_dir, record)
    return record


def load_trained_model(run_dir: str | Path) -> open_clip.CLIP:
    """The final weights of a run, loaded the open_clip way (create_model with pretrained=path)."""
    register_open_clip_configs()
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    from sweep.models import MODELS
    return open_clip.create_model(MODELS[cfg["model"]].open_clip_name, pretrained=str(run_dir / "model.pt"))
