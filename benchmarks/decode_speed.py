"""Decoding training JPEGs in the loader workers (`decode: workers`) against on the trainer's device
(`decode: device`), side by side in one run:

    python benchmarks/decode_speed.py [--device cpu|cuda] [--sizes 224 64] [--batch N] [--workers N] [--json]

1. one worker (the process pinned to one core): images/s of `load_image` (decode + crop + resample, what a worker
   does for `workers`) against `jpeg_crop` (check the file and draw its crop, what it does for `device`);
2. the trainer's side of `device`: images/s of `decode_crops` on --device for batches of --batch files
   (nvJPEG + roi_align on a GPU), and of its decode alone;
3. on a GPU, that decoding does not overwrite memory the training step's queued kernels still read
   (`stream_safety`);
4. the loader end to end, both ways alternately: samples/s of 224-px batches of --batch from shards on disk,
   through --workers loader processes (received by a thread, into pinned memory, on a GPU as a run does), and the
   CPU the trainer's process spends per sample receiving (and, for `device`, decoding) them; a third row is
   `device` with the decode left out (an empty batch instead), which leaves the hand-over of the files alone.

Files: data_speed.py's 32 distinct 256-px photos at quality 95 (~31 KiB each, img2dataset's defaults), written
as 60 shards of 8 batches in all for part 4. About 1 minute on 2 CPU cores (--device cpu), less on a GPU machine.
On the CPU, part 4's `device` decodes in the trainer's own process, on one core: it shows what the hand-over
costs, not what a GPU gains.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_speed import make_jpegs  # noqa: E402

from sweep.data.images import decode_crops, decode_jpeg, jpeg_crop, load_image  # noqa: E402
from sweep.data.sources import ShardSource  # noqa: E402
from sweep.data import stream  # noqa: E402
from sweep.data.stream import Prefetched, StreamedBatches  # noqa: E402


def per_worker(files: list[bytes], size: int, seconds: float) -> dict:
    """Images/s of one core for each side of the worker's job, in alternating passes (median of 4 each)."""
    def rate(job) -> float:
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 8 or done < len(files):
            job(files[done % len(files)], random.Random(done))
            done += 1
        return done / elapsed

    def workers(f, rng):
        load_image(f, size, rng)

    def device(f, rng):
        jpeg_crop(f, rng)

    runs: dict[str, list[float]] = {"workers": [], "device": []}
    for i in range(4):
        for name, job in ((("workers", workers), ("device", device)) if i % 2 == 0
                          else (("device", device), ("workers", workers))):
            runs[name].append(rate(job))
    w, d = statistics.median(runs["workers"]), statistics.median(runs["device"])
    return {"part": "worker", "size": size, "workers_per_s": w, "device_per_s": d, "ratio": d / w}


def on_device(files: list[bytes], size: int, batch: int, device: torch.device, repeats: int) -> dict:
    """Images/s of decode_crops (and of its decode alone) for batches of `batch` files on `device`."""
    tensors = [torch.frombuffer(bytearray(files[i % len(files)]), dtype=torch.uint8) for i in range(batch)]
    rng = random.Random(0)
    boxes = torch.tensor([jpeg_crop(files[i % len(files)], rng) for i in range(batch)])

    def timed(job) -> float:
        job()  # warm-up: nvJPEG's and roi_align's first calls set up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            job()
        sync()
        return repeats * batch / (time.perf_counter() - start)

    whole = timed(lambda: decode_crops(tensors, boxes, size, device))
    decode = timed(lambda: decode_jpeg(tensors, device=device))
    return {"part": "trainer", "size": size, "batch": batch, "device": str(device), "decode_crops_per_s": whole,
            "decode_alone_per_s": decode}


def stream_safety(files: list[bytes], batch: int, device: torch.device, rounds: int = 5) -> dict:
    """Does decoding on the GPU overwrite memory that queued work still reads? Each round queues a ~0.1-s kernel
    on the default stream (the training step's), then one sum per tensor of the decoder's output size, frees the
    tensors while the sums still wait, and decodes `batch` files; a sum that comes out wrong read memory the
    decoder overwrote. `decode_crops` (the trainer's: a stream of its own, see its docstring) must give none;
    torchvision's `decode_jpeg` called on the default stream shows whether the hazard it avoids is real here."""
    tensors = [torch.frombuffer(bytearray(files[i % len(files)]), dtype=torch.uint8) for i in range(batch)]
    rng = random.Random(0)
    boxes = torch.tensor([jpeg_crop(files[i % len(files)], rng) for i in range(batch)])
    shape = decode_jpeg(tensors[0]).shape  # the decoder's output per file: blocks of this size are what it reuses

    def corrupted(decode) -> int:
        wrong = 0
        for r in range(rounds):
            values = torch.arange(batch) % 250 + 1 + r
            filled = [torch.full(shape, int(v), dtype=torch.uint8, device=device) for v in values]
            torch.cuda.synchronize(device)
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles: the sums are queued behind it
            sums = torch.stack([t.sum(dtype=torch.int64) for t in filled])
            del filled  # their blocks go back to the allocator while the sums have not run
            decode()
            torch.cuda.synchronize(device)
            wrong += int((sums.cpu() != values * shape.numel()).sum())
        return wrong

    return {"part": "stream safety", "batch": batch, "rounds": rounds,
            "corrupted_decode_crops": corrupted(lambda: decode_crops(tensors, boxes, 224, device)),
            "corrupted_decode_jpeg": corrupted(lambda: decode_jpeg(tensors, device=device))}


