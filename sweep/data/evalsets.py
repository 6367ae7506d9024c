"""Evaluation sets on disk: zero-shot classification folders and image-text retrieval sets.

- `zeroshot`: an ImageNet-style folder, `<class>/<image files>`; classes in sorted folder order. Class names are
  the folder names (`_` read as a space; folders named by WordNet ids are refused: they need names), or one per
  line from a file, or open_clip's ImageNet names
  (`zeroshot_classnames: imagenet`: a folder of 1000 classes is taken in the standard sorted-wnid order, a smaller
  folder must name its classes with ImageNet class names, as `folder_name` writes them). Prompt templates
  likewise: a file of lines with `{}` once, or `imagenet` (open_clip's 80 OpenAI templates, the default with
  ImageNet names). A prompt is its template with `{}` replaced by the class name, every other character as written
  (braces included: a template is no format string).
- `retrieval`: a CSV/TSV with one row per (image, caption), several rows per image (COCO/Flickr style), every
  row with its caption and an image file that exists; or webdataset shards whose samples carry several captions
  (`.txt` one per line, or `.json` `captions`), where a sample with no image or no caption is left out and
  counted (`<name>_skipped`).

Images are decoded with the evaluation transform (resize + centre crop) at the model's full resolution, in loader
workers, batch by batch: a set never has to fit in memory. An image that does not decode is left out of its set
and counted (`<name>_skipped`); a set none of whose images decodes is an error (`sweep.evaluate`), not a metric.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch.utils.data import DataLoader, Dataset

from sweep.data.images import BadImage, load_image
from sweep.data.sources import expand_paths, is_shard, read_shard, read_table
from sweep.data.stream import worker_init

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGENET_TEMPLATES = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class ZeroshotSet:
    images: list[str]  # paths
    labels: torch.Tensor  # int64 [N], index into classnames
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    source: str = ""  # the folder, for a message


@dataclass
class RetrievalSet:
    images: list[bytes | str]  # file bytes (shards) or paths (tables)
    captions: list[str]
    caption_image: torch.Tensor  # int64 [T]: the image each caption describes
    unusable: int = 0  # samples of shards left out for want of an image or a caption (counted in `skipped`)
    source: str = ""  # the `data` setting, for a message


def _lines(path: str) -> tuple[str, ...]:
    lines = tuple(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise ValueError(f"{path} is empty")
    return lines


def folder_name(classname: str) -> str:
    """The folder a class's images sit in: spaces as `_`, and the `/` of five of open_clip's ImageNet names
    ('baluster / handrail') as `or`, which a path cannot hold. Folders are matched to ImageNet names through it."""
    return re.sub(r"\s*/\s*", " or ", classname).replace(" ", "_")


def _image_files(folder: Path) -> list[str]:
    """The images under a class folder, in subfolders too (as torchvision's ImageFolder reads them), hidden files
    and folders left out; sorted."""
    files = []
    for directory, folders, names in os.walk(folder, followlinks=True):
        folders[:] = [f for f in folders if not f.startswith(".")]
        files += [os.path.join(directory, f) for f in names
                  if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    return sorted(files)


def read_zeroshot(folder: str, classnames: str | None = None, templates: str | None = None) -> ZeroshotSet:
    """An ImageNet-style folder; ValueError naming what is wrong."""
    root = Path(folder)
    # hidden folders (.ipynb_checkpoints, macOS's) are no classes
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{folder} has {len(classes)} class folders; zero-shot needs at least 2")
    if classnames == "imagenet":
        if len(classes) == len(IMAGENET_CLASSNAMES) and all(re.fullmatch(r"n\d{8}", c) for c in classes):
            names = IMAGENET_CLASSNAMES  # the standard order of the sorted wnid folders (n01440764, ...)
        else:
            known = {folder_name(n).lower(): n for n in IMAGENET_CLASSNAMES}
            unknown = [c for c in classes if folder_name(c).lower() not in known]
            if unknown:
                raise ValueError(f"class folder {unknown[0]!r} of {folder} is not an ImageNet class name (or a "
                                 f"wnid, in a folder of all 1000 classes)")
            names = tuple(known[folder_name(c).lower()] for c in classes)
        templates = templates or "imagenet"
    elif classnames:
        names = _lines(classnames)
        if len(names) != len(classes):
            raise ValueError(f"{classnames} names {len(names)} classes, {folder} has {len(classes)} class folders")
    elif all(re.fullmatch(r"n\d{8}", c) for c in classes):  # prompts naming wnids would score at chance
        raise ValueError(f"the class folders of {folder} are WordNet ids ({classes[0]}, ...), not names for a "
                         "prompt: set zeroshot_classnames to imagenet (a folder of all 1000 classes) or to a file "
                         "of class names")
    else:
        names = tuple(c.replace("_", " ") for c in classes)
    if templates == "imagenet":
        prompts = IMAGENET_TEMPLATES
    elif templates:
        prompts = _lines(templates)
        bad = [t for t in prompts if t.count("{}") != 1]
        if bad:
            raise ValueError(f"template {bad[0]!r} of {templates} must contain {{}} once")
    else:
        prompts = DEFAULT_TEMPLATES
    images, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(root / name)
        if not files:  # an empty class would still be a distractor among the prompts, and move the chance level
            raise ValueError(f"class folder {name!r} of {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        images += files
        labels += [label] * len(files)
    some_image_decodes(images, folder)
    return ZeroshotSet(images, torch.tensor(labels), tuple(names), prompts, folder)


def read_retrieval(data: str, img_key: str, caption_key: str, separator: str) -> RetrievalSet:
    """A retrieval set from a table (rows grouped by image, in order of first appearance) or from shards."""
    images: list[bytes | str] = []
    captions: list[str] = []
    owner: list[int] = []
    unusable = 0
    paths = expand_paths(data)
    if all(is_shard(p) for p in paths):
        for path in paths:
            for sample in read_shard(path, several=True):
                if sample.image is None or not sample.captions:
                    unusable += 1
                    continue
                captions += sample.captions
                owner += [len(images)] * len(sample.captions)
                images.append(sample.image)
    elif len(paths) == 1:
        index: dict[str, int] = {}
        first_row: list[int] = []  # of each image
        for row, (image, caption) in enumerate(read_table(paths[0], img_key, caption_key, separator), 1):
            if image is None or not caption.strip():
                raise ValueError(f"row {row} of {paths[0]} (after the header) has no "
                                 f"{img_key if image is None else caption_key}")
            if image not in index:
                index[image] = len(images)
                images.append(image)
                first_row.append(row)
            captions.append(caption)
            owner.append(index[image])
        # a stat per image (5,000 for COCO's 5k test: milliseconds on a local disk), so wrong paths stop a run before it
        # trains rather than leaving it a set of skipped images
        absent = [i for i, image in enumerate(images) if not os.path.isfile(image)]
        if absent:
            more = f" (and {len(absent) - 1} more of its {len(images)} images)" if len(absent) > 1 else ""
            raise ValueError(f"row {first_row[absent[0]]} of {paths[0]} (after the header): no such image file "
                             f"{images[absent[0]]}{more}")
    else:
        raise ValueError(f"{data}: expected .tar shards or one CSV/TSV table")
    if not images:
        raise ValueError(f"{data} holds no image with a caption")
    some_image_decodes(images, data)
    return RetrievalSet(images, captions, torch.tensor(owner), unusable, data)


def some_image_decodes(images: list[bytes | str], source: str) -> None:
    """ValueError when none of a set's images decodes, found before a run trains rather than at its evaluation.
    Tried in order up to the first that decodes: one decode for a sound set."""
    for image in images:
        try:
            load_image(image, 8)
            return
        except (BadImage, OSError):
            continue
    raise ValueError(f"evaluation set {source}: none of its {len(images)} images can be read and decoded")


class _Decoded(Dataset):
    def __init__(self, files: list[bytes | str], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            # a copy: load_image's array is PIL's read-only buffer, which torch warns about
            return torch.from_numpy(load_image(self.files[i], self.size).copy()).permute(2, 0, 1), True
        except (BadImage, OSError):
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False


def image_batches(files: list[bytes | str], size: int, workers: int, batch_size: int = 256
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images [b, 3, size, size], decoded ok [b]) in file order, decoded by `workers` processes."""
    loader = DataLoader(_Decoded(files, size), batch_size=batch_size, num_workers=workers,
                        prefetch_factor=2 if workers else None, worker_init_fn=worker_init)
    yield from loader


def zeroshot_metrics(image_features: torch.Tensor, ok: torch.Tensor, labels: torch.Tensor,
                     class_features: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 (percent) of the images that decoded, against normalised class embeddings [C, D]."""
    logits = image_features[ok] @ class_features.T
    hit = logits.topk(min(5, len(class_features)), dim=1).indices == labels[ok][:, None]
    return {"top1": 100.0 * hit[:, 0].float().mean().item(), "top5": 100.0 * hit.any(dim=1).float().mean().item(),
            "classes": len(class_features), "skipped": int((~ok).sum())}


def retrieval_metrics(image_features: torch.Tensor, ok: torch.Tensor, text_features: torch.Tensor,
                      caption_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (percent), counted the standard way: image->text is a hit if any of the image's captions is among
    the k nearest texts; text->image if the caption's image is among the k nearest images. Images that did not
    decode are left out, with their captions as queries (their captions stay as distractors)."""
    kept = ok.nonzero().squeeze(1)
    new_index = torch.full((len(ok),), -1, dtype=torch.long)
    new_index[kept] = torch.arange(len(kept))
    owner = new_index[caption_image]  # -1 for captions of a skipped image
    sim = image_features[kept] @ text_features.T  # [I, T]
    out: dict[str, float] = {}
    for k in ks:
        top_texts = sim.topk(min(k, sim.shape[1]), dim=1).indices  # [I, k]
        out[f"i2t_r{k}"] = 100.0 * (owner[top_texts] == torch.arange(len(kept))[:, None]).any(1).float().mean().item()
    queries = owner >= 0
    for k in ks:
        top_images = sim.T[queries].topk(min(k, sim.shape[0]), dim=1).indices  # [T', k]
        out[f"t2i_r{k}"] = 100.0 * (top_images == owner[queries][:, None]).any(1).float().mean().item()
    out["skipped"] = int((~ok).sum())
    return out

