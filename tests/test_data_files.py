"""Training and evaluation data on files: shards, tables, folders, and the exact resume of a streamed epoch."""
import csv
import io
import json
import multiprocessing
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings, strategies as st
from PIL import Image

from sweep.cli import main
from sweep.config import ConfigError, config_from_dict
from sweep.data.evalsets import folder_name, read_retrieval, read_zeroshot, retrieval_metrics, zeroshot_metrics
from sweep.data import images as images_module
from sweep.data.generate import jpeg, make_data
from sweep.data.images import BadImage, crop_box, draft_need, draft_scale, load_image
from sweep.data.sources import RawSample, ShardSource, expand_paths, open_source, read_shard
from sweep.data.stream import CHUNK, SHARE_ABOVE, STREAMS, Prefetched, StreamedBatches, loader_workers
from sweep.evaluate import class_features, evaluate_on_disk
from sweep.record import read_record
from sweep.results import held_elsewhere
from sweep.strategies.text import TextReducer
from sweep.train.distributed import Distributed
from sweep.train.loop import training_batches
from sweep.train.state import TrainState

TRAIN, SHARD, CORRUPT = 600, 100, 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The embedded data as files: 6 shards of 100 pairs (4 of them corrupt), folders, retrieval sets."""
    out = tmp_path_factory.mktemp("demo")
    make_data(out, train_samples=TRAIN, shard_size=SHARD, corrupt=CORRUPT, zeroshot_samples=120,
              retrieval_images=40, imagenet_classes=10, progress=False)
    return out


def shards(demo):
    return str(demo / "shards" / "train-{00000..00005}.tar")


def keys_of(batches, steps):
    return [key for _ in range(steps) for key in batches.next_batch()[2]]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of (name, bytes) members, in that order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_paths_expand_braces_and_join_with_double_colons():
    assert expand_paths("a/{0..2}.tar::b.tar") == ["a/0.tar", "a/1.tar", "a/2.tar", "b.tar"]
    assert expand_paths("s-{00008..00010}.tar") == ["s-00008.tar", "s-00009.tar", "s-00010.tar"]


def test_a_shard_groups_members_by_key_and_reads_every_caption_form_for_training_and_for_retrieval(tmp_path):
    image = jpeg(np.zeros((3, 8, 8), np.uint8))
    members = [("dir/a.jpg", image), ("dir/a.txt", b"first\nsecond\n"), ("b.png", image),
               ("b.json", json.dumps({"captions": ["x", "y"]}).encode()), ("c.jpg", image),
               ("c.json", json.dumps({"caption": "only"}).encode()), ("d.txt", b"no image")]
    write_tar(tmp_path / "s.tar", members)
    # training: one caption per pair, the whole .txt (LAION's captions may run over lines)
    samples = list(read_shard(str(tmp_path / "s.tar")))
    assert [(s.key, s.captions, s.image is not None) for s in samples] == [
        ("dir/a", ("first second",), True), ("b", ("x",), True), ("c", ("only",), True), ("d", ("no image",), False)]
    assert samples[0].where == f"sample dir/a of {tmp_path / 's.tar'}"
    # retrieval: every caption, a line of .txt each
    samples = list(read_shard(str(tmp_path / "s.tar"), several=True))
    assert [(s.key, s.captions) for s in samples] == [
        ("dir/a", ("first", "second")), ("b", ("x", "y")), ("c", ("only",)), ("d", ("no image",))]


def test_a_shard_from_macos_tar_or_without_its_end_blocks_gives_every_sample(tmp_path):
    image = jpeg(np.zeros((3, 8, 8), np.uint8))
    write_tar(tmp_path / "mac.tar", [  # macOS tar puts an AppleDouble file before each member
        member for key in ("a", "b") for ext, data in (("jpg", image), ("txt", key.encode()))
        for member in ((f"._{key}.{ext}", b"\0\x05\x16\x07"), (f"{key}.{ext}", data))])
    samples = list(read_shard(str(tmp_path / "mac.tar")))
    assert [(s.key, s.captions, s.image == image) for s in samples] == [("a", ("a",), True), ("b", ("b",), True)]
    # an archive cut right after a member (no end-of-archive blocks) reads as tarfile reads it: to its last member
    whole = (tmp_path / "mac.tar").read_bytes()
    end = len(whole.rstrip(b"\0"))
    (tmp_path / "noend.tar").write_bytes(whole[:end + -end % 512])
    assert [s.key for s in read_shard(str(tmp_path / "noend.tar"))] == ["a", "b"]


def test_reduced_size_decoding_gives_the_same_picture_as_a_full_decode():
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((256, 256)))
    data = jpeg(smooth.transpose(2, 0, 1))
    for size in (64, 112):
        for crop in (None, 3):
            full = load_image(data, size, None if crop is None else np.random.default_rng(crop), draft=False)
            small = load_image(data, size, None if crop is None else np.random.default_rng(crop), draft=True)
            assert small.shape == full.shape == (size, size, 3) and small.dtype == np.uint8
            assert np.abs(small.astype(int) - full.astype(int)).mean() < 6  # the same picture, other rounding
    # a training crop is a function of its generator: same seed, same pixels; another seed, another crop
    a, b, c = (load_image(data, 64, np.random.default_rng(s)) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(BadImage):
        load_image(data[: len(data) // 3], 64)


@settings(max_examples=200, deadline=None)
@given(min_crop_scale=st.floats(0.05, 1.0), width=st.integers(1, 600), height=st.integers(1, 600),
       seed=st.integers(0, 2**32 - 1))
def test_a_training_crop_covers_between_min_crop_scale_and_all_of_the_image(min_crop_scale, width, height, seed):
    import random

    left, top, right, bottom = crop_box(random.Random(seed), width, height, min_crop_scale)
    assert 0 <= left < right <= 1 + 1e-9 and 0 <= top < bottom <= 1 + 1e-9
    share = (right - left) * (bottom - top)
    centre = crop_box(None, width, height)  # after ten draws that do not fit, as torchvision
    assert min_crop_scale - 1e-9 <= share <= 1 + 1e-9 or (left, top, right, bottom) == centre


def test_min_crop_scale_is_a_setting_of_runs_on_files_only(tmp_path):
    with pytest.raises(ConfigError, match="min_crop_scale: is only read with dataset webdataset or csv"):
        config_from_dict({"min_crop_scale": 0.4})
    for wrong in (0, 1.5):
        with pytest.raises(ConfigError, match="min_crop_scale"):
            config_from_dict({"min_crop_scale": wrong})
    assert config_from_dict({}).min_crop_scale == images_module.MIN_CROP_SCALE  # open_clip_train's (0.9, 1)


def pil_reference(data: bytes, size: int, rng, draft: bool) -> np.ndarray:
    """What load_image computed before it decoded JPEGs with simplejpeg: PIL open, draft, convert, resize."""
    img = Image.open(io.BytesIO(data))
    box = crop_box(rng, *img.size)
    need = draft_need(box, size)
    if draft and draft_scale(*img.size, need) > 1:
        img.draft("RGB", need)
    img = img.convert("RGB")
    sx, sy = img.size
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC,
                                 box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)))


@pytest.mark.parametrize("mode, side, subsampling, progressive", [
    ("RGB", 256, 2, False), ("RGB", 250, 0, True), ("RGB", 97, 1, False), ("L", 256, 0, False),
    ("CMYK", 128, 0, False)])
def test_jpeg_decoding_gives_pil_pixels_bit_for_bit(mode, side, subsampling, progressive):
    """simplejpeg (with its own DCT scaling) and PIL (with draft) give identical pixels, for every resize length,
    both transforms, colour or grey, 4:2:0/4:2:2/4:4:4, baseline or progressive, sides not divisible by 8; CMYK,
    which simplejpeg refuses, is decoded by PIL."""
    rng = np.random.default_rng(side)
    picture = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((side, side + 13))
    buf = io.BytesIO()
    picture.convert(mode).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    data = buf.getvalue()
    for size in (224, 112, 96, 64, 32):
        for crop in (None, 5):
            for draft in (True, False):
                ours = load_image(data, size, None if crop is None else np.random.default_rng(crop), draft=draft)
                ref = pil_reference(data, size, None if crop is None else np.random.default_rng(crop), draft)
                assert np.array_equal(ours, ref), (size, crop, draft)


def test_resumed_stream_trains_on_exactly_the_batches_of_an_uninterrupted_one(demo):
    """Killed after 7 batches (mid-chunk), resumed with another number of loader workers: the same sequence of
    sample keys over three epochs; each epoch holds every usable sample exactly once; corrupt ones are counted."""
    source = open_source("webdataset", shards(demo), "filepath", "title", "\t")

    def batches(workers, position=None):
        return StreamedBatches(source, seed=3, stage=0, batch_size=50, image_size=32, workers=workers,
                               position=position)

    steps = 3 * (TRAIN - CORRUPT) // 50 + 1  # three whole epochs
    clean = batches(workers=2)
    expected = keys_of(clean, steps)
    first = batches(workers=2)
    before = keys_of(first, 7)
    assert 7 * 50 % CHUNK != 0 and first.position()["epoch"] == 0
    resumed = batches(workers=0, position=json.loads(json.dumps(first.position())))  # as a checkpoint keeps it
    assert before + keys_of(resumed, steps - 7) == expected
    usable = TRAIN - CORRUPT
    epochs = [expected[i * usable:(i + 1) * usable] for i in range(3)]
    assert all(len(set(epoch)) == usable for epoch in epochs)
    assert set(epochs[0]) == set(epochs[1]) == set(epochs[2]) and epochs[0] != epochs[1]  # reshuffled
    assert resumed.skipped == clean.skipped >= 3 * CORRUPT


class Rows:
    """A source of n tiny samples whose keys are their row numbers (the stream logic without files)."""

    image = jpeg(np.full((3, 8, 8), 128, np.uint8))

    def __init__(self, n: int, bad: frozenset[int] = frozenset()):
        self.n, self.bad = n, bad

    @property
    def max_streams(self):
        return self.n

    def stream(self, seed, stage, epoch, stream, streams):
        order = np.random.default_rng([seed, stage, epoch]).permutation(self.n)
        for row in order[stream::streams]:
            yield RawSample(str(row), None if row in self.bad else self.image, ("a caption",))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 150), batch=st.integers(2, 40), cut=st.lists(st.integers(1, 12), max_size=3),
       bad=st.sets(st.integers(0, 150), max_size=5))
def test_any_kill_points_give_every_sample_once_per_epoch(n, batch, cut, bad):
    bad = frozenset(b for b in bad if b < n)
    if len(bad) == n:
        return
    batch = min(batch, n - len(bad))  # a smaller epoch is refused (the test below)
    source, steps = Rows(n, bad), 2 * (n - len(bad)) // batch + 2

    def batches(position=None):
        return StreamedBatches(source, seed=0, stage=0, batch_size=batch, image_size=8, workers=0,
                               position=position)

    expected = keys_of(batches(), steps)
    got, current, done = [], batches(), 0
    for k in cut:
        k = min(k, steps - done)
        got += keys_of(current, k)
        done += k
        current = batches(current.position())
    got += keys_of(current, steps - done)
    assert got == expected
    usable = n - len(bad)
    for i in range(len(expected) // usable):
        assert Counter(expected[i * usable:(i + 1) * usable]) == Counter(str(r) for r in range(n) if r not in bad)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 120), ranks=st.integers(2, 20))
def test_ranks_read_distinct_samples_that_together_cover_each_epoch_once(n, ranks):
    """Each rank streams its own streams: no sample reaches two ranks in an epoch and none is left out."""
    source = Rows(n)
    if min(max(STREAMS, ranks), n) < ranks:
        with pytest.raises(ValueError, match="fewer than the run's"):
            StreamedBatches(source, seed=0, stage=0, batch_size=1, image_size=8, workers=0, rank=0, ranks=ranks)
        return
    everything = []
    for rank in range(ranks):
        batches = StreamedBatches(source, seed=0, stage=0, batch_size=1, image_size=8, workers=0, rank=rank,
                                  ranks=ranks)
        while (key := batches.next_batch()[2][0]) and batches.epoch == 0:
            everything.append(key)
    assert len(everything) == len(set(everything)) == n  # distinct across ranks, all of them


@settings(max_examples=15, deadline=None)
@given(n=st.integers(4, 60), ranks=st.integers(2, 4), batch=st.integers(1, 3))
def test_ranks_with_unequal_data_end_every_epoch_together_and_never_share_a_pair(n, ranks, batch):
    """Rank r holds every ranks-th stream, so with n % ranks != 0 the ranks hold unequal data; each ends an epoch
    after its share of epoch_samples, at the same step, and no global batch holds one pair twice (the share a
    whole number of batches: a batch that straddles two epochs may hold a pair of each, on one process too)."""
    source = Rows(n)
    least = n // ranks  # the rows of the rank holding fewest
    if min(STREAMS, n) < ranks or least < batch:
        return
    share = least // batch * batch
    loaders = [StreamedBatches(source, seed=0, stage=0, batch_size=batch, image_size=8, workers=0,
                               epoch_samples=share * ranks, rank=r, ranks=ranks) for r in range(ranks)]
    for _ in range(3 * share // batch):
        keys = [key for loader in loaders for key in loader.next_batch()[2]]
        assert len(keys) == len(set(keys))
        assert len({loader.epoch for loader in loaders}) == 1
    if n % ranks:  # a share above what the rank holding fewest has: it says so when its streams run out
        short = StreamedBatches(source, seed=0, stage=0, batch_size=1, image_size=8, workers=0,
                                epoch_samples=(least + 1) * ranks, rank=ranks - 1, ranks=ranks)
        with pytest.raises(RuntimeError, match=f"held {least} usable samples, fewer than its share"):
            keys_of(short, least + 1)


def test_a_run_on_several_processes_on_files_needs_an_epoch_size(demo, tmp_path, capsys):
    cfg = config_from_dict({"dataset": "webdataset", "train_data": shards(demo), "batch_size": 16, "workers": 0})
    with pytest.raises(ValueError, match="needs train_num_samples"):
        training_batches(cfg, "pretrain", None, TrainState(), here=Distributed(rank=1, world_size=2))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"sweep": "files", "slurm": {"tasks_per_node": 2}, "settings": {
        "dataset": "webdataset", "train_data": shards(demo), "batch_size": 16, "pretrain_samples": 64},
        "axes": {"seed": [0]}}))
    results = tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--dry-run"]) == 2
    assert "settings.train_num_samples: is needed to train on files with 2 processes" in capsys.readouterr().err
    assert not results.exists()
    grid.write_text(grid.read_text().replace("pretrain_samples: 64", "pretrain_samples: 64\n  train_num_samples: 500"))
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local", "--dry-run"]) == 0


@given(workers=st.integers(1, 64), streams=st.integers(1, 300))
def test_the_loader_starts_the_fewest_workers_that_keep_its_busiest_worker_as_busy(workers, streams):
    """Streams advance together, so the loader's pace is that of the worker owning the most streams."""
    def busiest(w):
        return max(len(range(i, streams, w)) for i in range(w))

    started = loader_workers(workers, streams)
    assert 1 <= started <= min(workers, streams)
    assert busiest(started) == busiest(min(workers, streams))
    assert started == 1 or busiest(started - 1) > busiest(started)
    if streams == STREAMS and workers in (2, 3, 4, 5, 6, 8, 10, 12, 15, 16):
        assert busiest(workers) * workers == STREAMS  # the usual worker counts share STREAMS evenly


