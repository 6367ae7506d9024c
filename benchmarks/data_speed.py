"""Images/s of ONE data-loader worker: JPEG decode + preprocessing by `sweep.data.images.load_image`, with and
without reduced-size (draft) decoding, at each `resize` length, and the loader workers the trainer needs.

    python benchmarks/data_speed.py [--sizes 224 160 112 96 64] [--seconds 8] [--rates 197=2977,17=11440]
                                    [--quality 95] [--json] [--strict]

About 1.5 min with the defaults (10 cells x 8 s, plus set-up); the process is pinned to one core.

Files: 32 distinct 256x256 JPEGs at quality 95 (img2dataset's defaults: 256 px, "border" resize, which gives
square images, quality 95), made in memory from matplotlib's sample photo grace_hopper.jpg (512x600): square crops
of side 512, 448, 384 and 320 px at 4 positions along the diagonal, each also mirrored (4 x 4 x 2), resized to
256 px (bicubic) and saved with PIL (4:2:0 chroma, as OpenCV's encoder used by img2dataset).

Per cell (output size x transform): passes alternate draft on / draft off (order swapped every pair, so drift and
other processes hit both equally), each pass about --seconds / 8 long over the 32 files in turn; images/s is the
median over passes, and the speedup the median of the per-pair ratios. A training pass uses a fresh
np.random.Generator with the same seed, so both settings cut the same crops.

Target: reduced-size decoding makes 64-px loading >= 3x faster per worker than decoding at full size then
resizing (train and eval transforms both; --strict exits 1 on a FAIL).

Workers needed = ceil(trainer samples/s / per-worker images/s, draft on, train transform). The trainer rates are
measured references from the project's GPU issue (ViT-B-16, one H100, plain open_clip loop, bf16), not from this
run; lengths without a measurement are projected (per-sample time linear in tokens through the measured points).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep.data.images import load_image

PATCH = 16
# ViT-B-16 on one H100, plain open_clip loop, bf16, from the project's GPU issue (not measured by this script):
# 197 tokens: torch.compile, batch 512; 17 tokens: random mask, batch 1024, torch.compile.
REFERENCE_RATES = {197: 2977.0, 17: 11440.0}
TARGET = 3.0


def tokens(size: int) -> int:
    return (size // PATCH) ** 2 + 1


def make_jpegs(count: int = 32, side: int = 256, quality: int = 95) -> list[bytes]:
    """Distinct square JPEGs cut from grace_hopper.jpg: crop sides x diagonal positions x mirror."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    width, height = photo.size
    files = []
    for crop in (512, 448, 384, 320):
        for k in range(4):
            x, y = round(k / 3 * (width - crop)), round(k / 3 * (height - crop))
            tile = photo.crop((x, y, x + crop, y + crop)).resize((side, side), Image.Resampling.BICUBIC)
            for mirror in (False, True):
                img = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else tile
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=quality)
                files.append(buf.getvalue())
    return files[:count]


def one_pass(files: list[bytes], size: int, train: bool, draft: bool, seconds: float) -> float:
    """Images/s of load_image over `files` in turn until `seconds` have passed (whole images only)."""
    rng = np.random.default_rng(0) if train else None  # same seed: same crops with and without draft
    done, start = 0, time.perf_counter()
    while True:
        load_image(files[done % len(files)], size, rng, draft=draft)
        done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and done >= len(files):
            return done / elapsed


def measure(files: list[bytes], size: int, train: bool, seconds: float) -> dict:
    """Interleaved draft/no-draft passes: ~4 pairs per cell, order swapped each pair."""
    pairs, per_pass = 4, seconds / 8
    one_pass(files, size, train, True, 0.0)  # warm-up: first calls pay imports and allocator growth
    one_pass(files, size, train, False, 0.0)
    on, off = [], []
    for i in range(pairs):
        for draft in ((True, False) if i % 2 == 0 else (False, True)):
            (on if draft else off).append(one_pass(files, size, train, draft, per_pass))
    return {"size": size, "image_tokens": tokens(size), "transform": "train" if train else "eval",
            "draft_per_s": statistics.median(on), "full_per_s": statistics.median(off),
            "speedup": statistics.median(a / b for a, b in zip(on, off)),
            "speedup_min": min(a / b for a, b in zip(on, off)),
            "speedup_max": max(a / b for a, b in zip(on, off)), "passes": 2 * pairs}


