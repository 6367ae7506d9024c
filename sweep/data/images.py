"""Decoding and preprocessing one image file as CLIP / open_clip does it, into uint8 [size, size, 3].

Training: a random resized crop (scale 0.9-1.0 of the area, aspect 3/4-4/3, bicubic), as open_clip_train.
Evaluation: resize the shorter side to `size` and take the centre square (bicubic).
Images stay channels-last here, as decoders give them: a loader stacks a batch and makes it channels-first once
(one copy per batch instead of one per image). Normalisation (CLIP mean/std) happens later, on the trainer's device
(`sweep.train.loop.Pixels`): shipping uint8 costs a quarter of the bytes.

JPEGs are decoded by simplejpeg (libjpeg-turbo without PIL's per-file Python: 20 us instead of 65 us for a 64-px
file; the same pixels, bit for bit), other formats (and any JPEG simplejpeg refuses) by PIL; the crop's resample is
PIL's either way.

Reduced-size decoding: a JPEG can be decoded at 1/2, 1/4 or 1/8 of its size for a fraction of the cost (the DCT
scaling of libjpeg, PIL's `draft`). The crop is chosen first, in fractions of the image, and the file is then
decoded at the smallest scale that still gives the crop at least DRAFT_SLACK x `size` pixels on each side (so a
draft is up-sampled by at most ~11%, the difference between a 0.9-area crop and the whole image). A 256-px JPEG
going to 64 px (the `resize` strategy at 17 tokens, patch 16) decodes at 64 px instead of 256.

Decoding on the trainer's device (the setting `decode: device`): a loader worker only checks a JPEG and draws its
crop (`jpeg_crop`: ~0.28 ms for a 31-KiB 256-px photo instead of ~1.5 ms to decode and resample it at 224 px,
benchmarks/decode_speed.py) and hands over the file instead of 150 KB of pixels; the trainer decodes a batch of
files at once (`decode_crops`: nvJPEG on a CUDA device). The check decodes the whole file with libjpeg at 1/8 scale,
so a sample is usable or skipped exactly as when workers decode it; only the resample differs (roi_align's, see
`decode_crops`).
"""
from __future__ import annotations

import io
import math
import random
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

# anything with uniform(low, high): random.Random (the loader's, cheap to seed per sample) or a numpy Generator
Random = Union[random.Random, np.random.Generator]

MIN_CROP_SCALE = 0.9  # open_clip_train's RandomResizedCrop scale is (0.9, 1): the min_crop_scale setting's default
TRAIN_RATIO = (3 / 4, 4 / 3)
DRAFT_SLACK = 0.9
ROI_IMAGES = 256  # decoded images resampled at once on a device: 256 256-px images are 200 MB as floats


class BadImage(ValueError):
    """An image that cannot be decoded; the loader skips the sample and counts it."""


def crop_box(rng: Random | None, width: int, height: int, min_crop_scale: float = MIN_CROP_SCALE
             ) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) as fractions of the image: a random resized crop covering between `min_crop_scale`
    and all of its area, or the centre square for `rng=None`. Sampled like torchvision's
    RandomResizedCrop.get_params, but from `rng`, so that a sample's crop is a function of its seed and not of the
    process that decodes it."""
    if rng is None:
        side = min(width, height)
        w, h = side / width, side / height
        return (1 - w) / 2, (1 - h) / 2, (1 + w) / 2, (1 + h) / 2
    area = width * height
    log_ratio = (math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(min_crop_scale, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return x / width, y / height, (x + w) / width, (y + h) / height
    return crop_box(None, width, height)  # torchvision falls back to a centre crop too


def draft_need(box: tuple[float, float, float, float], size: int) -> tuple[int, int]:
    """The pixels each way that the crop `box` must span in a draft: DRAFT_SLACK x `size`."""
    left, top, right, bottom = box
    return math.ceil(DRAFT_SLACK * size / (right - left)), math.ceil(DRAFT_SLACK * size / (bottom - top))


def draft_scale(width: int, height: int, need: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) PIL's `draft` picks for `need`: the largest that keeps it."""
    fits = min(width // need[0], height // need[1])
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def load_image(file: bytes | str | Path, size: int, rng: Random | None = None, *, draft: bool = True,
               min_crop_scale: float = MIN_CROP_SCALE) -> np.ndarray:
    """Decode an image (bytes or a path) to uint8 [size, size, 3]: a training crop drawn from `rng` (`crop_box`),
    or the evaluation resize + centre crop when `rng` is None. Raises BadImage for anything that cannot be decoded."""
    try:
        data = bytes(file) if isinstance(file, (bytes, bytearray, memoryview)) else Path(file).read_bytes()
        img = None
        try:
            height, width, colours, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # not a JPEG
            colours = None
        if colours in ("YCbCr", "Gray"):  # simplejpeg converts CMYK/YCCK its own way: PIL's way is kept
            if width * height > Image.MAX_IMAGE_PIXELS:  # PIL's decompression-bomb limit, as for other formats
                raise Image.DecompressionBombWarning(f"{width * height} pixels, over {Image.MAX_IMAGE_PIXELS}")
        else:
            img = _open(data)
            width, height = img.size
        box = crop_box(rng, width, height, min_crop_scale)
        need = draft_need(box, size)
        scale = draft_scale(width, height, need) if draft else 1
        if img is None:
            try:  # libjpeg picks the smallest scale M/8 whose output reaches these: exactly 1/scale, as PIL's draft
                img = Image.fromarray(simplejpeg.decode_jpeg(data, "RGB", min_width=math.ceil(width / scale),
                                                             min_height=math.ceil(height / scale)))
            except ValueError:  # damaged: PIL decodes what it can, or says why not
                img = _open(data)
        if img.format == "JPEG" and scale > 1:
            img.draft("RGB", need)
        img = img if img.mode == "RGB" else img.convert("RGB")
        left, top, right, bottom = box
        sx, sy = img.size
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left * sx, top * sy, right * sx, bottom * sy))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadImage(f"{type(err).__name__}: {err}") from None
    return np.asarray(img)