def test_a_table_streams_every_row_once_and_skips_a_missing_image_naming_its_row(demo, capsys):
    lines = (demo / "train.tsv").read_text().splitlines()[:201]  # the header and rows 0..199
    lines[5] = "images/not-there.jpg\tlost"  # row 4
    (demo / "with_missing.tsv").write_text("\n".join(lines) + "\n")
    broken = {str(row) for row in range(200) if row != 4
              and _fails(demo / "images" / f"{row:08d}.jpg")} | {"4"}  # the generated corrupt ones too
    source = open_source("csv", str(demo / "with_missing.tsv"), "filepath", "title", "\t")
    batches = StreamedBatches(source, seed=0, stage=0, batch_size=5, image_size=32, workers=1)
    keys = keys_of(batches, 40)
    usable = 200 - len(broken)
    assert sorted(keys[:usable], key=int) == [str(r) for r in range(200) if str(r) not in broken]
    assert batches.skipped == len(broken)
    assert f"skipping training row 5 of {demo / 'with_missing.tsv'} (after the header): cannot read image " \
           f"{demo / 'images' / 'not-there.jpg'} (No such file or directory)" in capsys.readouterr().err


def test_a_table_with_a_byte_order_mark_skips_and_counts_rows_without_an_image_or_caption(demo):
    lines = (demo / "train.tsv").read_text().splitlines()[:41]  # the header and rows 0..39
    lines[3], lines[6] = "\tno image here", lines[6].split("\t")[0] + "\t"  # rows 2 and 5
    (demo / "short_rows.tsv").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # as Excel saves
    broken = {str(r) for r in range(40) if _fails(demo / "images" / f"{r:08d}.jpg")} | {"2", "5"}
    batches = StreamedBatches(open_source("csv", str(demo / "short_rows.tsv"), "filepath", "title", "\t"),
                              seed=0, stage=0, batch_size=5, image_size=32, workers=0)
    keys = keys_of(batches, (40 - len(broken)) // 5)
    assert not set(keys) & broken and batches.skipped == len(broken)


def test_a_retrieval_table_row_without_its_caption_is_refused_before_any_training(demo, tmp_path):
    lines = (demo / "retrieval.tsv").read_text().splitlines()
    lines[4] = lines[4].split("\t")[0]  # row 4 after the header: no separator, no caption
    (tmp_path / "ret.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="row 4 of .* has no title"):
        read_retrieval(str(tmp_path / "ret.tsv"), "filepath", "title", "\t")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"eval_sets": [{"name": "r", "type": "retrieval", "data": str(tmp_path / "ret.tsv")}]},
                         "run.yaml")
    assert err.value.field == "eval_sets.0.data" and "has no title" in str(err.value)


