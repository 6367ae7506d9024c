"""Synthetic sweep results drawn from known drop curves.

Used by the tests, the notebook test and the benchmark, and handy for trying the analysis before any run exists:
the true minimum token length of every (model, axis, strategy) is known in closed form (`true_min_tokens`), so an
analysis of the generated table can be checked against it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .fit import crossing_tokens, drop_curve

CPU_MODELS = {"cpu-s": 1.2e6, "cpu-m": 4.8e6, "cpu-l": 19.0e6}
FULL_IMAGE_TOKENS, FULL_TEXT_TOKENS = 65, 32
IMAGE_TOKENS = (50, 37, 26, 17, 10, 5)
TEXT_TOKENS = (16, 8, 6, 4)
IMAGE_STRATEGIES = ("random", "grid", "block", "resize")
TEXT_STRATEGIES = ("truncation", "random", "block", "syntax")
_STRATEGY_SCALE = {
    ("image", "resize"): 0.5, ("image", "grid"): 0.8, ("image", "random"): 1.0, ("image", "block"): 1.5,
    ("text", "syntax"): 0.6, ("text", "truncation"): 1.0, ("text", "block"): 1.1, ("text", "random"): 1.3,
}
_SHAPE = {"image": 1.4, "text": 1.1}


def true_curve(params: float, axis: str, strategy: str, stage: str = "pretrain") -> tuple[float, float]:
    """(a, b) of the generating `analysis.fit.drop_curve`: bigger models drop less (the inverse scaling law)."""
    a = 0.8 * _STRATEGY_SCALE.get((axis, strategy), 1.0) * (params / 1e6) ** -0.4
    if stage == "finetune":
        a *= 0.4
    return a, _SHAPE[axis]


def true_min_tokens(models: dict[str, float] = CPU_MODELS, max_drop: float = 1.0, stage: str = "pretrain",
                    image_strategies=IMAGE_STRATEGIES, text_strategies=TEXT_STRATEGIES) -> pd.DataFrame:
    """The exact crossing of each generating curve with ``max_drop``."""
    rows = []
    for model, params in models.items():
        for axis, strategies, full in (("image", image_strategies, FULL_IMAGE_TOKENS),
                                       ("text", text_strategies, FULL_TEXT_TOKENS)):
            for strategy in strategies:
                a, b = true_curve(params, axis, strategy, stage)
                rows.append({"model": model, "axis": axis, "strategy": strategy, "a": a, "b": b,
                             "true_min_tokens": float(crossing_tokens(full, a, b, max_drop))})
    return pd.DataFrame(rows)


def make_table(
    models: dict[str, float] = CPU_MODELS,
    seeds: int = 3,
    noise: float = 0.3,
    stages: tuple[str, ...] = ("pretrain", "finetune"),
    image_strategies: tuple[str, ...] = IMAGE_STRATEGIES,
    text_strategies: tuple[str, ...] = TEXT_STRATEGIES,
    image_tokens: tuple[int, ...] = IMAGE_TOKENS,
    text_tokens: tuple[int, ...] = TEXT_TOKENS,
    random_state: int = 0,
) -> pd.DataFrame:
    """A flat result table (the columns of docs/results.md plus compute) with Gaussian seed noise of ``noise``
    points."""
    rng = np.random.default_rng(random_state)
    cells = []
    for model, params in models.items():
        full_acc = 45 + 8 * np.log10(params / 1e5)
        configs = [("full", "none", FULL_IMAGE_TOKENS, "none", FULL_TEXT_TOKENS, 0.0)]
        configs += [("image", s, t, "none", FULL_TEXT_TOKENS, t) for s in image_strategies for t in image_tokens]
        configs += [("text", "none", FULL_IMAGE_TOKENS, s, t, t) for s in text_strategies for t in text_tokens]
        for stage in stages:
            for axis, img_s, img_t, txt_s, txt_t, t in configs:
                if axis == "full":
                    drop = 0.0
                else:
                    a, b = true_curve(params, axis, img_s if axis == "image" else txt_s, stage)
                    drop = float(drop_curve(np.float64(t), FULL_IMAGE_TOKENS if axis == "image" else FULL_TEXT_TOKENS,
                                            a, b))
                acc = full_acc + (3.0 if stage == "finetune" else 0.0) - drop
                flops = 6 * params * (img_t + txt_t) * 1e6
                cells.append((model, params, img_s, img_t, txt_s, txt_t, stage, acc, flops))
    base = pd.DataFrame(cells, columns=["model", "params", "image_strategy", "image_tokens", "text_strategy",
                                        "text_tokens", "stage", "mean", "train_flops"])
    df = base.loc[base.index.repeat(seeds)].reset_index(drop=True)
    df["seed"] = np.tile(np.arange(seeds), len(base))
    df["zeroshot_top1"] = np.clip(df.pop("mean") + rng.normal(0, noise, len(df)), 0, 100)
    df["zeroshot_top5"] = np.clip(df["zeroshot_top1"] + 20, 0, 100)
    df["samples_seen"] = 1_000_000
    df["wall_seconds"] = df["train_flops"] / 1e12
    return df[["model", "params", "image_strategy", "image_tokens", "text_strategy", "text_tokens", "seed", "stage",
               "zeroshot_top1", "zeroshot_top5", "train_flops", "samples_seen", "wall_seconds"]]


def write_result_files(table: pd.DataFrame, root: str | Path, sweep: str = "synthetic") -> list[Path]:
    """Write ``table`` as one ``<root>/<sweep>/<run_id>/result.json`` per run (both stages in one record)."""
    root = Path(root)
    paths = []
    keys = ["model", "image_strategy", "image_tokens", "text_strategy", "text_tokens", "seed"]
    for values, run in table.groupby(keys, sort=False):
        settings = dict(zip(keys, values))
        run_id = "{model}-{image_strategy}{image_tokens}-{text_strategy}{text_tokens}-s{seed}".format(**settings)
        first = run.iloc[0]
        record = {
            "run_id": run_id, "sweep": sweep, "status": "completed", "error": None,
            **{k: (v.item() if hasattr(v, "item") else v) for k, v in settings.items()},
            "params": float(first["params"]),
            "metrics": {
                row.stage: {"zeroshot_top1": float(row.zeroshot_top1), "zeroshot_top5": float(row.zeroshot_top5),
                            "i2t_r1": float(row.zeroshot_top1) / 2, "t2i_r1": float(row.zeroshot_top1) / 2,
                            "zeroshot_classes": 10}
                for row in run.itertuples()
            },
            "compute": {"samples_seen": int(first["samples_seen"]), "train_flops": float(first["train_flops"]),
                        "wall_seconds": float(first["wall_seconds"]), "samples_per_second": 1000.0},
            "config": {}, "versions": {},
        }
        path = root / sweep / run_id / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
        paths.append(path)
    return paths
