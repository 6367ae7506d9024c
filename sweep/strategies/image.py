"""Image token reduction strategies, registered by name.

A strategy takes a batch of full-resolution images and the number of image tokens to keep (class token
included), draws its random choices from the generator it is given (on the images' device), and returns the images
the vision tower sees plus, for masking strategies, the indices of the patches that enter the transformer
(row-major into the patch grid, [B, image_tokens - 1]). The class token is always kept by the encoder, so a
strategy only ever chooses ``image_tokens - 1`` patches.

Adding a strategy is one decorated function: say which token counts it can produce for a full grid of
``grid x grid`` patches, and how it reduces a batch. The trainer never changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Apply = Callable[[torch.Tensor, int, int, torch.Generator], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class ImageStrategy:
    name: str
    allowed_tokens: Callable[[int], list[int]]  # full grid side -> the image_tokens this strategy can produce
    apply: Apply  # (images [B,3,H,W], image_tokens, patch_size, generator) -> (images, keep or None)
    masks: bool  # True if it drops patches (keep indices), False if it changes the image itself


IMAGE_STRATEGIES: dict[str, ImageStrategy] = {}


def register(name: str, allowed_tokens: Callable[[int], list[int]], masks: bool):
    def wrap(fn: Apply) -> Apply:
        IMAGE_STRATEGIES[name] = ImageStrategy(name, allowed_tokens, fn, masks)
        return fn
    return wrap


def full_only(grid: int) -> list[int]:
    return [grid * grid + 1]


def any_count(grid: int) -> list[int]:
    return list(range(2, grid * grid + 2))


def square_counts(grid: int) -> list[int]:
    """side x side patches plus the class token, for side = 1 .. grid (65 px-grid 8: 2, 5, 10, 17, ..., 65)."""
    return [side * side + 1 for side in range(1, grid + 1)]


def side_of(image_tokens: int) -> int:
    side = math.isqrt(image_tokens - 1)
    assert side * side == image_tokens - 1, f"{image_tokens} tokens is not a square number of patches plus one"
    return side


@register("none", full_only, masks=False)
def none(images, image_tokens, patch_size, generator):
    return images, None


@register("random", any_count, masks=True)
def random(images, image_tokens, patch_size, generator):
    """A uniformly random subset of patches, drawn anew for every sample."""
    grid = images.shape[-1] // patch_size
    scores = torch.rand(images.shape[0], grid * grid, generator=generator, device=images.device)
    return images, scores.argsort(dim=1)[:, : image_tokens - 1].sort(dim=1).values


@register("grid", square_counts, masks=True)
def grid(images, image_tokens, patch_size, generator):
    """side x side patches on a regular lattice: evenly spaced rows and columns with a random phase per sample."""
    n, g, side = images.shape[0], images.shape[-1] // patch_size, side_of(image_tokens)
    spacing = g / side  # >= 1, so the floors below are distinct and stay inside the grid
    # in float64: in float32 a draw within 2^-23 of 1 rounds the last line up to g, outside the grid
    phase = torch.rand(n, 2, 1, generator=generator, device=images.device).double() * spacing
    lines = (phase + spacing * torch.arange(side, device=images.device, dtype=torch.float64)).floor().long()
    keep = lines[:, 0, :, None] * g + lines[:, 1, None, :]
    return images, keep.reshape(n, side * side)


@register("block", square_counts, masks=True)
def block(images, image_tokens, patch_size, generator):
    """One contiguous side x side block of patches at a random position per sample."""
    n, g, side = images.shape[0], images.shape[-1] // patch_size, side_of(image_tokens)
    corner = torch.randint(0, g - side + 1, (n, 2, 1), generator=generator, device=images.device)
    lines = corner + torch.arange(side, device=images.device)
    keep = lines[:, 0, :, None] * g + lines[:, 1, None, :]
    return images, keep.reshape(n, side * side)


@register("resize", square_counts, masks=False)
def resize(images, image_tokens, patch_size, generator):
    """The whole image, resized so that its patch grid has image_tokens - 1 patches (none dropped)."""
    size = side_of(image_tokens) * patch_size
    if size == images.shape[-1]:
        return images, None
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False), None


def reduce_images(images: torch.Tensor, strategy: str, image_tokens: int, patch_size: int,
                  generator: torch.Generator, rows: slice | None = None, batch_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the named strategy; the result feeds ``sweep.models.encode_image(model, images, keep)``.

    `images` may be `rows` of a global batch of `batch_size` (one rank's share): the masks are then drawn for the
    whole batch and the rows kept, so a sample's mask does not depend on how the batch is split over ranks."""
    chosen = IMAGE_STRATEGIES[strategy]
    if rows is None or not chosen.masks:
        return chosen.apply(images, image_tokens, patch_size, generator)
    whole = images[:1].expand(batch_size, *images.shape[1:])  # a view: masking strategies read only its shape
    _, keep = chosen.apply(whole, image_tokens, patch_size, generator)
    return images, keep[rows]
