"""Streamed training batches from files (webdataset shards, CSV tables), with an exact resume.

The order of an epoch is a function of (seed, stage, epoch) and of nothing operational, not of the number of loader
workers or the machine:

- The epoch is split into `streams = min(STREAMS, what the source allows)` logical streams (`sources.py` says what
  stream s of n holds: a share of the shards, read sequentially and buffer-shuffled, or of the table's rows).
- Each stream is cut into chunks of CHUNK consecutive raw samples (chunk k holds positions k*CHUNK .. k*CHUNK+31).
- The epoch's sample order is the chunks in (k, stream) order: chunk 0 of every stream, then chunk 1 of every
  stream still going, and so on. Batches are consecutive `batch_size` samples of that order; a batch may straddle
  two epochs, so no sample is ever dropped.

Loader workers decode whole chunks (a worker owns the streams w, w+W, ...; its own order is the same (k, stream)
rule, so chunks arrive almost in order) and the main process puts them back in order. Every stream advances at the
same pace, so the loader is as fast as its busiest worker: a rank's streams are many (STREAMS in all, where the
data has as many shards) so that they share out evenly among its workers, and the loader starts only as many workers
as that pace needs (`loader_workers`). The position of an epoch is
how many raw samples of each stream have gone into batches (`consumed`); a checkpoint holds it, and a restarted
stream skips that many raw samples without decoding them and goes on. So a resumed run trains on exactly the
batches an uninterrupted run trains on: no sample seen twice, none skipped.

On several ranks, rank r reads streams r, r + ranks, ... (`streams` is then at least the number of ranks) and
makes its share of every batch from them in the same (k, stream) order. Each rank's epoch is its share of
`epoch_samples` (which a run on several ranks must set; a rank whose streams run out first is an error): were the
epochs each rank's own streams, a rank with fewer samples (a partial last shard, corrupt images) would start its
next epoch early and could read a shard another rank is still reading, putting one pair twice into a global batch.
So the ranks read distinct shards (or rows) within an epoch and all end it at the same batch, but which samples
share a batch depends on the number of ranks (it does not on the embedded data), and a checkpoint holds one
position per rank: resume a run on files on as many ranks as it started with.

A sample that cannot be used (an image that does not decode, a missing caption or image) is skipped and counted
(`skipped`), never a crash; so is a shard that cannot be read to its end (`broken_shards`: how many samples it
still held cannot be known). `epoch_samples` (the setting `train_num_samples`) ends an epoch
after that many samples, like open_clip_train's epoch size.
"""
from __future__ import annotations

import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sweep.data.images import MIN_CROP_SCALE, BadImage, decode_crops, jpeg_crop, load_image
from sweep.data.sources import RawSample, ShardSource, TableSource
from sweep.results import drop_inherited_locks

if TYPE_CHECKING:
    from sweep.strategies.text import TextReducer

# logical streams per epoch where the data allows (a shard is one stream's): 240 share out evenly among 1-6, 8, 10,
# 12, 15 or 16 workers, and among 15 workers on each of 8 ranks (30 streams a rank)
STREAMS = 240
CHUNK = 32  # raw samples per chunk: the unit a loader worker decodes and hands over
WARN_SKIPPED = 10  # the first this many skipped samples (and broken shards) of a run are named on stderr
SHARE_ABOVE = 1 << 20  # bytes of a chunk's images above which a worker hands them over as shared memory


