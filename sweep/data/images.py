"""Decoding and preprocessing one image file as CLIP / open_clip does it, into uint8 [3, size, size].

Training: a random resized crop (scale 0.9-1.0 of the area, aspect 3/4-4/3, bicubic), as open_clip_train.
Evaluation: resize the shorter side to `size` and take the centre square (bicubic).
Normalisation (CLIP mean/std) happens later, on the trainer's device (`sweep.train.loop.Pixels`): shipping uint8
costs a quarter of the bytes.

Reduced-size decoding: a JPEG can be decoded at 1/2, 1/4 or 1/8 of its size for a fraction of the cost (PIL's
`draft`, the DCT scaling of libjpeg). The crop is chosen first, in fractions of the image, and the file is then
decoded at the smallest scale that still gives the crop at least DRAFT_SLACK x `size` pixels on each side (so a
draft is up-sampled by at most ~11%, the difference between a 0.9-area crop and the whole image). A 256-px JPEG
going to 64 px (the `resize` strategy at 17 tokens, patch 16) decodes at 64 px instead of 256.
"""
from __future__ import annotations

import io
import math
import random
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

# anything with uniform(low, high): random.Random (the loader's, cheap to seed per sample) or a numpy Generator
Random = Union[random.Random, np.random.Generator]

TRAIN_SCALE = (0.9, 1.0)  # open_clip_train's RandomResizedCrop scale
TRAIN_RATIO = (3 / 4, 4 / 3)
DRAFT_SLACK = 0.9


class BadImage(ValueError):
    """An image that cannot be decoded; the loader skips the sample and counts it."""


def crop_box(rng: Random | None, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) as fractions of the image: a random resized crop, or the centre square for
    `rng=None`. Sampled like torchvision's RandomResizedCrop.get_params, but from `rng`, so that a sample's crop
    is a function of its seed and not of the process that decodes it."""
    if rng is None:
        side = min(width, height)
        w, h = side / width, side / height
        return (1 - w) / 2, (1 - h) / 2, (1 + w) / 2, (1 + h) / 2
    area = width * height
    log_ratio = (math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*TRAIN_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return x / width, y / height, (x + w) / width, (y + h) / height
    return crop_box(None, width, height)  # torchvision falls back to a centre crop too


def load_image(file: bytes | str | Path, size: int, rng: Random | None = None, *,
               draft: bool = True) -> np.ndarray:
    """Decode an image (bytes or a path) to uint8 [3, size, size]: a training crop drawn from `rng`, or the
    evaluation resize + centre crop when `rng` is None. Raises BadImage for anything that cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(file) if isinstance(file, (bytes, bytearray, memoryview)) else file)
            width, height = img.size
            left, top, right, bottom = crop_box(rng, width, height)
            # the smallest DCT scale at which the crop still spans DRAFT_SLACK x `size` pixels each way (only
            # when that is at least 1/2: asking for scale 1 costs time and saves nothing)
            need = (math.ceil(DRAFT_SLACK * size / (right - left)), math.ceil(DRAFT_SLACK * size / (bottom - top)))
            if draft and img.format == "JPEG" and 2 * need[0] <= width and 2 * need[1] <= height:
                img.draft("RGB", need)
            img = img if img.mode == "RGB" else img.convert("RGB")
            sx, sy = img.size[0], img.size[1]
            img = img.resize((size, size), Image.Resampling.BICUBIC,
                             box=(left * sx, top * sy, right * sx, bottom * sy))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImage(f"{type(err).__name__}: {err}") from None
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
