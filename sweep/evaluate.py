"""Zero-shot classification and image-text retrieval, at the token lengths of the stage being evaluated: on the
embedded sets in memory (`zeroshot`, `retrieval`) and on sets on disk (`evaluate_on_disk`).

Both run the model through the same reduction as training (strategy and token counts of the stage), with a fixed
generator so that random masks at evaluation are the same for every run of a seed.
"""
from __future__ import annotations

from typing import Callable

import torch

from sweep.data.evalsets import (RetrievalSet, ZeroshotSet, image_batches, retrieval_metrics,
                                 zeroshot_metrics)
from sweep.models import encode_image, encode_text

ImageFeatures = Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> normalised features
TextFeatures = Callable[[list[str]], torch.Tensor]  # captions -> normalised features


def _batched(fn, items, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(items[i:i + batch_size]) for i in range(0, len(items), batch_size)])


@torch.no_grad()
def zeroshot(image_features: ImageFeatures, text_features: TextFeatures, images: torch.Tensor,
             labels: torch.Tensor, classnames: tuple[str, ...], templates: tuple[str, ...],
             batch_size: int = 256) -> dict[str, float]:
    """Top-1/top-5 (percent) against class embeddings averaged over prompt templates, as CLIP does."""
    classes = class_features(text_features, classnames, templates)
    features = _batched(image_features, images, batch_size)
    found = zeroshot_metrics(features, torch.ones(len(features), dtype=torch.bool), labels, classes)
    return {"zeroshot_top1": found["top1"], "zeroshot_top5": found["top5"], "zeroshot_classes": found["classes"]}


@torch.no_grad()
def class_features(text_features: TextFeatures, classnames: tuple[str, ...], templates: tuple[str, ...]
                   ) -> torch.Tensor:
    """Normalised class embeddings [C, D]: each class's prompts over all templates, averaged, as CLIP does."""
    per_template = [text_features([t.replace("{}", c) for c in classnames]) for t in templates]
    return torch.nn.functional.normalize(torch.stack(per_template).mean(0), dim=-1)


@torch.no_grad()
def retrieval(image_features: ImageFeatures, text_features: TextFeatures, images: torch.Tensor,
              captions: list[str], batch_size: int = 256) -> dict[str, float]:
    """Recall@1 (percent) of the paired caption among all captions, and of the paired image among all images."""
    sim = _batched(image_features, images, batch_size) @ _batched(text_features, captions, batch_size).T
    target = torch.arange(len(captions))
    return {
        "i2t_r1": 100.0 * (sim.argmax(dim=1) == target).float().mean().item(),
        "t2i_r1": 100.0 * (sim.argmax(dim=0) == target).float().mean().item(),
    }


@torch.no_grad()
def evaluate_on_disk(image_features: ImageFeatures, text_features: TextFeatures,
                     eval_set: ZeroshotSet | RetrievalSet, image_size: int, workers: int) -> dict[str, float]:
    """An evaluation set on disk: its images decoded by `workers` processes and encoded batch by batch (a set
    never sits in memory as pixels), then zero-shot or retrieval metrics (sweep.data.evalsets). ValueError when
    none of its images decodes: its metrics would be NaN, and wrong paths or files would pass for a result."""
    features, decoded = [], []
    for images, ok in image_batches(eval_set.images, image_size, workers):
        features.append(image_features(images))
        decoded.append(ok)
    images, ok = torch.cat(features), torch.cat(decoded)
    if not ok.any():
        raise ValueError(f"evaluation set {eval_set.source}: none of its {len(ok)} images can be read and decoded")
    if isinstance(eval_set, ZeroshotSet):
        classes = class_features(text_features, eval_set.classnames, eval_set.templates)
        return zeroshot_metrics(images, ok, eval_set.labels, classes)
    captions = _batched(text_features, eval_set.captions, 256)
    found = retrieval_metrics(images, ok, captions, eval_set.caption_image)
    found["skipped"] += eval_set.unusable
    return found


def feature_fns(model, to_input: Callable[[torch.Tensor], torch.Tensor], reduce_images: Callable,
                reduce_text: Callable, seed: int, device: torch.device | str = "cpu"
                ) -> tuple[ImageFeatures, TextFeatures]:
    """Feature functions that apply the stage's reductions with generators fixed by ``seed``. The model runs on
    `device` (masks are drawn there); features come back as fp32 on the CPU, where the metrics are counted."""
    image_gen = torch.Generator(device).manual_seed(seed)
    text_gen = torch.Generator().manual_seed(seed + 1)

    def image_features(uint8_images: torch.Tensor) -> torch.Tensor:
        images, keep = reduce_images(to_input(uint8_images), image_gen)
        return encode_image(model, images, keep).float().cpu()

    def text_features(captions: list[str]) -> torch.Tensor:
        return encode_text(model, reduce_text(captions, text_gen).to(device)).float().cpu()

    return image_features, text_features
