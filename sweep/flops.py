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


@functools.lru_cache(maxsize=None)
def step_flops(model: str, image_strategy: str, image_tokens: int, text_tokens: int, batch: int) -> int:
    """FLOPs of one training step (forward + backward of both towers and the loss) at these lengths."""
    spec = MODELS[model]
    strategy = IMAGE_STRATEGIES[image_strategy]
    side = side_of(image_tokens) if not strategy.masks else spec.grid  # masking keeps the full image
    with torch.device("meta"):
        net = build_model(model)
        images = torch.zeros(batch, 3, side * spec.patch_size, side * spec.patch_size)
        keep = torch.zeros(batch, image_tokens - 1, dtype=torch.long) if strategy.masks else None
        text = torch.zeros(batch, text_tokens, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        loss = ClipLoss()(encode_image(net, images, keep), encode_text(net, text), net.logit_scale.exp())
        loss.backward()
    return counter.get_total_flops()
