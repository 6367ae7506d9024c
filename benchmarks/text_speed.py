"""Captions per second of each text strategy, cold (empty cache) and warm (filled cache), to size the text pipeline.

    python benchmarks/text_speed.py [--captions 5000] [--text-tokens 8] [--batch 256] [--json]

Columns (captions/s; each distinct caption counted once):
  cold     new TextReducer, empty cache dir: split words, spaCy tagging (syntax), encode every caption once
  warm     new TextReducer, cache dir filled by the cold pass: what a second run of a sweep pays at start-up
  call     `reducer(batch, generator)` on prepared captions, batches of --batch: what the trainer pays per step
The spaCy model is loaded before timing (its load time is printed separately), and the BPE word cache is emptied
before each cold pass.

Then the trainer's own appetite: training samples/s of each CPU size at full length (batch 64, one thread, as the
embedded grids run), and how many times faster each strategy serves captions than that (call/s / samples/s, and
warm/s / samples/s for a run's start-up). Target (issue 4): syntax, warm, >= 20x the largest CPU size.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep.strategies import text as text_module  # noqa: E402
from sweep.strategies.syntax import DEFAULT_SPACY_MODEL, load_pipeline  # noqa: E402
from sweep.strategies.text import TEXT_STRATEGIES, TextReducer  # noqa: E402

SIZES = ["tiny", "small", "large", "huge", "little", "big", "medium-sized"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "ellipse", "rectangle", "cross", "pentagon"]
VERBS = ["sits", "rests", "floats", "lies", "hovers", "stands", "leans"]
PLACES = ["above", "below", "beside", "next to", "left of", "right of", "near", "under"]


def make_captions(count: int, seed: int = 0) -> list[str]:
    """Distinct compositional captions like the embedded data's: nouns, adjectives, verbs and prepositions."""
    rng = random.Random(seed)
    captions: dict[str, None] = {}
    while len(captions) < count:
        a, b, c = (f"{rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}" for _ in range(3))
        caption = (
            f"a {a} {rng.choice(VERBS)} {rng.choice(PLACES)} a {b} and a {c} {rng.choice(VERBS)} beside them"
        )
        if rng.random() < 0.3:
            caption = caption.capitalize() + "."
        captions[caption] = None
    return list(captions)


def bench(strategy: str, captions: list[str], text_tokens: int, batch: int, cache_dir: Path) -> dict:
    tokens = 32 if strategy == "none" else text_tokens
    generator = torch.Generator().manual_seed(0)
    row: dict = {"text_strategy": strategy, "text_tokens": tokens, "captions": len(captions)}
    for phase in ("cold", "warm"):
        if phase == "cold":
            text_module._WORD_IDS.clear()
        reducer = TextReducer(strategy, tokens, cache_dir=cache_dir)
        start = time.perf_counter()
        reducer.prepare(captions)
        reducer(captions[:batch], generator)
        row[phase] = len(captions) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(captions), batch):
        reducer(captions[i : i + batch], generator)
    row["call"] = len(captions) / (time.perf_counter() - start)
    return row


def trainer_samples_per_second(model: str, batch: int = 64, steps: int = 5) -> float:
    """Median samples/s of the trainer's step (`sweep.train.ContrastiveStep`) at full length on one thread."""
    import open_clip

    from sweep.config import RunConfig
    from sweep.models import MODELS, build_model
    from sweep.train import ContrastiveStep, Runtime, make_optimizer

    torch.set_num_threads(1)
    spec = MODELS[model]
    net = build_model(model)
    cfg = RunConfig(model=model, device="cpu")
    step = ContrastiveStep(net, make_optimizer(net, cfg, 1e-4), Runtime.of(cfg), 0, cfg.grad_clip)
    images = torch.rand(batch, 3, spec.image_size, spec.image_size)
    text = open_clip.tokenize(make_captions(batch), context_length=spec.text_tokens)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        step(images, None, text)
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])  # the first step warms up
    return batch / times[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--text-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--strategies", nargs="+", default=list(TEXT_STRATEGIES))
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    args = parser.parse_args(argv)

    captions = make_captions(args.captions)
    start = time.perf_counter()
    load_pipeline(DEFAULT_SPACY_MODEL)
    text_module._tokenizer()
    load_seconds = time.perf_counter() - start
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            rows.append(bench(strategy, captions, args.text_tokens, args.batch, Path(tmp)))
    trainer = {m: trainer_samples_per_second(m) for m in ("cpu-s", "cpu-m", "cpu-l")}
    for row in rows:
        row["trainer_samples_per_second"] = {m: round(v, 1) for m, v in trainer.items()}
        row["call_over_trainer"] = {m: round(row["call"] / v, 1) for m, v in trainer.items()}
        row["warm_over_trainer"] = {m: round(row["warm"] / v, 1) for m, v in trainer.items()}
    if args.json:
        for row in rows:
            print(json.dumps({**row, "model_load_seconds": round(load_seconds, 2)}))
        return
    print(f"{args.captions} distinct captions; spaCy + BPE load {load_seconds:.1f} s (not in the numbers)")
    print(f"{'text_strategy':<14}{'text_tokens':>12}{'cold/s':>12}{'warm/s':>12}{'call/s':>12}")
    for row in rows:
        print(
            f"{row['text_strategy']:<14}{row['text_tokens']:>12}{row['cold']:>12,.0f}"
            f"{row['warm']:>12,.0f}{row['call']:>12,.0f}"
        )
    print("trainer samples/s at full length (batch 64, 1 thread): "
          + ", ".join(f"{m} {v:,.0f}" for m, v in trainer.items()))
    print(f"{'text_strategy':<14}" + "".join(f"{'call/' + m:>14}{'warm/' + m:>14}" for m in trainer))
    for row in rows:
        print(f"{row['text_strategy']:<14}" + "".join(
            f"{row['call_over_trainer'][m]:>13,.0f}x{row['warm_over_trainer'][m]:>13,.1f}x" for m in trainer))
    syntax = next((r for r in rows if r["text_strategy"] == "syntax"), None)
    if syntax:
        ratio = syntax["call_over_trainer"]["cpu-l"]
        print(f"{'PASS' if ratio >= 20 else 'FAIL'}: warm syntax serves captions {ratio:,.0f}x faster than cpu-l "
              f"trains on them (target >= 20x)")


if __name__ == "__main__":
    main()