def test_a_thousand_class_folders_are_taken_in_wnid_order_only_when_they_are_wnids(tmp_path):
    for i in range(1000):
        (tmp_path / "wnids" / f"n{i:08d}").mkdir(parents=True)
        (tmp_path / "named" / f"class_{i:04d}").mkdir(parents=True)
        (tmp_path / "wnids" / f"n{i:08d}" / "a.jpg").write_bytes(b"" if i else Rows.image)  # one decodes
    assert read_zeroshot(str(tmp_path / "wnids"), "imagenet").classnames[0] == "tench"
    with pytest.raises(ValueError, match="'class_0000' .* is not an ImageNet class name"):
        read_zeroshot(str(tmp_path / "named"), "imagenet")  # not silently paired with tench, goldfish, ...
    with pytest.raises(ValueError, match="WordNet ids .*set zeroshot_classnames"):
        read_zeroshot(str(tmp_path / "wnids"))  # not prompted as "a photo of a n00000000."


def _fails(file: bytes | Path) -> bool:
    try:
        load_image(file if isinstance(file, bytes) else str(file), 32)
    except BadImage:
        return True
    return False


def test_an_epoch_ends_after_train_num_samples(demo):
    source = open_source("webdataset", shards(demo), "filepath", "title", "\t")
    batches = StreamedBatches(source, seed=0, stage=0, batch_size=40, image_size=32, workers=0, epoch_samples=100)
    keys = keys_of(batches, 5)  # 200 samples: two epochs of 100
    assert len(set(keys[:100])) == len(set(keys[100:])) == 100 and set(keys[:100]) != set(keys[100:])
    assert (batches.position()["epoch"], batches.position()["taken"]) == (1, 100)


