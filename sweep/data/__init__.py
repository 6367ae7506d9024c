"""Datasets for the trainer.

- The embedded synthetic data (`synthetic.py`): ``load_data`` returns its training pool and its held-out zero-shot
  and retrieval sets as tensors in memory. Rendered pools are cached on disk (``$SWEEP_CACHE_DIR`` or
  ``~/.cache/inverse-scaling-sweep``) so that the runs of a sweep render each scene once, not once per run.
- Files (`sources.py`, `stream.py`): webdataset shards or a CSV table, streamed through loader workers
  (`StreamedBatches`), with an exact resume; a GPU run receives them in a thread of its own (`Prefetched`).
- Evaluation sets on disk (`evalsets.py`): ImageNet-style folders for zero-shot, caption tables or shards for
  retrieval.
- `generate.py` writes the synthetic data as such files (`sweep make-data`), for tests and demos.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from sweep.data import synthetic
from sweep.settings import cache_dir

CACHE_VERSION = 1  # bump when rendering or captions change, so stale caches are never read


@dataclass
class Data:
    train_images: torch.Tensor | None  # uint8 [N, 3, H, W]; None when the run trains on files
    train_captions: list[str] | None
    zeroshot_images: torch.Tensor  # uint8 [M, 3, H, W]
    zeroshot_labels: torch.Tensor  # int64 [M], index into classnames
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    retrieval_images: torch.Tensor  # uint8 [R, 3, H, W]
    retrieval_captions: list[str]


def _cached(name: str, key: dict, make) -> tuple[np.ndarray, list]:
    """``make()`` -> (uint8 array, list of str), memoised on disk; safe when several runs fill it at once."""
    digest = hashlib.sha256(json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "synthetic" / f"{name}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return f["images"], f["strings"].tolist()
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt below
    images, strings = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, images=images, strings=np.array(strings, dtype=str))
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    return images, strings


@functools.lru_cache(maxsize=1)  # the runs of a local worker share one copy (nothing writes to it)
def load_data(dataset: str, data_seed: int, train_scenes: int, image_size: int,
              zeroshot_samples: int, retrieval_samples: int) -> Data:
    """The embedded data; with a dataset on files, only its evaluation sets (the training pool is streamed)."""
    key = {"seed": data_seed, "size": image_size}
    train = (None, None)
    if dataset == "synthetic":
        train = _cached("train", {**key, "n": train_scenes},
                        lambda: synthetic.image_caption_pairs(data_seed, "train", 0, train_scenes, image_size))
    ret = _cached("retrieval", {**key, "n": retrieval_samples},
                  lambda: synthetic.image_caption_pairs(data_seed, "retrieval", 0, retrieval_samples, image_size))
    zs_images, zs_labels = synthetic.zeroshot_set(data_seed, zeroshot_samples, image_size)
    return Data(
        train_images=None if train[0] is None else torch.from_numpy(np.ascontiguousarray(train[0])),
        train_captions=None if train[1] is None else list(train[1]),
        zeroshot_images=torch.from_numpy(zs_images), zeroshot_labels=torch.from_numpy(zs_labels),
        classnames=synthetic.CLASSNAMES, templates=synthetic.TEMPLATES,
        retrieval_images=torch.from_numpy(np.ascontiguousarray(ret[0])), retrieval_captions=list(ret[1]),
    )