def loader_workers(workers: int, streams: int) -> int:
    """The fewest loader processes that read `streams` streams as fast as `workers` would. The busiest worker owns
    ceil(streams / workers) streams and sets the pace of all of them (16 streams on 15 workers: one owns two, so the
    loader runs at the speed of 8 workers, and 8 are started)."""
    if workers <= 0 or streams <= 0:
        return 0
    busiest = -(-streams // min(workers, streams))
    return -(-streams // busiest)


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 [B, 3, S, S]
    captions: list[str]
    keys: list[str]
    tokens: torch.Tensor | None  # [B, text_tokens] when the loader workers tokenised the captions, else None


@dataclass
class Chunk:
    """Decoded samples of one stream of an epoch, from raw position index * CHUNK (or where a resumed stream
    starts) to `end`."""

    stream: int
    index: int  # where the chunk sits in the epoch's (index, stream) order
    end: int
    last: bool  # the stream has nothing after `end`
    positions: list[int] = field(default_factory=list)  # raw position of each usable sample
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    # How a chunk reaches the trainer's thread from a worker: a torch tensor comes as shared memory, with a socket
    # handshake each (~0.65 ms), a numpy array by value through the pipe (a copy or two). Small arrays go by value
    # (tokens; 32 64-px images: ~0.1 ms), large images as a tensor (32 224-px images: ~30% less of the trainer's
    # CPU than by value).
    images: np.ndarray | torch.Tensor | None = None  # uint8 [usable samples not deferred, 3, S, S]
    tokens: np.ndarray | None = None  # [len(positions), text_tokens], when the workers tokenise
    # Which usable samples' JPEGs are left to the trainer's device to decode (none unless it decodes), those files
    # end to end (uint8), where each ends, and each one's crop in pixels. The others (PNGs, say) are in `images`.
    deferred: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # bool [len(positions)]
    files: np.ndarray | torch.Tensor | None = None
    ends: np.ndarray | None = None  # int64 [deferred samples]
    boxes: np.ndarray | None = None  # float64 [deferred samples, 4]
    # (position, where, why, lost) of each unusable sample; `lost`: a stand-in for the rest of a broken shard
    bad: list[tuple[int, str, str, bool]] = field(default_factory=list)


def decode(sample: RawSample, image_size: int, rng: random.Random, defer: bool = False,
           min_crop_scale: float = MIN_CROP_SCALE) -> np.ndarray | tuple[bytes, tuple[float, float, float, float]]:
    """The sample's training image (uint8 [S, S, 3], a crop of `min_crop_scale` to all of its area); with `defer`,
    its JPEG file and crop box instead where the trainer's device can decode that file (`jpeg_crop`); or ValueError
    saying why the sample is unusable."""
    if sample.lost:
        raise ValueError(sample.lost)
    if lacking := sample.lacks():
        raise ValueError(lacking)
    try:  # a table's image is a path: read apart from decoding, so that a missing file is named as such
        file = sample.image if isinstance(sample.image, bytes) else Path(sample.image).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read image {sample.image} ({err.strerror or err})") from None
    try:
        box = jpeg_crop(file, rng, min_crop_scale) if defer else None
        return (file, box) if box is not None else load_image(file, image_size, rng, min_crop_scale=min_crop_scale)
    except BadImage as err:
        raise ValueError(f"image does not decode ({err})") from None


class EpochChunks(IterableDataset):
    """The chunks of streams `read` (of `streams`) of one epoch, each stream starting at raw position
    `start[stream]`; with a `text` reducer, their captions tokenised too; with `defer`, JPEGs left to the trainer's
    device to decode."""

    def __init__(self, source: ShardSource | TableSource, seed: int, stage: int, epoch: int, streams: int,
                 read: range, start: list[int], image_size: int, text: "TextReducer | None" = None,
                 defer: bool = False, min_crop_scale: float = MIN_CROP_SCALE):
        self.source, self.seed, self.stage, self.epoch = source, seed, stage, epoch
        self.streams, self.read, self.start, self.image_size, self.text = streams, read, start, image_size, text
        self.defer, self.min_crop_scale = defer, min_crop_scale

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        mine = self.read[info.id::info.num_workers] if info else self.read
        going = {s: self._chunks(s) for s in mine}
        # the index of each stream's next chunk: a chunk is decoded only when its turn comes, not one per stream ahead
        upcoming = {s: self.start[s] // CHUNK for s in mine}
        while upcoming:  # the epoch's own order: lowest chunk index first, then stream
            s = min(upcoming, key=lambda s: (upcoming[s], s))
            chunk = next(going[s])
            yield chunk
            if chunk.last:
                del upcoming[s]
            else:
                upcoming[s] = chunk.index + 1

    def _chunks(self, s: int) -> Iterator[Chunk]:
        raw = self.source.stream(self.seed, self.stage, self.epoch, s, self.streams)
        position = self.start[s]
        for _ in range(position):  # already trained on: skipped without decoding
            next(raw, None)
        ahead = next(raw, None)
        while True:
            end = (position // CHUNK + 1) * CHUNK
            chunk = Chunk(s, position // CHUNK, position, last=False)
            images, deferred, files, boxes = [], [], [], []
            while ahead is not None and position < end:
                sample, ahead = ahead, next(raw, None)
                # the crop of a sample is a function of the sample's place in the epoch, not of the worker
                rng = random.Random(f"{self.seed}/{self.stage}/{self.epoch}/{s}/{position}")
                try:
                    image = decode(sample, self.image_size, rng, self.defer, self.min_crop_scale)
                    later = isinstance(image, tuple)  # (file, box): the trainer's device decodes it
                    if later:
                        files.append(image[0])
                        boxes.append(image[1])
                    else:
                        images.append(image)
                    deferred.append(later)
                    chunk.positions.append(position)
                    chunk.keys.append(sample.key)
                    chunk.captions.append(sample.caption)
                except ValueError as err:
                    chunk.bad.append((position, sample.where or sample.key, str(err), sample.lost is not None))
                position += 1
            chunk.end, chunk.last = position, ahead is None
            chunk.deferred = np.array(deferred, dtype=bool)
            if images:
                chunk.images = shared(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
            if files:
                chunk.files = shared(np.frombuffer(bytearray(b"".join(files)), dtype=np.uint8))
                chunk.ends = np.cumsum([len(f) for f in files])
                chunk.boxes = np.array(boxes, dtype=np.float64)
            if chunk.positions:
                chunk.tokens = self.text(chunk.captions).numpy() if self.text else None
            yield chunk
            if chunk.last:
                return


def shared(array: np.ndarray) -> np.ndarray | torch.Tensor:
    """How a worker hands `array` over: a large one as a tensor (shared memory), a small one by value."""
    return torch.from_numpy(array) if array.nbytes > SHARE_ABOVE else array


class StreamedBatches:
    """Batches from a source, in the epoch order described above.

    `position()` is what a checkpoint keeps; passing it back as `position` continues exactly there. With a `text`
    reducer whose strategy draws nothing at random and tags nothing (none, truncation), the loader workers tokenise
    the captions too (`Batch.tokens`): ~25 us per new caption that the training process no longer spends.
    With `decode_on` (a device), the workers leave JPEGs to it: a batch's files are decoded there at once
    (`sweep.data.images.decode_crops`) and its images come on that device. Which samples are usable, and so the
    order and the position, are the same either way."""

    def __init__(self, source: ShardSource | TableSource, *, seed: int, stage: int, batch_size: int,
                 image_size: int, workers: int, epoch_samples: int | None = None,
                 position: dict[str, Any] | None = None, text: "TextReducer | None" = None, rank: int = 0,
                 ranks: int = 1, pin: bool = False, decode_on: torch.device | str | None = None,
                 min_crop_scale: float = MIN_CROP_SCALE):
        self.source, self.seed, self.stage, self.batch_size = source, seed, stage, batch_size
        self.text = text if text is not None and text.deterministic and not text.needs_pos else None
        self.image_size, self.min_crop_scale = image_size, min_crop_scale
        self.ranks = ranks
        self.epoch_samples = None if epoch_samples is None else epoch_samples // ranks  # this rank's share
        self.streams = min(max(STREAMS, ranks), source.max_streams)
        if self.streams < ranks:
            raise ValueError(f"the training data can be split into {source.max_streams} streams (one per shard), "
                             f"fewer than the run's {ranks} processes: use more, smaller shards")
        self.read = range(rank, self.streams, ranks)  # the streams of this rank
        self.workers = loader_workers(workers, len(self.read))
        position = position or {}
        self.epoch: int = position.get("epoch", 0)
        self.consumed: list[int] = list(position.get("consumed") or [0] * self.streams)
        self.taken: int = position.get("taken", 0)  # usable samples of this epoch gone into batches
        self.skipped: int = position.get("skipped", 0)  # unusable samples passed over, all epochs
        self.broken_shards: int = position.get("broken_shards", 0)  # shards that broke off, all epochs
        if len(self.consumed) != self.streams:
            raise ValueError(f"the checkpoint's data position has {len(self.consumed)} streams, the data now gives "
                             f"{self.streams}: the training set, or how this version splits an epoch into "
                             "streams, changed since the checkpoint")
        self._chunks: EpochReader | None = None  # the current epoch's chunks, in order
        self._prefetched: EpochReader | None = None  # the next epoch's, started once the current one is read
        self._chunk: Chunk | None = None  # the chunk being taken from, and how many of its samples are taken
        self._used = 0
        self.pin = pin  # gather batch images into pinned memory (for an asynchronous copy to a GPU)
        self.decode_on = None if decode_on is None else torch.device(decode_on)

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": list(self.consumed), "taken": self.taken, "skipped": self.skipped,
                "broken_shards": self.broken_shards}

    def close(self) -> None:
        """Stop the loader workers now (not when the garbage collector gets to them)."""
        self._chunks = self._prefetched = None

    def next_batch(self) -> Batch:
        parts: list[tuple[Chunk, int, int]] = []  # (chunk, first, end): slices, not single samples
        need = self.batch_size
        while need:
            chunk = self._current()
            n = min(need, len(chunk.positions) - self._used)
            if self.epoch_samples is not None:
                n = min(n, self.epoch_samples - self.taken)
            first, self._used = self._used, self._used + n
            parts.append((chunk, first, self._used))
            # the stream moves on to its next usable sample (or the chunk's end): unusable ones between are passed
            self._advance(chunk, chunk.end if self._used == len(chunk.positions) else chunk.positions[self._used])
            self.taken += n
            need -= n
        return Batch(self._images(parts),
                     [c for chunk, a, b in parts for c in chunk.captions[a:b]],
                     [k for chunk, a, b in parts for k in chunk.keys[a:b]],
                     torch.from_numpy(np.concatenate([chunk.tokens[a:b] for chunk, a, b in parts]))
                     if self.text else None)

    def _images(self, parts: list[tuple[Chunk, int, int]]) -> torch.Tensor:
        """The images of usable samples a..b of each chunk, in order: uint8 [batch_size, 3, S, S]."""
        pixels, files, boxes, deferred = [], [], [], []
        for chunk, a, b in parts:
            # usable samples a..b are files f0..f1 and worker-decoded images a-f0..b-f1 of the chunk
            f0 = int(chunk.deferred[:a].sum())
            f1 = f0 + int(chunk.deferred[a:b].sum())
            if b - a > f1 - f0:
                pixels.append(torch.as_tensor(chunk.images[a - f0:b - f1]))
            if f1 > f0:
                data, ends = torch.as_tensor(chunk.files), chunk.ends
                files += [data[ends[i - 1] if i else 0:ends[i]] for i in range(f0, f1)]
                boxes.append(torch.from_numpy(chunk.boxes[f0:f1]))
            deferred.append(torch.from_numpy(chunk.deferred[a:b]))
        if not files:
            # pinned: the caching host allocator hands back the same few buffers, so pinning costs nothing per batch
            out = torch.empty((self.batch_size, *pixels[0].shape[1:]), dtype=torch.uint8, pin_memory=True) \
                if self.pin else None
            return torch.cat(pixels, out=out)
        decoded = decode_crops(files, torch.cat(boxes), self.image_size, self.decode_on)
        if not pixels:
            return decoded
        # rows found on the host: a boolean mask on the device would make the host wait for it
        on, device = torch.cat(deferred), self.decode_on
        images = torch.empty((self.batch_size, *decoded.shape[1:]), dtype=torch.uint8, device=device)
        images[on.nonzero()[:, 0].to(device)] = decoded
        images[(~on).nonzero()[:, 0].to(device)] = torch.cat(pixels).to(device)
        return images

    def start(self) -> None:
        """Start the loader workers on the current epoch now (before a stage's clock starts, say)."""
        if self._chunks is None and not self._epoch_full():
            self._chunks = self._prefetched or self._epoch(self.epoch, self.consumed)
            self._prefetched = None

    def _current(self) -> Chunk:
        """The chunk the next sample comes from: moves to the next chunk, and the next epoch, as they run out."""
        while True:
            if self._chunk is not None and self._used < len(self._chunk.positions) and not self._epoch_full():
                return self._chunk
            self.start()
            chunk = None if self._epoch_full() else next(self._chunks, None)
            # the epoch's streams are ending: start workers on the next epoch, so that its first batch is ready when
            # this one runs out (not when epoch_samples may cut it short)
            if self._chunks and self._chunks.ending and not self._prefetched and self.workers \
                    and self.epoch_samples is None:
                self._prefetched = self._epoch(self.epoch + 1, [0] * self.streams)
            if chunk is None:  # the epoch is over
                if self.ranks > 1 and self.epoch_samples is not None and self.taken < self.epoch_samples:
                    raise RuntimeError(f"epoch {self.epoch}: this process's streams held {self.taken} usable samples, "
                                       f"fewer than its share ({self.epoch_samples}) of train_num_samples; lower "
                                       f"it (to {self.taken * self.ranks} at most, by this epoch): the "
                                       f"{self.ranks} processes must end every epoch at the same batch")
                if self.taken < self.batch_size:  # a batch would hold a pair twice, each copy the other's negative
                    raise RuntimeError(f"epoch {self.epoch} of the training data has {self.taken} usable samples, "
                                       f"fewer than one batch ({self.batch_size}"
                                       f"{' on this process' if len(self.read) < self.streams else ''}; "
                                       f"{self.skipped} skipped and {self.broken_shards} broken shards so far)")
                self._chunks = self._chunk = None  # stops its workers
                self.epoch, self.consumed, self.taken = self.epoch + 1, [0] * self.streams, 0
                continue
            self._chunk, self._used = chunk, 0
            if not chunk.positions:  # nothing usable in it: pass over it now
                self._advance(chunk, chunk.end)

    def _epoch_full(self) -> bool:
        return self.epoch_samples is not None and self.taken >= self.epoch_samples

    def _epoch(self, epoch: int, consumed: list[int]) -> "EpochReader":
        chunks = EpochChunks(self.source, self.seed, self.stage, epoch, self.streams, self.read, consumed,
                             self.image_size, self.text, defer=self.decode_on is not None,
                             min_crop_scale=self.min_crop_scale)
        loader = DataLoader(chunks, batch_size=None, num_workers=self.workers, worker_init_fn=worker_init,
                            prefetch_factor=4 if self.workers else None)
        return EpochReader(iter(loader), {s: consumed[s] for s in self.read})

    def _advance(self, chunk: Chunk, to: int) -> None:
        """Move stream `chunk.stream` to raw position `to`, counting the unusable samples passed over."""
        for position, where, why, lost in chunk.bad:
            if self.consumed[chunk.stream] <= position < to:
                if lost:
                    self.broken_shards += 1
                    if self.broken_shards <= WARN_SKIPPED:
                        print(f"skipping {where}: {why}", file=sys.stderr)
                else:
                    self.skipped += 1
                    if self.skipped <= WARN_SKIPPED:
                        print(f"skipping training {where}: {why}", file=sys.stderr)
        self.consumed[chunk.stream] = to


class Prefetched:
    """The batches of a StreamedBatches, made `depth` ahead by a thread of the training process (for a GPU run).

    Receiving a batch from the loader workers costs the receiving thread CPU time: ~130 us per 224-px sample (the
    chunks' shared memory mapped and first touched, gathered into one batch), which at 10,000 samples/s is more than
    a whole core. Here that happens beside the training thread, whose CPU launches the GPU's kernels; torch's copy
    and gather release the GIL. With the loader's `pin`, batch images come in pinned memory, so that the copy to
    the GPU is asynchronous. With `decode_on` (`decode: device`) the thread also decodes the batch's JPEGs on the
    GPU. The loader then hands over files, not pixels: a ~31 KiB file instead of 150 KB for a 224-px sample, and
    ~10x less of the receiving thread's CPU (benchmarks/decode_speed.py on 2 CPU cores: 52 against 580 us).
    The decode's kernels queue on the device's default stream, ahead of the training thread's that use the batch.
    The batches and their order are the wrapped loader's; `position()` and `skipped` are those after the last batch
    handed out, so a checkpoint resumes exactly there. `close()` stops the thread and the workers."""

    def __init__(self, batches: StreamedBatches, *, depth: int = 2):
        self.batches = batches
        self._position, self.skipped = batches.position(), batches.skipped
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batches", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self.batches.start()
            self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.batches.next_batch()
                self._put((batch, self.batches.position(), self.batches.skipped))
        except BaseException as err:  # raised in the training thread at its next batch
            self._put(err)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                return self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue

    def next_batch(self) -> Batch:
        self.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._position, self.skipped = item
        return batch

    def position(self) -> dict[str, Any]:
        return self._position

    @property
    def workers(self) -> int:
        return self.batches.workers

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.batches.close()


class EpochReader:
    """The chunks of one epoch from its loader, put back in the epoch's (index, stream) order. The workers start
    when it is made and stop when it is dropped. `ending`: a stream has delivered its last chunk (the others, which
    are as long give or take a shard, are about to)."""

    def __init__(self, pulled: Iterator[Chunk], consumed: dict[int, int]):
        self.pulled = pulled
        self.upcoming = {s: position // CHUNK for s, position in consumed.items()}
        self.arrived: dict[tuple[int, int], Chunk] = {}
        self.ending = False

    def __iter__(self) -> "EpochReader":
        return self

    def __next__(self) -> Chunk:
        if not self.upcoming:
            raise StopIteration
        s = min(self.upcoming, key=lambda s: (self.upcoming[s], s))
        while (s, self.upcoming[s]) not in self.arrived:
            try:
                chunk = next(self.pulled)
            except StopIteration:
                raise RuntimeError(f"the loader ended without chunk {self.upcoming[s]} of stream {s}") from None
            self.arrived[chunk.stream, chunk.index] = chunk
            self.ending |= chunk.last
        chunk = self.arrived.pop((s, self.upcoming[s]))
        self.upcoming[s] += 1
        if chunk.last:
            del self.upcoming[s]
        return chunk


def worker_init(_worker: int) -> None:
    torch.set_num_threads(1)  # a worker decodes with PIL; torch threads would only compete with the trainer
    drop_inherited_locks()  # the run's lock must die with the trainer, not with its last orphaned worker
    exit_with_parent()


def exit_with_parent(poll: float = 0.5) -> None:
    """End this loader worker within `poll` seconds of its trainer's end, however it ended. A SIGKILLed trainer
    leaves its workers behind, and torch's own check only ends a worker's loop: the worker then waits forever to
    flush chunks nobody will read into a full pipe (found holding ~500 MB each an hour after a kill)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(0)  # not sys.exit: the exit handlers are what waits on the pipe

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