def test_a_truncated_shard_is_counted_apart_from_skipped_samples_and_the_stream_goes_on(demo, tmp_path, capsys):
    whole = (demo / "shards" / "train-00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    intact = str(demo / "shards" / "train-00001.tar")
    bad = [s.key for s in read_shard(intact) if _fails(s.image)]
    source = ShardSource([str(tmp_path / "cut.tar"), intact])
    batches = StreamedBatches(source, seed=0, stage=0, batch_size=10, image_size=32, workers=0)
    keys = keys_of(batches, 10)
    assert len(set(keys)) == 100 and batches.broken_shards == 1 and batches.position()["broken_shards"] == 1
    err = capsys.readouterr().err
    assert f"skipping the rest of {tmp_path / 'cut.tar'}: the file ends inside a member" in err
    # an unusable sample of a shard is named with its shard (keys repeat across the sources of a `::` list)
    assert bad and all(f"skipping training sample {key} of {intact}: image does not decode" in err for key in bad)


def test_resize_runs_decode_files_at_the_reduced_resolution(demo):
    cfg = config_from_dict({"dataset": "webdataset", "train_data": shards(demo), "image_strategy": "resize",
                            "image_tokens": 17, "batch_size": 16, "workers": 0})
    images, captions, _, _ = training_batches(cfg, "pretrain", None, TrainState()).next_batch()
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8 and len(captions) == 16
    images, _, _, _ = training_batches(cfg, "finetune", None, TrainState()).next_batch()
    assert images.shape == (16, 3, 64, 64)  # the fine-tune is at full length


@pytest.mark.parametrize("strategy, tokens, by_workers", [("none", 32, True), ("truncation", 8, True),
                                                          ("random", 8, False)])
def test_loader_workers_tokenise_captions_as_the_trainer_would(demo, strategy, tokens, by_workers):
    text = TextReducer(strategy, tokens, context_length=32)
    source = open_source("webdataset", shards(demo), "filepath", "title", "\t")
    batch = StreamedBatches(source, seed=0, stage=0, batch_size=70, image_size=32, workers=2,
                            text=text).next_batch()
    if by_workers:
        assert torch.equal(batch.tokens, text(batch.captions))
    else:  # a random strategy draws from the step's generator, in the training process
        assert batch.tokens is None


@pytest.mark.parametrize("size", [32, 112])  # chunks of 32 images: 96 KiB by value, 1.2 MiB as shared memory
def test_batches_are_the_same_whether_the_loader_works_in_process_or_in_workers(demo, size):
    assert 32 * 3 * 32 * 32 <= SHARE_ABOVE < 32 * 3 * 112 * 112
    source = open_source("webdataset", shards(demo), "filepath", "title", "\t")
    here, there = (StreamedBatches(source, seed=1, stage=0, batch_size=48, image_size=size, workers=workers)
                   for workers in (0, 2))
    for _ in range(3):  # batches straddle chunks
        a, b = here.next_batch(), there.next_batch()
        assert a.keys == b.keys and a.images.shape == (48, 3, size, size) and torch.equal(a.images, b.images)


class Mixed:
    """Samples of every kind a loader may meet, in one stream: JPEGs (colour, grey, progressive), a PNG, a CMYK
    JPEG, a truncated JPEG and one whose entropy-coded data is damaged but that PIL still decodes."""

    def __init__(self):
        rng = np.random.default_rng(0)  # a smooth picture: resamplers differ most on noise
        photo = np.asarray(Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8)).resize((56, 40)))

        def saved(image, fmt, **options):
            buf = io.BytesIO()
            image.save(buf, fmt, **options)
            return buf.getvalue()

        jpeg_file = saved(Image.fromarray(photo), "JPEG", quality=90)
        damaged = bytearray(jpeg_file)
        damaged[len(damaged) // 2:len(damaged) // 2 + 8] = b"\xff\x00" * 4
        self.files = [jpeg_file, saved(Image.fromarray(photo[:, :, 0]), "JPEG"),
                      saved(Image.fromarray(photo), "JPEG", progressive=True), saved(Image.fromarray(photo), "PNG"),
                      saved(Image.fromarray(photo).convert("CMYK"), "JPEG"), jpeg_file[:len(jpeg_file) // 3],
                      bytes(damaged)]

    max_streams = 1

    def stream(self, seed, stage, epoch, stream, streams):
        for i in range(3 * len(self.files)):
            yield RawSample(str(i), self.files[i % len(self.files)], ("a caption",))


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_on_the_device_uses_the_same_samples_in_the_same_order_with_nearly_the_same_pixels(demo, workers):
    """`decode: device` (here the CPU stands in for the device): the loader leaves JPEGs to the trainer's process,
    which decodes a batch at once. Samples, order, skipped count and position are those of decoding in the workers,
    so a run may resume from one with the other; corrupt files are still found by the workers."""
    source = open_source("webdataset", shards(demo), "filepath", "title", "\t")

    def batches(decode_on, position=None, workers=workers):
        return StreamedBatches(source, seed=2, stage=0, batch_size=96, image_size=48, workers=workers,
                               decode_on=decode_on, position=position)

    steps = 2 * (TRAIN - CORRUPT) // 96 + 1  # two epochs and a little: corrupt files met more than once
    by_workers, on_device = batches(None), batches("cpu")
    for _ in range(steps):
        a, b = by_workers.next_batch(), on_device.next_batch()
        assert a.keys == b.keys and a.captions == b.captions and b.images.shape == a.images.shape
        assert b.images.dtype == torch.uint8 and (a.images.float() - b.images.float()).abs().mean() < 1
    assert on_device.position() == by_workers.position() and on_device.skipped == by_workers.skipped >= 2 * CORRUPT
    resumed = batches(None, json.loads(json.dumps(on_device.position())), workers=0)
    assert keys_of(resumed, 3) == keys_of(by_workers, 3)
    for loader in (by_workers, on_device):
        loader.close()

    mixed = {decode: StreamedBatches(Mixed(), seed=0, stage=0, batch_size=9, image_size=32, workers=workers,
                                     decode_on=decode) for decode in (None, "cpu")}
    for _ in range(2):
        a, b = mixed[None].next_batch(), mixed["cpu"].next_batch()
        assert a.keys == b.keys and (a.images.float() - b.images.float()).abs().mean() < 2
    # all 21 samples read: the truncated file skipped 3 times; the damaged one decodes, by the workers either way
    assert mixed[None].skipped == mixed["cpu"].skipped == 3
    # JPEG, grey, progressive: left to the device; PNG, CMYK, damaged: decoded by the workers
    assert mixed["cpu"]._chunk.deferred.tolist() == ([True] * 3 + [False] * 3) * 3


def test_a_file_the_devices_decoder_refuses_is_decoded_by_pil_and_the_batch_goes_on(monkeypatch):
    files = Mixed().files
    good = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in (files[0], files[1], files[2])]
    boxes = torch.tensor([[0.0, 0.0, 56.0, 40.0], [4.0, 2.0, 44.0, 38.0], [10.5, 3.25, 50.0, 39.5]])
    expected = images_module.decode_crops(good, boxes, 24, "cpu")
    real = images_module.decode_jpeg

    def refuses_the_grey_one(data, **options):  # a batch (list) that holds it, or it alone
        if any(d.shape == good[1].shape for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **options)

    monkeypatch.setattr(images_module, "decode_jpeg", refuses_the_grey_one)
    assert torch.equal(images_module.decode_crops(good, boxes, 24, "cpu"), expected)


def test_a_thread_ahead_of_training_hands_out_the_same_batches_and_resumes_where_training_stopped(demo):
    """A GPU run receives batches in a thread that runs ahead: the batches are the loader's, the position is where
    the trainer is (not the thread), and closing it stops the thread and the loader workers."""
    source = open_source("webdataset", shards(demo), "filepath", "title", "\t")

    def batches(workers, position=None):
        return StreamedBatches(source, seed=5, stage=0, batch_size=40, image_size=32, workers=workers,
                               position=position)

    children = set(multiprocessing.active_children())
    plain, ahead = batches(0), Prefetched(batches(2), depth=3)
    for _ in range(4):
        a, b = plain.next_batch(), ahead.next_batch()
        assert a.keys == b.keys and torch.equal(a.images, b.images)
    assert ahead.position() == plain.position() and ahead.skipped == plain.skipped
    for _ in range(500):  # the thread fills its queue: batches that training has not taken yet
        if ahead._queue.full():
            break
        time.sleep(0.01)
    assert ahead.batches.taken >= plain.taken + 3 * 40
    ahead.close()
    assert not ahead._thread.is_alive() and set(multiprocessing.active_children()) <= children
    resumed = Prefetched(batches(2, ahead.position()))
    assert keys_of(resumed, 3) == keys_of(plain, 3)
    resumed.close()
    empty = Prefetched(StreamedBatches(Rows(3, frozenset({0, 1, 2})), seed=0, stage=0, batch_size=2, image_size=8,
                                       workers=0))
    with pytest.raises(RuntimeError, match="epoch 0 of the training data has 0 usable samples"):
        empty.next_batch()  # the thread's error reaches the training thread
    empty.close()


def test_a_training_set_smaller_than_one_batch_is_refused_not_repeated_within_a_batch():
    """3 rows of which 1 cannot be used, batches of 3: each batch would hold a pair twice, and its two copies
    would be each other's negatives in the contrastive loss."""
    small = StreamedBatches(Rows(3, frozenset({1})), seed=0, stage=0, batch_size=3, image_size=8, workers=0)
    with pytest.raises(RuntimeError, match=r"has 2 usable samples, fewer than one batch \(3; 1 skipped"):
        small.next_batch()
    enough = StreamedBatches(Rows(3, frozenset({1})), seed=0, stage=0, batch_size=2, image_size=8, workers=0)
    assert [sorted(enough.next_batch().keys) for _ in range(3)] == [["0", "2"]] * 3  # batches of whole epochs


def test_retrieval_recall_counts_an_image_hit_when_any_of_its_captions_is_found():
    # 3 images, 2 captions each (captions 2i, 2i+1 belong to image i); features on axes so ranks are set by hand
    images = torch.eye(3, 4)
    texts = torch.tensor([[1, 0, 0, 0], [0.1, 1, 0, 0],     # image 0: caption 0 right, caption 1 nearer image 1
                          [0, 0.5, 0, 0.5], [0, 0.4, 0, 0.6],  # image 1: its captions, weaker than caption 1
                          [0, 0, 1, 0], [0, 0, 0.8, 0]])    # image 2: both right
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    found = retrieval_metrics(images, torch.ones(3, dtype=torch.bool), texts, owner, ks=(1, 5))
    assert found["i2t_r1"] == pytest.approx(200 / 3)  # image 1 finds caption 1 (image 0's) first
    assert found["t2i_r1"] == pytest.approx(500 / 6)  # caption 1 finds image 1 first
    assert found["i2t_r5"] == found["t2i_r5"] == 100.0 and found["skipped"] == 0
    # an image that did not decode leaves the set; its captions stay as distractors, not as queries (were they
    # queries, t2i_r1 would be 4/6)
    found = retrieval_metrics(images, torch.tensor([True, False, True]), texts, owner, ks=(1,))
    assert found["i2t_r1"] == 100.0 and found["t2i_r1"] == 100.0 and found["skipped"] == 1


def test_zeroshot_top1_and_top5_leave_out_undecoded_images():
    classes = torch.eye(6, 6)
    images = torch.eye(6, 6)[[0, 1, 2, 3]]
    labels = torch.tensor([0, 1, 5, 4])
    found = zeroshot_metrics(images, torch.tensor([True, True, True, False]), labels, classes)
    assert found["top1"] == pytest.approx(200 / 3) and found["classes"] == 6 and found["skipped"] == 1


def test_a_folder_named_after_imagenet_classes_gets_their_names_and_the_80_templates(demo, tmp_path):
    zeroshot = read_zeroshot(str(demo / "imagenet"), "imagenet")
    assert len(zeroshot.classnames) == 10 and "tench" in zeroshot.classnames
    assert len(zeroshot.templates) == 80 and all(t.count("{}") == 1 for t in zeroshot.templates)
    assert sorted(Counter(zeroshot.labels.tolist()).values()) == [3] * 10  # 120 images over 40 classes, 10 kept
    named = read_zeroshot(str(demo / "zeroshot"), str(demo / "zeroshot_classnames.txt"),
                          str(demo / "zeroshot_templates.txt"))
    assert named.classnames[0] == "blue circle" and named.templates[0] == "a {}."
    (tmp_path / "tench").mkdir()
    (tmp_path / "not_a_class").mkdir()
    with pytest.raises(ValueError, match="not_a_class"):
        read_zeroshot(str(tmp_path), "imagenet")


def test_a_class_folder_without_images_is_refused_and_hidden_folders_are_no_classes(tmp_path):
    for name in ("cat", "dog/nested", ".ipynb_checkpoints", "cat/.hidden"):
        (tmp_path / name).mkdir(parents=True)
    for path in ("cat/1.jpg", "dog/nested/2.png", ".ipynb_checkpoints/3.jpg", "cat/.hidden/4.jpg", "cat/._5.jpg"):
        (tmp_path / path).write_bytes(Rows.image if path == "cat/1.jpg" else b"")  # one decodes
    classes = read_zeroshot(str(tmp_path))
    assert classes.classnames == ("cat", "dog")  # the images of a class may sit in its subfolders
    assert [Path(p).relative_to(tmp_path).as_posix() for p in classes.images] == ["cat/1.jpg", "dog/nested/2.png"]
    (tmp_path / "empty").mkdir()  # a class with no image would still be a distractor among the prompts
    with pytest.raises(ValueError, match="class folder 'empty' of .* holds no image files"):
        read_zeroshot(str(tmp_path))


def test_retrieval_sets_from_a_table_and_from_shards_agree(demo):
    table = read_retrieval(str(demo / "retrieval.tsv"), "filepath", "title", "\t")
    shard = read_retrieval(str(demo / "retrieval-00000.tar"), "filepath", "title", "\t")
    assert len(table.images) == len(shard.images) == 40 and len(table.captions) == 200
    assert table.captions == shard.captions and table.caption_image.tolist() == [i // 5 for i in range(200)]
    assert all(len(set(table.captions[i:i + 5])) >= 2 for i in range(0, 200, 5))


def test_retrieval_shard_samples_without_an_image_or_a_caption_are_counted_as_skipped(demo, tmp_path):
    image = jpeg(np.zeros((3, 16, 16), np.uint8))
    write_tar(tmp_path / "ret.tar", [("a.jpg", image), ("a.txt", b"one\ntwo\n"), ("b.jpg", image),
                                     ("c.txt", b"lonely"), ("d.jpg", b"not a jpeg"), ("d.txt", b"broken")])
    found = read_retrieval(str(tmp_path / "ret.tar"), "filepath", "title", "\t")
    assert (found.captions, found.caption_image.tolist(), found.unusable) == (["one", "two", "broken"], [0, 0, 1], 2)
    features = lambda batch: torch.nn.functional.normalize(torch.ones(len(batch), 4), dim=-1)  # noqa: E731
    metrics = evaluate_on_disk(features, features, found, 16, workers=0)
    assert metrics["skipped"] == 3  # b and c left out when read, d when it does not decode


@pytest.mark.parametrize("settings, field", [
    ({"dataset": "webdataset"}, "train_data"),
    ({"dataset": "webdataset", "train_data": "nowhere/{0..3}.tar"}, "train_data"),
    ({"train_data": "x.tar"}, "train_data"),
    ({"dataset": "csv", "train_data": "TSV", "csv_caption_key": "caption"}, "train_data"),
    ({"eval_sets": [{"name": "a", "type": "zeroshot", "data": "nowhere"}]}, "eval_sets.0.data"),
    ({"eval_sets": [{"name": "a", "type": "retrieval", "data": "TSV"}] * 2}, "eval_sets.1.name"),
    ({"eval_sets": [{"name": "zeroshot", "type": "retrieval", "data": "TSV"}]}, "eval_sets.0.name"),
    ({"eval_sets": [{"name": "a", "type": "zeroshot", "data": "DIR", "zeroshot_classnames": "none.txt"}]},
     "eval_sets.0.zeroshot_classnames"),
    ({"eval_embedded": False}, "eval_sets"),
    ({"dataset": "webdataset", "train_data": "TSV"}, "train_data"),  # a table is no shard
    ({"decode": "gpu"}, "decode"),
    ({"dataset": "csv", "train_data": "TSV", "csv_separator": "\\t"}, "csv_separator"),  # YAML's '\t'
    ({"eval_sets": [{"name": "a", "type": "retrieval", "data": "TSV", "csv_separator": "||"}]},
     "eval_sets.0.csv_separator"),
    ({"eval_sets": [{"name": "a", "type": "zeroshot", "data": "DIR/zeroshot", "zeroshot_templates": "TSV"}]},
     "eval_sets.0"),  # lines without {}
    ({"eval_sets": [{"name": "a", "type": "zeroshot", "data": "DIR/zeroshot",
                     "zeroshot_classnames": "DIR/zeroshot_templates.txt"}]}, "eval_sets.0"),  # too few names
])
def test_data_settings_that_cannot_work_fail_at_load_naming_the_field(demo, settings, field):
    raw = json.loads(json.dumps(settings).replace("TSV", str(demo / "train.tsv")).replace("DIR", str(demo)))
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, "run.yaml")
    assert err.value.field == field and "run.yaml" in str(err.value)


def test_make_data_refuses_impossible_counts_before_writing(tmp_path, capsys):
    assert main(["make-data", str(tmp_path / "out"), "--train-samples", "10", "--corrupt", "11"]) == 2
    assert "--corrupt" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_make_data_refuses_a_negative_seed_and_an_output_that_is_a_file_or_not_empty(tmp_path, capsys):
    """A folder of earlier output would keep its stale shards and images mixed in with the new ones."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.tar").write_bytes(b"")
    for args, flag in [([str(tmp_path / "new"), "--data-seed", "-1"], "--data-seed"),
                       ([str(tmp_path / "file")], "out"), ([str(tmp_path / "file" / "sub")], "out"),
                       ([str(tmp_path / "used")], "out"), ([str(tmp_path / "new"), "--zeroshot-samples", "1"],
                                                         "--zeroshot-samples")]:
        assert main(["make-data", *args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"{flag}:" in err
    assert not (tmp_path / "new").exists() and sorted(p.name for p in (tmp_path / "used").iterdir()) == ["old.tar"]


def test_imagenet_names_with_a_slash_are_folders_without_one_read_back_as_those_classes(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    slashed = [name for name in IMAGENET_CLASSNAMES if "/" in name]
    assert len(slashed) == 5 and folder_name("baluster / handrail") == "baluster_or_handrail"
    for name in slashed:
        (tmp_path / "folder" / folder_name(name)).mkdir(parents=True)
        (tmp_path / "folder" / folder_name(name) / "a.jpg").write_bytes(Rows.image)
    assert read_zeroshot(str(tmp_path / "folder"), "imagenet").classnames == tuple(sorted(
        slashed, key=folder_name))
    # 19 classes spread over the 1000 take three of them
    make_data(tmp_path / "data", train_samples=4, shard_size=4, zeroshot_samples=40, retrieval_images=2,
              imagenet_classes=19, progress=False)
    cfg = config_from_dict({"eval_sets": [{"name": "inet", "type": "zeroshot", "zeroshot_classnames": "imagenet",
                                           "data": str(tmp_path / "data" / "imagenet")}]}, "run.yaml")
    inet = read_zeroshot(cfg.eval_sets[0].data, "imagenet")
    assert len(inet.classnames) == 19 and {"baluster / handrail", "shoji screen / room divider",
                                           "swim trunks / shorts"} <= set(inet.classnames)


def test_make_data_with_fewer_zeroshot_images_than_classes_names_only_the_folders_it_writes(tmp_path):
    make_data(tmp_path, train_samples=4, shard_size=4, zeroshot_samples=19, retrieval_images=2, progress=False)
    cfg = config_from_dict({"eval_sets": [{"name": "shapes", "type": "zeroshot", "data": str(tmp_path / "zeroshot"),
                                           "zeroshot_classnames": str(tmp_path / "zeroshot_classnames.txt")}]},
                           "run.yaml")
    shapes = read_zeroshot(cfg.eval_sets[0].data, cfg.eval_sets[0].zeroshot_classnames)
    assert len(shapes.classnames) == 19 and sorted(shapes.labels.tolist()) == list(range(19))
    make_data(tmp_path / "few", train_samples=4, shard_size=4, zeroshot_samples=5, imagenet_classes=10,
              retrieval_images=2, progress=False)
    assert len(read_zeroshot(str(tmp_path / "few" / "imagenet"), "imagenet").classnames) == 5  # no empty folder
    assert all(Path(image).parent.name == folder_name(shapes.classnames[label])
               for image, label in zip(shapes.images, shapes.labels.tolist()))


def test_prepare_text_tags_every_caption_a_syntax_run_on_files_reads(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    settings = {"model": "cpu-s", "dataset": "webdataset", "train_data": shards(demo), "eval_embedded": False,
                "eval_sets": [{"name": "imagenet10", "type": "zeroshot", "data": str(demo / "imagenet"),
                               "zeroshot_classnames": "imagenet"},
                              {"name": "captions", "type": "retrieval", "data": str(demo / "retrieval.tsv")}]}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"sweep": "files_syntax", "settings": settings, "baselines": False,
                                    "axes": {"text_strategy": ["syntax"], "text_tokens": [6]}}))
    assert main(["prepare-text", str(grid), "--embedded-only", "--quiet"]) == 0  # nothing embedded to read
    assert "0 captions in the cache (counted per source: 0 tagged now, 0 found there)" in capsys.readouterr().out

    assert main(["prepare-text", str(grid), "--quiet"]) == 0
    training = list(dict.fromkeys(s.caption for path in expand_paths(shards(demo)) for s in read_shard(path)))
    zeroshot = read_zeroshot(str(demo / "imagenet"), "imagenet")
    prompts = [t.replace("{}", c) for t in zeroshot.templates for c in zeroshot.classnames]
    retrieval = read_retrieval(str(demo / "retrieval.tsv"), "filepath", "title", "\t").captions
    n = len(training) + len(set(prompts)) + len(set(retrieval))  # the three share no caption
    assert f"{n} captions in the cache (counted per source: {n} tagged now, 0 found there)" in capsys.readouterr().out
    reducer = TextReducer("syntax", 6)  # what a run reads: all of it found in the cache
    reducer.prepare(training + prompts + retrieval)
    assert reducer.tagged_texts == 0
    assert main(["prepare-text", str(grid), "--quiet"]) == 0
    assert f"{n} captions in the cache (counted per source: 0 tagged now, {n} found there)" in capsys.readouterr().out


def test_a_template_with_other_braces_is_filled_as_written(demo, tmp_path):
    (tmp_path / "templates.txt").write_text('a {} in JSON: {"kind": "photo"}\n{0} and {x} stay, {} is the name\n')
    zeroshot = read_zeroshot(str(demo / "zeroshot"), None, str(tmp_path / "templates.txt"))
    prompts = []

    def text_features(captions):
        prompts.extend(captions)
        return torch.nn.functional.normalize(torch.ones(len(captions), 4), dim=-1)

    class_features(text_features, zeroshot.classnames[:2], zeroshot.templates)
    assert prompts == ['a blue circle in JSON: {"kind": "photo"}', 'a blue cross in JSON: {"kind": "photo"}',
                       "{0} and {x} stay, blue circle is the name", "{0} and {x} stay, blue cross is the name"]


def test_eval_set_name_and_template_files_may_name_environment_variables(demo, monkeypatch):
    monkeypatch.setenv("DEMO_DATA", str(demo))
    cfg = config_from_dict({"eval_sets": [{
        "name": "shapes", "type": "zeroshot", "data": "$DEMO_DATA/zeroshot",
        "zeroshot_classnames": "${DEMO_DATA}/zeroshot_classnames.txt",
        "zeroshot_templates": "$DEMO_DATA/zeroshot_templates.txt"}]}, "run.yaml")
    assert cfg.eval_sets[0].zeroshot_templates == str(demo / "zeroshot_templates.txt")
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE") as err:
        config_from_dict({"eval_sets": [{"name": "shapes", "type": "zeroshot", "data": str(demo / "zeroshot"),
                                         "zeroshot_templates": "$NOT_SET_ANYWHERE/t.txt"}]}, "run.yaml")
    assert err.value.field == "eval_sets.0.zeroshot_templates"
    # and the home folder, as ~ at the start of a path or of one of its ::-joined parts
    monkeypatch.setenv("HOME", str(demo.parent))
    shards = sorted(p.name for p in (demo / "shards").glob("*.tar"))
    cfg = config_from_dict({"dataset": "webdataset", "train_data": f"~/{demo.name}/shards/{shards[0]}::"
                            f"~/{demo.name}/shards/{shards[1]}", "eval_sets": [{
                                "name": "shapes", "type": "zeroshot", "data": f"~/{demo.name}/zeroshot"}]})
    assert cfg.train_data == f"{demo}/shards/{shards[0]}::{demo}/shards/{shards[1]}"
    assert cfg.eval_sets[0].data == str(demo / "zeroshot")


def test_a_stray_quote_in_a_table_is_refused_naming_its_line_instead_of_swallowing_the_rows_below(demo, tmp_path):
    lines = (demo / "train.tsv").read_text().splitlines()
    for number, caption in [(3, '"open quote, never closed'), (5, '"Stop" sign')]:
        bad = lines.copy()
        bad[number - 1] = bad[number - 1].split("\t")[0] + "\t" + caption  # a caption that starts with "
        (tmp_path / f"line{number}.tsv").write_text("\n".join(bad) + "\n")
        with pytest.raises(ConfigError, match=f"line{number}.tsv line {number}: ") as err:
            config_from_dict({"dataset": "csv", "train_data": str(tmp_path / f"line{number}.tsv")}, "run.yaml")
        assert err.value.field == "train_data"
        with pytest.raises(ConfigError, match=f"line {number}: ") as err:
            config_from_dict({"eval_sets": [{"name": "r", "type": "retrieval",
                                             "data": str(tmp_path / f"line{number}.tsv")}]}, "run.yaml")
        assert err.value.field == "eval_sets.0.data"
    # quotes as the csv module (and pandas) write them read back exactly
    rows = [("images/00000000.jpg", 'the "Stop" sign'), ("images/00000001.jpg", '"quoted"\tand a tab')]
    with open(tmp_path / "quoted.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([("filepath", "title"), *rows])
    (tmp_path / "images").symlink_to(demo / "images")
    source = open_source("csv", str(tmp_path / "quoted.tsv"), "filepath", "title", "\t")
    assert [caption for _, caption in source.rows] == [caption for _, caption in rows]


def test_a_training_table_that_is_not_utf8_has_no_data_row_or_a_column_twice_is_refused_at_load(demo, tmp_path):
    lines = (demo / "train.tsv").read_text().splitlines()
    (tmp_path / "header.tsv").write_text(lines[0] + "\n\n")
    (tmp_path / "twice.tsv").write_text(lines[0] + "\ttitle\n" + "\n".join(line + "\tother" for line in lines[1:5]))
    (tmp_path / "latin1.tsv").write_bytes("\n".join(lines[:40] + [lines[40] + " caf\u00e9"] + lines[41:100])
                                          .encode("latin-1") + b"\n")
    for table, why in [("header.tsv", "has a header but no rows"), ("latin1.tsv", "line 41 is not UTF-8"),
                       ("twice.tsv", "has 2 columns named 'title'")]:
        with pytest.raises(ConfigError, match=why) as err:
            config_from_dict({"dataset": "csv", "train_data": str(tmp_path / table)}, "run.yaml")
        assert err.value.field == "train_data" and table in str(err.value)
    (tmp_path / "four.tsv").write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(ConfigError, match=r"four.tsv has 4 rows, fewer than one batch \(8\)") as err:
        config_from_dict({"dataset": "csv", "train_data": str(tmp_path / "four.tsv"), "batch_size": 8}, "run.yaml")
    assert config_from_dict({"dataset": "csv", "train_data": str(tmp_path / "four.tsv"), "batch_size": 4,
                             "pretrain_samples": 8}).batch_size == 4


def test_a_retrieval_table_whose_image_files_are_missing_is_refused_naming_the_first(demo, tmp_path):
    lines = (demo / "retrieval.tsv").read_text().splitlines()
    (tmp_path / "moved.tsv").write_text("\n".join(lines) + "\n")  # the paths are relative to the table
    with pytest.raises(ConfigError, match=r"row 1 of .*moved.tsv \(after the header\): no such image file "
                                          r".*retrieval_images/000000.jpg \(and 39 more of its 40 images\)") as err:
        config_from_dict({"eval_sets": [{"name": "r", "type": "retrieval", "data": str(tmp_path / "moved.tsv")}]},
                         "run.yaml")
    assert err.value.field == "eval_sets.0.data"
    (tmp_path / "retrieval_images").symlink_to(demo / "retrieval_images")
    (tmp_path / "one_lost.tsv").write_text("\n".join(lines[:7] + ["retrieval_images/lost.jpg\tgone"]) + "\n")
    with pytest.raises(ValueError, match=r"^row 7 of .*: no such image file .*lost.jpg$"):
        read_retrieval(str(tmp_path / "one_lost.tsv"), "filepath", "title", "\t")


def test_an_evaluation_set_none_of_whose_images_decodes_is_refused_at_load_not_after_training(tmp_path):
    for name in ("red", "blue"):
        (tmp_path / "zs" / name).mkdir(parents=True)
        (tmp_path / "zs" / name / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'zs'}: none of its 2 images can be read and decoded") as err:
        config_from_dict({"eval_sets": [{"name": "zs", "type": "zeroshot", "data": str(tmp_path / "zs")}]})
    assert err.value.field == "eval_sets.0"
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "zs" / "blue" / "b.jpg")
    zeroshot = read_zeroshot(str(tmp_path / "zs"))  # one image decodes: the others are skipped and counted
    for path in zeroshot.images:  # ... and if the files break after the check, the evaluation says so
        Path(path).write_bytes(b"not a jpeg")
    features = lambda batch: torch.nn.functional.normalize(torch.ones(len(batch), 4), dim=-1)  # noqa: E731
    with pytest.raises(ValueError, match=f"{tmp_path / 'zs'}: none of its 3 images can be read and decoded"):
        evaluate_on_disk(features, features, zeroshot, 16, workers=0)


def test_table_rows_without_an_image_or_a_caption_are_skipped_naming_the_empty_column(demo, tmp_path, capsys):
    """A caption of only whitespace is no caption, as in shards and retrieval tables."""
    lines = (demo / "train.tsv").read_text().splitlines()[:11]  # the header and rows 0..9
    path = lines[3].split("\t")[0]
    lines[3], lines[5], lines[7] = f"{path}\t  \t ", f"{path}\t", "\tno image"  # rows 2, 4, 6
    (tmp_path / "images").symlink_to(demo / "images")
    (tmp_path / "gaps.tsv").write_text("\n".join(lines) + "\n")
    bad = {str(r) for r in range(10) if _fails(demo / "images" / f"{r:08d}.jpg")} | {"2", "4", "6"}
    batches = StreamedBatches(open_source("csv", str(tmp_path / "gaps.tsv"), "filepath", "title", "\t"),
                              seed=0, stage=0, batch_size=10 - len(bad), image_size=32, workers=0)
    first, _ = batches.next_batch().keys, batches.next_batch()  # the second batch ends the first epoch
    assert sorted(first) == sorted(set(map(str, range(10))) - bad) and batches.skipped >= len(bad)
    err = capsys.readouterr().err
    for row, column in [(3, "title"), (5, "title"), (7, "filepath")]:
        assert f"row {row} of {tmp_path / 'gaps.tsv'} (after the header): empty {column} column" in err


# ------------------------------------------------------------------------------- end to end: `sweep train` on files

def run_config(demo, tmp_path, **settings):
    """A small run on the generated files, evaluated on every kind of set on disk; returns its YAML file."""
    config = {"model": "cpu-s", "dataset": "webdataset", "train_data": shards(demo), "image_strategy": "random",
              "image_tokens": 17, "pretrain_samples": 1280, "batch_size": 64, "threads": 1, "workers": 1,
              "checkpoint_every": 4, "eval_zeroshot_samples": 80, "eval_retrieval_samples": 80,
              "eval_full_length": True,
              "eval_sets": [
                  {"name": "shapes", "type": "zeroshot", "data": str(demo / "zeroshot"),
                   "zeroshot_classnames": str(demo / "zeroshot_classnames.txt"),
                   "zeroshot_templates": str(demo / "zeroshot_templates.txt")},
                  {"name": "inet", "type": "zeroshot", "data": str(demo / "imagenet"),
                   "zeroshot_classnames": "imagenet"},
                  {"name": "coco", "type": "retrieval", "data": str(demo / "retrieval.tsv")},
                  {"name": "cocoshards", "type": "retrieval", "data": str(demo / "retrieval-00000.tar")}],
              **settings}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("dataset, decode", [("webdataset", "workers"), ("csv", "device")])
def test_a_run_on_files_reports_every_evaluation_set_and_counts_corrupt_images(demo, tmp_path, dataset, decode):
    train_data = shards(demo) if dataset == "webdataset" else str(demo / "train.tsv")
    config = run_config(demo, tmp_path, dataset=dataset, train_data=train_data, decode=decode)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    record = read_record(tmp_path / "run")
    assert record.status == "completed"
    for stage in ("pretrain", "pretrain_full_length"):
        metrics = record.metrics[stage].values()
        assert {"zeroshot_top1", "i2t_r1", "shapes_top1", "shapes_top5", "inet_top1", "inet_top5",
                "coco_i2t_r1", "coco_i2t_r5", "coco_i2t_r10", "coco_t2i_r1", "coco_t2i_r5", "coco_t2i_r10"
                } <= set(metrics)
        assert metrics["inet_classes"] == 10 and metrics["shapes_classes"] == 40 and metrics["coco_skipped"] == 0
        assert all(0 <= v <= 100 for k, v in metrics.items() if not k.endswith(("classes", "skipped")))
    full = record.metrics["pretrain_full_length"]
    assert (full.image_tokens, record.metrics["pretrain"].image_tokens) == (65, 17)
    # the retrieval set from a table and from a shard is one set: at full length (no random masks) equal scores
    assert {k: v for k, v in full.values().items() if k.startswith("coco_")} == {
        k.replace("cocoshards_", "coco_"): v for k, v in full.values().items() if k.startswith("cocoshards_")}
    # 1280 samples: two epochs of 596 usable pairs, then 88 of the third: each corrupt one met twice or three times
    assert 2 * CORRUPT <= record.compute.stages["pretrain"].skipped_samples <= 3 * CORRUPT
    assert record.compute.stages["pretrain"].broken_shards == 0
    assert record.compute.stages["pretrain"].loader_workers == record.compute.workers == 1


def running_with(text: str) -> list[int]:
    """The processes on this machine whose command line holds `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.mark.slow
def test_sigkill_on_shards_then_rerun_matches_uninterrupted(demo, tmp_path, sigkill_at_first_checkpoint):
    config = run_config(demo, tmp_path, pretrain_samples=1920, eval_sets=[], eval_full_length=False)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "sweep", "train", str(config), "--quiet", "--out"]
    saved = sigkill_at_first_checkpoint([*command, str(killed)], killed)
    # the lock dies with the trainer, not with its orphaned loader workers; and they end within a second or so
    assert not held_elsewhere(killed)
    for _ in range(100):
        if not running_with(str(killed)):
            break
        time.sleep(0.1)
    assert not running_with(str(killed)), "the killed trainer's loader workers are still running"
    assert 0 < saved["step"] < 30 and saved["data"][0]["taken"] == saved["step"] * 64
    subprocess.run([*command, str(killed)], check=True, stderr=subprocess.DEVNULL)
    subprocess.run([*command, str(clean)], check=True, stderr=subprocess.DEVNULL)
    a, b = read_record(killed), read_record(clean)
    assert a.resumed and a.metrics == b.metrics and a.final_loss == b.final_loss
    assert a.compute.stages["pretrain"].skipped_samples == b.compute.stages["pretrain"].skipped_samples


@pytest.mark.slow
def test_the_files_demo_grid_runs_end_to_end_and_is_analysed(tmp_path):
    """grids/files_demo.yaml as its header says: make-data, launch, analyze (from the directory holding data/)."""
    sweep = [sys.executable, "-m", "sweep"]
    subprocess.run([*sweep, "make-data", "data/demo", "--imagenet-classes", "10", "--quiet"], cwd=tmp_path,
                   check=True, stdout=subprocess.DEVNULL)
    grid = Path(__file__).parent.parent / "grids" / "files_demo.yaml"
    done = subprocess.run([*sweep, "launch", str(grid), "--executor", "local", "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 runs: 4 completed" in done.stdout
    for metric, stage in (("shapes_top1", "pretrain_full_length"), ("captions_i2t_r5", "pretrain")):
        done = subprocess.run([*sweep, "analyze", "results/files_demo", "--metric", metric, "--stage", stage,
                               "--bootstrap", "0"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "analysed 4 runs (0 failed" in done.stdout and f"metric {metric}" in done.stdout
    runs = (tmp_path / "results" / "files_demo" / "analysis" / "runs.csv").read_text()
    assert "captions_i2t_r5" in runs.splitlines()[0]