def jpeg_crop(data: bytes, rng: Random, min_crop_scale: float = MIN_CROP_SCALE
              ) -> tuple[float, float, float, float] | None:
    """The training crop (left, top, right, bottom, in pixels) of a JPEG that `decode_crops` can decode later, drawn
    from `rng` as `load_image` draws it; None for a file `load_image` must handle: not a YCbCr or grey JPEG, over
    PIL's pixel limit, or damaged. Damage is found as `load_image` finds it: libjpeg decodes the whole file, at 1/8
    scale (the entropy-coded data is read in full at any scale)."""
    try:
        height, width, colours, _ = simplejpeg.decode_jpeg_header(data)
        if colours not in ("YCbCr", "Gray") or width * height > Image.MAX_IMAGE_PIXELS:
            return None
        simplejpeg.decode_jpeg(data, "RGB", min_width=math.ceil(width / 8), min_height=math.ceil(height / 8))
    except ValueError:
        return None
    left, top, right, bottom = crop_box(rng, width, height, min_crop_scale)
    return left * width, top * height, right * width, bottom * height


def decode_crops(files: list[torch.Tensor], boxes: torch.Tensor, size: int,
                 device: torch.device | str) -> torch.Tensor:
    """JPEG files (1-D uint8 tensors in host memory) decoded on `device` (nvJPEG on a CUDA device, libjpeg-turbo on
    the CPU), and the crop `boxes[i]` (pixels, from `jpeg_crop`) of each resampled to size x size: uint8
    [len(files), 3, size, size] on `device`.

    The resample is roi_align's: bilinear samples, ceil(crop side / size) of them each way averaged into an output
    pixel (an area filter when shrinking, hence no aliasing at 64 px). Against PIL's bicubic in `load_image` the
    pixels differ by 0.16 levels on average at 224 px and 0.46 at 64 px (synthetic scenes, 256-px files).

    On a CUDA device the work runs on a stream of its own, and the calling thread (the loader's, not the training
    step's) waits for it: torchvision's decoder allocates its outputs on the caller's stream but writes them from
    another stream without waiting, and nvJPEG's hardware decoder ignores queued work. On the training step's
    stream it could be handed, and overwrite, memory that the step's queued kernels still read (torchvision pull
    request 9606, fixed in TorchCodec's decoder only; `benchmarks/decode_speed.py` checks it); on a stream with
    nothing queued there is nothing to overwrite. The result is then marked as read by the device's default
    stream (the training step's), so that its memory is not reused for a later batch while the step may read it."""
    device = torch.device(device)
    if device.type != "cuda":
        return _decode_crops(files, boxes, size, device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    stream = _STREAMS[device]
    with torch.cuda.device(device), torch.cuda.stream(stream):
        out = _decode_crops(files, boxes, size, device)
    stream.synchronize()  # the batch is whole, and the stream idle for the next call's decoder
    out.record_stream(torch.cuda.default_stream(device))
    return out


_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}  # decode_crops' stream on each CUDA device


def _decode_crops(files: list[torch.Tensor], boxes: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    try:
        decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # a file the device's decoder refuses fails the batch: one at a time, then PIL
        decoded = [_decode_one(file, device) for file in files]
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(decoded):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for group in by_shape.values():  # images of one shape are resampled together
        for first in range(0, len(group), ROI_IMAGES):
            part = group[first:first + ROI_IMAGES]
            images = torch.stack([decoded[i] for i in part]).float()
            rois = torch.cat([torch.arange(len(part), dtype=torch.float32).unsqueeze(1),
                              boxes[part].float()], dim=1).to(device)
            crops = roi_align(images, rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            out[torch.tensor(part, device=device)] = crops.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _decode_one(file: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(file, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # libjpeg decoded it in the worker (jpeg_crop): so does PIL's
        image = Image.open(io.BytesIO(file.numpy().tobytes())).convert("RGB")
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(device)
