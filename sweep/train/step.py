"""One optimizer step of the contrastive loss: on a device, in a precision, compiled or not, in micro-batches.

The science of a step is fixed by the run's settings (the batch, its masks, the loss over the whole batch); how the
step is executed is not, and does not change the result beyond floating-point noise:
- `Runtime` resolves `device`, `precision` and `compile` (all `auto` by default: cuda + bf16 autocast + compiled
  where a GPU is present, cpu + fp32 + eager elsewhere); `compile_blocks` compiles the transformer blocks;
- `ContrastiveStep` splits a batch into micro-batches when asked to (or when a GPU runs out of memory) and still
  computes the loss over the whole batch: the features of every micro-batch are first computed without gradients,
  then each micro-batch is recomputed with gradients against the cached features of the others, so the summed
  gradient is the gradient of the one-shot loss (open_clip's `accum_freq` scheme, with the temperature's gradient
  taken once instead of once per micro-batch);
- on several ranks (`distributed.py`) each rank steps on its rows of the batch; the loss gathers every rank's
  features with their gradients and DDP averages the gradients, so global batch = micro-batch x accumulation x
  ranks, and the update is the one of a single process on the whole batch.
Nothing here reads a value back from the device: the loss stays a device tensor until the loop asks for it.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from open_clip.loss import ClipLoss
from torch.profiler import record_function

from sweep.config import RunConfig
from sweep.models import encode_image, encode_text
from sweep.train.distributed import Distributed, local_device


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


def device_name(cfg: RunConfig) -> str:
    """The `device` setting with `auto` resolved: cuda where torch sees a GPU, else cpu (not checked further)."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def gpu_workers() -> int:
    """Loader processes of a GPU run that leaves `workers` empty: the cores this process may use (its Slurm
    task's, or the node's shared by torchrun's LOCAL_WORLD_SIZE ranks) less one for the training process, at most
    16. A 224-px training image costs a worker ~1.4 ms (data_speed.py), so one H100 at 3,000-11,000 samples/s
    wants 5-16 of them. (The loader may start fewer: `sweep.data.stream.loader_workers`.)"""
    cores = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, cores - 1))


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: device, autocast dtype (None = fp32), whether the encoders are compiled, and
    how many loader processes decode its files."""

    device: torch.device
    dtype: torch.dtype | None
    compile: bool
    workers: int = 0  # loader processes

    @classmethod
    def of(cls, cfg: RunConfig, local_rank: int = 0) -> "Runtime":
        """Resolve the `auto` settings; a cuda device that is not there is an error of the run, not of the config
        (a grid is validated on a login node without GPUs). `cuda` is the GPU of the rank (`local_rank`)."""
        device = torch.device(device_name(cfg))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {cfg.device!r} was asked for, but torch sees no CUDA device here")
        if device.type == "cuda" and device.index is None:
            device = local_device(local_rank)
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"
        workers = cfg.workers if cfg.workers is not None else gpu_workers() if device.type == "cuda" else 0
        return cls(device, torch.bfloat16 if precision == "bf16" else None, compiled, workers)

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def synchronize(self) -> None:
        """Wait for the device's queued work (to time it); a no-op on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every transformer block of both towers, in place, for training steps (regional compilation).

    All blocks of a tower share one compiled graph per input shape, so a new token length costs one block's
    compilation, not the whole model's, and a masking strategy and `resize` at the same length share it (cpu-l on
    2 cores: 20 s for the first shapes, then ~9 s per new length and 0.1 s for `resize` at a compiled length,
    against 17-35 s per shape for the whole model). What stays eager between the blocks (patch embedding, the
    kept-patch gather, pooling, the token embedding) is a few kernels per step. Evaluation runs eager
    (`eager()`): its shapes would only add compilations."""
    allow_recompiles()
    for tower in (model.visual.transformer, model.transformer):
        for block in tower.resblocks:
            block.compile(dynamic=False)  # fixed shapes: each stage's shape is fixed, and static kernels are faster


def allow_recompiles() -> None:
    """Let a compiled module keep up to 64 graphs: one per (shape, grad mode), and a run's two stages, micro-batch
    remainders and a no-grad pass for accumulation exceed the default of 8, after which dynamo would silently fall
    back to eager."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def eager():
    """A context in which compiled blocks run eagerly (evaluation)."""
    return torch.compiler.set_stance("force_eager")


