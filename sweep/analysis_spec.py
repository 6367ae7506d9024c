"""A grid's `analysis:` section: the metric, stage and tolerance its sweep is read at.

    analysis:
      metric: i2t_r1     # the metric whose drop is measured
      stage: finetune    # the stage it is read at
      max_drop: 5.0      # tolerance of the minimum token length, percentage points

`sweep launch` records the section in the sweep's manifest; `sweep analyze results/<sweep>` then reads the sweep
as its grid says (a command-line option still wins), and `sweep search` judges drops at the same tolerance unless
its own section says otherwise. `check_readout` is the one check that a stage and metric are measured by a grid's
runs, shared with `sweep tune`'s objective.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sweep.config import RunConfig
from sweep.settings import ConfigError, Number, Settings, setting

STAGES = ("pretrain", "pretrain_full_length", "finetune")
EMBEDDED_METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")
DEFAULT_METRIC = "zeroshot_top1"
DEFAULT_MAX_DROP = 1.0


class AnalysisSpec(Settings):
    """A grid's `analysis:` section."""

    section = "analysis"

    metric: str = setting(DEFAULT_METRIC, "The metric whose drop is measured: zeroshot_top1, zeroshot_top5, "
                          "i2t_r1, t2i_r1, or <eval set>_<metric> of an eval set on disk (e.g. imagenet_top1).")
    stage: str | None = setting(None, "The stage it is read at: pretrain, pretrain_full_length or finetune; empty: "
                                "finetune where the runs fine-tune, else pretrain.")
    max_drop: Number = setting(DEFAULT_MAX_DROP, "Tolerance: the largest drop (percentage points of `metric`) a "
                               "token length may have and still count as tolerated.", gt=0)


def check_readout(stage: str, metric: str, base: RunConfig, where: str, source: str | Path) -> None:
    """Refuse a stage or metric that the runs of `base`'s grid do not measure (`where` prefixes the fields)."""
    if stage not in STAGES:
        raise ConfigError(f"{where}.stage", f"unknown value {stage!r}; allowed: {', '.join(STAGES)}", source)
    if stage == "finetune" and not base.finetune_samples:
        raise ConfigError(f"{where}.stage", "is finetune, but settings.finetune_samples is 0 (no fine-tune)", source)
    if stage == "pretrain_full_length" and not base.eval_full_length:
        raise ConfigError(f"{where}.stage", "is pretrain_full_length, which needs settings.eval_full_length: true",
                          source)
    known = [*(EMBEDDED_METRICS if base.eval_embedded else ()), *(f"{e.name}_" for e in base.eval_sets)]
    if not any(metric == k or (k.endswith("_") and metric.startswith(k)) for k in known):
        raise ConfigError(f"{where}.metric", f"{metric!r} is not measured by these runs; they measure: "
                          f"{', '.join(k + '<metric>' if k.endswith('_') else k for k in known)}", source)


def check_analysis(raw: Any, grid_runs: list, source: str | Path) -> AnalysisSpec:
    """The grid's validated `analysis:` section, its stage filled in (ConfigError naming `source` otherwise)."""
    spec = AnalysisSpec.from_mapping(raw if raw is not None else {}, source)
    base = grid_runs[0].config
    if spec.stage is None:
        spec = spec.model_copy(update={"stage": "finetune" if base.finetune_samples else "pretrain"})
    check_readout(spec.stage, spec.metric, base, "analysis", source)
    return spec
