"""Seeing what the model sees: sample images with the kept patches shown and the dropped ones greyed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sweep.data import synthetic
from sweep.sizes import MODELS
from sweep.strategies.image import IMAGE_STRATEGIES, reduce_images


def mask_image_grid(strategy: str, image_tokens: int, model: str = "cpu-s", samples: int = 8, seed: int = 0,
                    scale: int = 4) -> Image.Image:
    """A row of embedded-data images as the vision tower receives them under `strategy` at `image_tokens`.

    Masking strategies: dropped patches are greyed and kept ones outlined. `resize`: the resized image, shown
    at its own (smaller) size next to the original.
    """
    spec = MODELS[model]
    images, _ = synthetic.image_caption_pairs(seed, "train", 0, samples, spec.image_size)
    batch = torch.from_numpy(images).float()
    reduced, keep = reduce_images(batch, strategy, image_tokens, spec.patch_size, torch.Generator().manual_seed(seed))
    size, patch, pad = spec.image_size * scale, spec.patch_size * scale, 6 * scale
    rows = 2 if not IMAGE_STRATEGIES[strategy].masks else 1
    canvas = Image.new("RGB", (samples * (size + pad) + pad, rows * (size + pad) + pad), (255, 255, 255))
    for i in range(samples):
        x0 = pad + i * (size + pad)
        original = Image.fromarray(images[i].transpose(1, 2, 0)).resize((size, size), Image.NEAREST)
        if keep is not None:
            shown = np.asarray(original).copy()
            kept = set(keep[i].tolist())
            grid = spec.grid
            for p in range(grid * grid):
                if p not in kept:
                    r, c = divmod(p, grid)
                    block = shown[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                    block[:] = (0.3 * block + 0.7 * 160).astype(np.uint8)  # grey veil, content still faintly there
            tile = Image.fromarray(shown)
            draw = ImageDraw.Draw(tile)
            for p in kept:
                r, c = divmod(p, grid)
                draw.rectangle((c * patch, r * patch, (c + 1) * patch - 1, (r + 1) * patch - 1), outline=(255, 255, 0))
            canvas.paste(tile, (x0, pad))
        else:
            canvas.paste(original, (x0, pad))
            small = reduced[i].clamp(0, 255).byte().numpy().transpose(1, 2, 0)
            side = small.shape[0] * scale
            canvas.paste(Image.fromarray(small).resize((side, side), Image.NEAREST),
                         (x0 + (size - side) // 2, 2 * pad + size + (size - side) // 2))
    return canvas


def save_mask_image(out: str | Path, **kwargs) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mask_image_grid(**kwargs).save(out)
    return out