class Encoders(torch.nn.Module):
    """Both towers as one module: its forward is what a step differentiates, and what DDP wraps."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # named ranges, so that a profile (benchmarks/gpu_speed.py --profile) can say where a step's time goes
        with record_function("vision forward"):
            image_features = encode_image(self.model, images, keep)
        with record_function("text forward"):
            return image_features, encode_text(self.model, tokens)


class ContrastiveStep:
    """`step(images, keep, tokens)`: one AdamW step on this rank's rows of a batch; returns the loss over the whole
    (global) batch as a device tensor.

    `encoders` is `Encoders(model)`, wrapped in DDP for a run on several ranks (`distributed.wrap`, once per run).
    A non-finite loss is not looked at here (that would wait for the device); the loop checks the losses every
    `log_every` steps and ends the run there."""

    def __init__(self, model, optimizer, runtime: Runtime, micro_batch_size: int, grad_clip: float,
                 here: Distributed = Distributed(), encoders: torch.nn.Module | None = None):
        self.model, self.optimizer, self.runtime, self.here = model, optimizer, runtime, here
        self.micro_batch_size, self.grad_clip = micro_batch_size, grad_clip
        # over several ranks: each rank's rows against the features of every rank, gathered with their gradients
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=here.rank,
                                world_size=here.world_size)
        self.encoders = encoders if encoders is not None else Encoders(model)

    def __call__(self, images: torch.Tensor, keep: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        while True:
            try:
                return self._step(images, keep, tokens)
            except torch.OutOfMemoryError:
                # automatic micro-batch: halve until the step fits (the result is the same, see the module doc)
                size = self.micro_batch_size or images.shape[0]
                if self.runtime.device.type != "cuda" or size <= 1:
                    raise
                if self.here.world_size > 1:  # the ranks would disagree on their micro-batches and deadlock
                    raise torch.OutOfMemoryError(f"a rank batch of {images.shape[0]} does not fit; set "
                                                 f"micro_batch_size (below {size}) for runs on several GPUs")
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.micro_batch_size = size // 2

    def _step(self, images, keep, tokens) -> torch.Tensor:
        model, batch = self.model, images.shape[0]
        size = self.micro_batch_size or batch
        self.optimizer.zero_grad(set_to_none=True)
        if size >= batch:  # the whole batch in one pass
            with self.runtime.autocast():
                image_f, text_f = self.encoders(images, keep, tokens)
                loss = self.loss_fn(image_f, text_f, model.logit_scale.exp())
            with record_function("backward"):
                loss.backward()  # under DDP: the gradients are averaged over ranks as they are computed
        else:
            parts = [slice(i, min(i + size, batch)) for i in range(0, batch, size)]
            cut = lambda part: (images[part], None if keep is None else keep[part], tokens[part])  # noqa: E731
            with torch.no_grad(), self.runtime.autocast():  # every micro-batch's features, to stand in for it
                cached = [self.encoders(*cut(part)) for part in parts]
            last = len(parts) - 1
            for i, part in enumerate(parts):
                # under DDP the gradients add up locally and are averaged over ranks in the last backward only
                sync = self.encoders.no_sync() if i < last and hasattr(self.encoders, "no_sync") \
                    else contextlib.nullcontext()
                with sync:
                    with self.runtime.autocast():
                        image_f, text_f = self.encoders(*cut(part))
                        all_image = torch.cat([image_f if j == i else c[0] for j, c in enumerate(cached)])
                        all_text = torch.cat([text_f if j == i else c[1] for j, c in enumerate(cached)])
                        scale = model.logit_scale.exp()
                        # the temperature's gradient comes from the whole loss once, not once per micro-batch (in
                        # the last pass, the one DDP averages)
                        loss = self.loss_fn(all_image, all_text, scale if i == last else scale.detach())
                    with record_function("backward"):
                        loss.backward()
        with record_function("optimizer"):
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.optimizer.step()
        with torch.no_grad():  # CLIP caps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        return self.here.mean(loss.detach())  # each rank's loss is over its rows; their mean is the batch's
