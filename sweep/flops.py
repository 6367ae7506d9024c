"""Training FLOPs of one step, counted exactly from shapes.

torch's FlopCounterMode counts matrix multiplies and convolutions, forward and backward. It is run on the `meta`
device (no memory, no arithmetic): there attention decomposes into the matrix multiplies it is made of, whereas
on CPU the fused attention kernel is not counted at all. The trainer, `sweep plan` and the benchmarks all use
this one count.
"""
from __future__ import annotations

import functools

import torch
from open_clip.loss import ClipLoss
from torch.utils.flop_counter import FlopCounterMode

from sweep.models import MODELS, build_model, encode_image, encode_text
from sweep.strategies.image import IMAGE_STRATEGIES, side_of


def step_flops(model: str, image_strategy: str, image_tokens: int, text_tokens: int, batch: int) -> int:
    """FLOPs of one training step (forward + backward of both towers and the loss) at these lengths.

    Each tower costs the same per sample whatever the batch and the other tower; the loss's B x B similarities
    do not: each part is counted once (a tower at one sample per model and shape, the loss per width and batch) and
    the parts are added, which is exactly the count of the whole step and keeps `sweep plan` of a large grid fast."""
    return batch * sum(tower_flops(model, image_strategy, image_tokens, text_tokens)) + _loss_flops(model, batch)


def tower_flops(model: str, image_strategy: str, image_tokens: int, text_tokens: int) -> tuple[int, int]:
    """FLOPs of one sample through the vision tower and through the text tower, forward and backward."""
    strategy = IMAGE_STRATEGIES[image_strategy]
    side = side_of(image_tokens) if not strategy.masks else MODELS[model].grid  # masking keeps the full image
    kept = image_tokens - 1 if strategy.masks else None
    return _vision_flops(model, side, kept), _text_flops(model, text_tokens)


@functools.lru_cache(maxsize=None)
def _vision_flops(model: str, side: int, kept: int | None) -> int:
    """One sample through the vision tower, forward and backward: `side` x `side` patches, `kept` of them masked
    in (None: all)."""
    patch = MODELS[model].patch_size
    with torch.device("meta"):
        net = build_model(model)
        images = torch.zeros(1, 3, side * patch, side * patch)
        keep = torch.zeros(1, kept, dtype=torch.long) if kept is not None else None
    with FlopCounterMode(display=False) as counter:
        encode_image(net, images, keep).sum().backward()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def _text_flops(model: str, text_tokens: int) -> int:
    with torch.device("meta"):
        net = build_model(model)
        text = torch.zeros(1, text_tokens, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        encode_text(net, text).sum().backward()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def _loss_flops(model: str, batch: int) -> int:
    width = MODELS[model].config["embed_dim"]
    with torch.device("meta"):
        image = torch.zeros(batch, width, requires_grad=True)
        text = torch.zeros(batch, width, requires_grad=True)
        scale = torch.zeros((), requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ClipLoss()(image, text, scale.exp()).backward()
    return counter.get_total_flops()