def trainer_rate(t: int, measured: dict[int, float]) -> tuple[float, str]:
    """Trainer samples/s at `t` tokens: measured, or per-sample time linear in tokens between the two measured
    lengths around `t` (the nearest two at either end). The fixed part stands for the text tower and per-step
    costs that do not shrink with image tokens."""
    if t in measured:
        return measured[t], "measured"
    if len(measured) < 2:
        raise SystemExit(f"no rate for {t} tokens: --rates needs it, or two lengths to project from")
    points = sorted(measured)
    if t < points[0]:  # shorter than every measurement: extend the first segment
        lo, hi = points[0], points[1]
    elif t > points[-1]:  # longer than every measurement: extend the last segment
        lo, hi = points[-2], points[-1]
    else:
        lo, hi = max(p for p in points if p < t), min(p for p in points if p > t)
    b = (1 / measured[hi] - 1 / measured[lo]) / (hi - lo)
    return 1 / (1 / measured[lo] + b * (t - lo)), "projected"


def parse_rates(text: str) -> dict[int, float]:
    return {int(k): float(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 160, 112, 96, 64])
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per cell (size x transform)")
    parser.add_argument("--rates", type=parse_rates, default=None,
                        help="trainer samples/s by image tokens, e.g. 197=2977,17=11440 (replaces the references)")
    parser.add_argument("--quality", type=int, default=95,
                        help="JPEG quality of the test files (default 95, img2dataset's; the gain of draft decoding "
                             "grows as quality falls: entropy decoding, which draft cannot skip, costs less)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a check fails")
    args = parser.parse_args(argv)
    rates = args.rates or REFERENCE_RATES
    for size in args.sizes:  # fail now, not after the timing, if a length has no rate and none can be projected
        trainer_rate(tokens(size), rates)

    # One worker = one core: pin the process, so nothing (a threaded libjpeg, a resize) can borrow a second one.
    core = None
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
    files = make_jpegs(quality=args.quality)
    say = (lambda *a, **k: None) if args.json else print
    say(f"{len(files)} JPEGs 256x256 quality {args.quality}, mean {statistics.mean(map(len, files)) / 1024:.1f} KiB; "
        f"one process pinned to core {core}; {args.seconds:g} s per cell")
    say(f"{'size':>4} {'tokens':>6} {'transform':<9} {'draft img/s':>11} {'full img/s':>10} "
        f"{'speedup':>7} {'pair range':>10}")
    rows = []
    for size in args.sizes:
        for train in (True, False):
            row = measure(files, size, train, args.seconds)
            rows.append(row)
            if args.json:
                print(json.dumps({"row": "speed", **row}), flush=True)
            say(f"{size:>4} {row['image_tokens']:>6} {row['transform']:<9} {row['draft_per_s']:>11,.0f} "
                f"{row['full_per_s']:>10,.0f} {row['speedup']:>6.2f}x "
                f"{row['speedup_min']:>5.2f}-{row['speedup_max']:.2f}", flush=True)

    failed = False
    say("check: reduced-size decoding makes 64-px loading >= 3x faster per worker than decoding at full size "
        "then resizing" + ("" if 64 in args.sizes else ": not run (64 not in --sizes)"))
    for row in (r for r in rows if r["size"] == 64):
        ok = row["speedup"] >= TARGET
        failed |= not ok
        if args.json:
            print(json.dumps({"row": "check", "transform": row["transform"], "speedup": row["speedup"],
                              "target": TARGET, "pass": ok}))
        say(f"  64 px {row['transform']:<5}: {row['speedup']:.2f}x (target >= {TARGET:g}x)  "
            f"{'PASS' if ok else 'FAIL'}")

    say("workers needed = ceil(trainer samples/s / one worker's images/s, train transform)")
    say("  trainer rates: " + ("from --rates" if args.rates else "ViT-B-16, one H100, bf16, plain open_clip loop: "
                               "measured references from the project's GPU issue, not this run"))
    say("  projected = no measurement at that length: per-sample time linear in tokens through the measured points")
    say(f"{'size':>4} {'tokens':>6} {'trainer/s':>9} {'source':<9} {'workers (draft)':>15} {'workers (full)':>14}")
    for row in (r for r in rows if r["transform"] == "train"):
        rate, source = trainer_rate(row["image_tokens"], rates)
        need = math.ceil(rate / row["draft_per_s"])
        need_full = math.ceil(rate / row["full_per_s"])
        if args.json:
            print(json.dumps({"row": "workers", "size": row["size"], "image_tokens": row["image_tokens"],
                              "trainer_per_s": rate, "source": source, "workers": need,
                              "workers_no_draft": need_full}))
        say(f"{row['size']:>4} {row['image_tokens']:>6} {rate:>9,.0f} {source:<9} {need:>15} {need_full:>14}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