def write_shards(files: list[bytes], out: Path, shards: int, per_shard: int) -> str:
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:05d}"
                for name, data in ((f"{key}.jpg", files[(s * per_shard + i) % len(files)]),
                                   (f"{key}.txt", f"photo {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, BytesIO(data))
    return str(out / f"{{00000..{shards - 1:05d}}}.tar")


def loader(shards: str, size: int, batch: int, workers: int, device: torch.device, mode: str,
           batches: int) -> dict:
    """Samples/s of the loader alone for `batches` batches after its first, and the CPU of this process (the
    receiving thread, or the loop; the workers are other processes) per sample."""
    from sweep.data.sources import expand_paths
    gpu = device.type == "cuda"
    # "handover": as `device`, with the decode replaced by an empty batch, so that what is left is the hand-over
    stream.decode_crops = (lambda files, boxes, size, on: torch.empty((len(files), 3, size, size),
                                                                      dtype=torch.uint8, device=on)) \
        if mode == "handover" else decode_crops
    made = StreamedBatches(ShardSource(expand_paths(shards)), seed=0, stage=0, batch_size=batch, image_size=size,
                           workers=workers, pin=gpu, decode_on=None if mode == "workers" else device)
    source = Prefetched(made) if gpu else made
    source.next_batch()  # the workers' start and first chunks are left out
    tic, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(batches):
        source.next_batch()
    if gpu:
        torch.cuda.synchronize(device)  # the last batch's decode is done
    seconds, end = time.perf_counter() - tic, resource.getrusage(resource.RUSAGE_SELF)
    source.close()
    used = end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime
    return {"part": "loader", "mode": mode, "size": size, "batch": batch, "workers": made.workers,
            "samples_per_s": batches * batch / seconds, "trainer_cpu_us_per_sample": 1e6 * used / (batches * batch)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64], help="output sides (px) of parts 1-2")
    parser.add_argument("--batch", type=int, default=None, help="files per batch (default 1024 on cuda, 128 on cpu)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes of part 3 (default: a GPU run's default on cuda, 1 on cpu)")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per size of part 1")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (1024 if gpu else 128)
    if args.workers is None:
        from sweep.train.step import gpu_workers
        args.workers = gpu_workers() if gpu else 1
    files = make_jpegs()
    show = (lambda row, text: print(json.dumps(row), flush=True)) if args.json else \
        (lambda row, text: print(text, flush=True))

    if not args.json:
        print(f"{len(files)} JPEGs 256x256 quality 95, mean {statistics.mean(map(len, files)) / 1024:.1f} KiB; "
              f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if gpu else ''}")
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})  # part 1 is one worker: one core
    for size in args.sizes:
        row = per_worker(files, size, args.seconds)
        show(row, f"one worker, {size} px: decode + crop {row['workers_per_s']:,.0f} img/s (workers); check + crop "
                  f"{row['device_per_s']:,.0f} img/s (device): {row['ratio']:.1f}x less of a worker per image")
    if affinity:
        os.sched_setaffinity(0, affinity)

    for size in args.sizes:
        row = on_device(files, size, batch, device, repeats=5 if gpu else 2)
        show(row, f"trainer, {size} px, batches of {batch} on {device}: decode_crops {row['decode_crops_per_s']:,.0f} "
                  f"img/s (decode alone {row['decode_alone_per_s']:,.0f})")

    if gpu:
        row = stream_safety(files, batch, device)
        verdict = "PASS" if row["corrupted_decode_crops"] == 0 else "FAIL"
        show(row, f"stream safety, {row['rounds']} rounds of {batch} files: decode_crops overwrote "
                  f"{row['corrupted_decode_crops']} of {row['rounds'] * batch} queued sums' inputs ({verdict}); "
                  f"decode_jpeg on the default stream {row['corrupted_decode_jpeg']}")

    with tempfile.TemporaryDirectory() as tmp:
        # 60 shards: the loader's streams share out evenly among 1-6, 10, 12 or 15 workers
        shards = write_shards(files, Path(tmp), 60, -(-8 * batch // 60))
        rows: dict[str, list[dict]] = {"workers": [], "device": [], "handover": []}
        for mode in ("workers", "device", "handover", "handover", "device", "workers"):
            rows[mode].append(loader(shards, 224, batch, args.workers, device, mode, batches=5))
        for mode, runs in rows.items():
            row = {**runs[0], "samples_per_s": statistics.mean(r["samples_per_s"] for r in runs),
                   "trainer_cpu_us_per_sample": statistics.mean(r["trainer_cpu_us_per_sample"] for r in runs)}
            what = "device, hand-over only (no decode)" if mode == "handover" else mode
            show(row, f"loader, 224 px, batches of {batch}, {row['workers']} workers, decode {what}: "
                      f"{row['samples_per_s']:,.0f} samples/s; trainer's process "
                      f"{row['trainer_cpu_us_per_sample']:.0f} us CPU per sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
