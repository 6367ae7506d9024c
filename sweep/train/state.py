"""The training state of a run, as one object, and the one place that saves and loads it (RUN_DIR/checkpoint.pt).

No random-number state is saved: every random draw of a run (data order, masks, word choices) is a function of
(seed, stage, step), so the stage and the step are all a resume needs besides the weights and the optimizer (and,
for data streamed from files, how far each stream of the epoch has been read: `data`). On several ranks every
rank loads the same checkpoint; rank 0 writes it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sweep.results import atomic_write

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainState:
    """Where a run is and what it has measured so far."""

    stage: str | None = None
    """The stage being trained (or the last one finished)."""
    step: int = 0
    """The next step of `stage` to run; equals the stage's steps once it is finished."""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Evaluation of each finished stage (becomes the record's `metrics`)."""
    losses: dict[str, list[float]] = field(default_factory=dict)
    """Per stage, the loss of every step so far (read back from the device every `log_every` steps)."""
    compute: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per stage: train_seconds, flops_per_step, then steps and samples once finished."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation so far, in order: {stage, step, metrics} (every `eval_every` steps and at each stage's end)."""
    resumed: list[dict[str, Any]] = field(default_factory=list)
    """Where each restart picked up: {stage, step}."""
    elapsed: float = 0.0
    """Wall seconds of earlier attempts (before the latest restart)."""
    optimizer: dict | None = None
    """The optimizer state of `stage` at `step`, until the resumed stage has taken it."""
    data: list[dict[str, Any]] | None = None
    """Where each rank's training data stream of `stage` stands after `step` steps (files only; StreamedBatches)."""

    @classmethod
    def load(cls, run_dir: Path, model: torch.nn.Module) -> "TrainState":
        """The run's checkpoint (its weights go into `model`), or a fresh state when there is none."""
        path = Path(run_dir) / CHECKPOINT
        if not path.exists():
            return cls()
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved.pop("model"))
        known = {k: saved[k] for k in cls.__dataclass_fields__ if k in saved}
        if isinstance(known.get("data"), dict):  # written by a one-process run before runs had ranks
            known["data"] = [known["data"]]
        state = cls(**known)
        state.resumed.append({"stage": state.stage, "step": state.step})
        return state

    def save(self, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict,
             started: float) -> None:
        """Write the checkpoint atomically (a kill mid-write leaves the previous one whole)."""
        saved = {**asdict(self), "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config,
                 "elapsed": self.elapsed + time.time() - started}
        atomic_write(Path(run_dir) / CHECKPOINT, lambda path: torch.save(saved, path))
