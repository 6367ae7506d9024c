"""One run on several processes (GPUs, nodes): rank, world size, the process group and the few messages ranks
exchange.

A run is distributed when it is started with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): by `torchrun`, or by `sweep launch` for a multi-task Slurm job (which exports them from submitit's
job environment). Without them it is one process and nothing here communicates.

What a run on N processes shares and splits (its science does not depend on N):
- the global batch `batch_size` is split into N equal, contiguous rank batches; a rank loads only its own rows
  (embedded data) or its own streams (files);
- every random choice of a step (masks, words) is drawn for the whole global batch and each rank keeps its rows;
- the contrastive loss is over the global batch: every rank's features are gathered with their gradients (open_clip's
  ClipLoss with local_loss and gather_with_grad) and DDP averages the gradients, so the update is the one-process
  update of the same batch;
- rank 0 is the one writer (lock, heartbeat, checkpoints, model.pt, result.json) and the one evaluator; the other
  ranks wait for it. Every rank resumes from the same checkpoint.
NCCL carries the tensors on GPUs, gloo on CPUs; the small messages (a signal, a data position, the metrics) always go
over gloo, so they never wait for the GPU.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

# How long a rank waits for the others, e.g. while rank 0 evaluates on a large set or writes a checkpoint.
TIMEOUT = timedelta(minutes=60)
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankZeroFailed(RuntimeError):
    """What the other ranks raise when rank 0 failed at work it does alone (rank 0 records why)."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run; `Distributed()` is the one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    grouped: bool = False  # a process group exists (also for a world of 1 under torchrun)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch."""
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (any picklable object)."""
        if not self.grouped:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=_control())
        return box[0]

    def on_main(self, work: Callable[[], Any]) -> Any:
        """`work()` on rank 0 alone, its result there (None on the others); a failure is raised on every rank,
        which would otherwise wait for rank 0 at their next collective and fall out of step with it."""
        result, failure = None, None
        if self.main:
            try:
                result = work()
            except Exception as err:  # noqa: BLE001 - raised again below, on every rank
                failure = err
        why = self.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if why is not None:
            raise RankZeroFailed(f"rank 0 failed: {why}")
        return result

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.grouped:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=_control())
        return out

    def largest(self, value: int) -> int:
        """The largest of the ranks' values (e.g. a signal received by any rank)."""
        if not self.grouped:
            return value
        box = torch.tensor([value])
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_control())
        return int(box.item())

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of a device tensor over ranks (queued on the device, nothing read back)."""
        if not self.grouped:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.world_size

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier(group=_control())


_CONTROL: list[Any] = []  # the gloo group of the small messages (the default group itself when that is gloo)


def _control():
    return _CONTROL[0] if _CONTROL else None


def join(device_type: str) -> Distributed:
    """This process's place, joining the run's process group (once per process) when torchrun's variables say
    it is one of several; `device_type` picks the backend (cuda: NCCL, cpu: gloo)."""
    if "WORLD_SIZE" not in os.environ:
        return Distributed()
    missing = [name for name in ENV if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes with "
                           "torchrun or a multi-task Slurm job (sweep launch --tasks-per-node)")
    here = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                       grouped=True)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_device(here.local_rank))
        dist.init_process_group(backend, timeout=TIMEOUT)
        _CONTROL[:] = [dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else None]
    return here


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process of the run is gone (killed, out of
    memory, its node lost): not a fault of the run, which keeps its checkpoint and resumes on a relaunch."""
    return isinstance(err, dist.DistError) or "gloo/transport" in str(err) or "NCCL" in str(err)


def local_device(local_rank: int) -> torch.device:
    """The GPU of a rank on its node: one GPU per task; a task that sees all the node's GPUs (torchrun, or Slurm
    without GPU binding) takes the one of its local rank."""
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def wrap(module: torch.nn.Module, here: Distributed, device: torch.device) -> torch.nn.Module:
    """`module` as DDP (gradients averaged over ranks in the backward pass), or itself for one process."""
    if not here.grouped:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # open_clip's ClipLoss gathers with torch's older all_gather (deprecated, still exact with gradients): its
    # FutureWarning would only be noise in every rank's log
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)
