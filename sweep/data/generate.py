"""`sweep make-data`: the embedded synthetic data written as the files real datasets come in, so that every loader
runs on files without a download (tests, demos, benchmarks).

    OUT/shards/train-00000.tar ...   webdataset shards: <key>.jpg, <key>.txt (caption), <key>.json ({"caption"})
    OUT/train.tsv, OUT/images/       the same pairs as a table (filepath, title; tab-separated) of JPEG files
    OUT/zeroshot/<class>/*.jpg       an ImageNet-style folder of the 40 colour x shape classes (those of them
                                     that get an image: all from 40 --zeroshot-samples on), with
    OUT/zeroshot_classnames.txt      their names in sorted folder order
    OUT/zeroshot_templates.txt       and their prompt templates
    OUT/imagenet/<class>/*.jpg       (--imagenet-classes N) a folder named after N ImageNet classes
                                     (`sweep.data.evalsets.folder_name`: 'baluster / handrail' -> baluster_or_handrail)
    OUT/retrieval.tsv, OUT/retrieval_images/   held-out images with several captions each (one row per caption)
    OUT/retrieval-00000.tar          the same retrieval set as a shard (.json {"captions": [...]})

The training pairs are the embedded training scenes of `data_seed` (scene i is the same picture and caption as in
memory), encoded as JPEG; `--corrupt K` replaces K training images by truncated JPEG bytes in the shards and the
table alike, to exercise the loader's skip-and-count.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sweep.data import synthetic
from sweep.data.evalsets import folder_name

JPEG_QUALITY = 95


def jpeg(image: np.ndarray) -> bytes:
    """uint8 [3, H, W] -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)


def captions_of(seed: int, split: str, index: int, count: int) -> list[str]:
    """`count` captions of one scene (the first is its embedded caption), the others with its verbs drawn again:
    different wordings where the scene allows them."""
    scene = synthetic.sample_scene(synthetic._rng(seed, split, index))
    rng = np.random.default_rng([seed, synthetic.SPLITS[split], index, 7])
    out = [synthetic.caption(scene)]
    for attempt in range(100 * count):
        if len(out) == count:
            break
        verbs = tuple(str(v) for v in rng.choice(synthetic.VERBS, 2))
        text = synthetic.caption(synthetic.Scene(scene.shapes, scene.background, verbs))
        if text not in out or attempt >= 50 * count:
            out.append(text)
    return out


def make_data(out: str | Path, *, data_seed: int = 0, train_samples: int = 2048, shard_size: int = 256,
              image_size: int = 64, zeroshot_samples: int = 400, retrieval_images: int = 100,
              captions_per_image: int = 5, corrupt: int = 0, imagenet_classes: int = 0,
              progress: bool = True) -> dict[str, str]:
    """Write the files listed above under `out`; returns the settings that read them (for a run config)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    broken = set(np.random.default_rng([data_seed, 99]).choice(train_samples, corrupt, replace=False).tolist())
    rows = []
    shards = (train_samples + shard_size - 1) // shard_size
    for shard in tqdm(range(shards), desc="train shards", disable=not progress):
        start = shard * shard_size
        count = min(shard_size, train_samples - start)
        images, captions = synthetic.image_caption_pairs(data_seed, "train", start, count, image_size)
        with tarfile.open(out / "shards" / f"train-{shard:05d}.tar", "w") as tar:
            for i in range(count):
                key = f"{start + i:08d}"
                data = jpeg(images[i])
                if start + i in broken:
                    data = data[: len(data) // 3]  # a truncated file: PIL refuses it
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.txt", captions[i].encode())
                _add(tar, f"{key}.json", json.dumps({"caption": captions[i], "key": key}).encode())
                (out / "images" / f"{key}.jpg").write_bytes(data)
                rows.append((f"images/{key}.jpg", captions[i]))
    _write_tsv(out / "train.tsv", rows)

    images, labels = synthetic.zeroshot_set(data_seed, zeroshot_samples, image_size)
    folders = [folder_name(name) for name in synthetic.CLASSNAMES]
    for i, (image, label) in enumerate(zip(images, labels)):
        (out / "zeroshot" / folders[label]).mkdir(parents=True, exist_ok=True)
        (out / "zeroshot" / folders[label] / f"{i:06d}.jpg").write_bytes(jpeg(image))
    order = sorted(set(labels.tolist()), key=lambda c: folders[c])  # the classes that got a folder
    (out / "zeroshot_classnames.txt").write_text("\n".join(synthetic.CLASSNAMES[c] for c in order) + "\n")
    (out / "zeroshot_templates.txt").write_text("\n".join(synthetic.TEMPLATES) + "\n")
    # the first N synthetic classes under the names of N ImageNet classes, spread over the 1000
    for c in range(imagenet_classes):
        name = folder_name(IMAGENET_CLASSNAMES[c * len(IMAGENET_CLASSNAMES) // imagenet_classes])
        for i in np.flatnonzero(labels == c):  # a class without an image gets no folder: an empty one is refused
            (out / "imagenet" / name).mkdir(parents=True, exist_ok=True)
            (out / "imagenet" / name / f"{i:06d}.jpg").write_bytes(jpeg(images[i]))

    (out / "retrieval_images").mkdir(exist_ok=True)
    images, _ = synthetic.image_caption_pairs(data_seed, "retrieval", 0, retrieval_images, image_size)
    rows = []
    with tarfile.open(out / "retrieval-00000.tar", "w") as tar:
        for i, image in enumerate(images):
            key, data = f"{i:06d}", jpeg(image)
            captions = captions_of(data_seed, "retrieval", i, captions_per_image)
            (out / "retrieval_images" / f"{key}.jpg").write_bytes(data)
            rows += [(f"retrieval_images/{key}.jpg", c) for c in captions]
            _add(tar, f"{key}.jpg", data)
            _add(tar, f"{key}.json", json.dumps({"captions": captions}).encode())
    _write_tsv(out / "retrieval.tsv", rows)
    return {"train_data (webdataset)": str(out / "shards" / f"train-{{00000..{shards - 1:05d}}}.tar"),
            "train_data (csv)": str(out / "train.tsv"), "zeroshot": str(out / "zeroshot"),
            "retrieval": str(out / "retrieval.tsv")}
