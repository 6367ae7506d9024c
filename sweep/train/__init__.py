"""The trainer: one run from its config to its result record.

    loop.py     the run, top to bottom (read this first)
    step.py     one optimizer step: device, precision, compilation, micro-batches with the loss over the batch
    state.py    the training state and its checkpoint
    signals.py  SIGTERM/SIGUSR2 -> checkpoint and stop; the heartbeat
    distributed.py  one run on several processes (torchrun, multi-task Slurm jobs): ranks, DDP, one writer

Files in the run directory:
    config.yaml          the fully resolved RunConfig (a rerun with other scientific settings is refused)
    checkpoint.pt        the latest resumable state, replaced atomically every `checkpoint_every` steps and on
                         SIGTERM / SIGUSR2
    model.pt             final weights, an open_clip state dict (see `load_trained_model`)
    result.json          the result record (sweep/record.py, docs/results.md), written atomically once the run
                         has ended (completed, failed, or pruned by an Optuna trial's pruner)
    heartbeat            touched every 10 s while the run is alive (read by `sweep status`)
    .lock                held (flock) by the one process training the run (rank 0 of a run on several)
"""
from sweep.train.loop import Diverged, Pixels, Pruned, Report, check_run_dir, generator, load_trained_model, run
from sweep.train.signals import Interrupted
from sweep.train.state import TrainState
from sweep.train.step import ContrastiveStep, Runtime, lr_at, make_optimizer

__all__ = ["ContrastiveStep", "Diverged", "Interrupted", "Pixels", "Pruned", "Report", "Runtime", "TrainState",
           "check_run_dir", "generator", "load_trained_model", "lr_at", "make_optimizer", "run"]
