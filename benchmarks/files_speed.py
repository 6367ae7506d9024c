"""`sweep train` on files against `sweep train` on the embedded data in memory: does the loader keep up?

    python benchmarks/files_speed.py [--models cpu-s cpu-m cpu-l] [--workers auto 2] [--repeats 2] [--strict]

About 8 minutes with the defaults on 2 cores. For each model, at full length (`none`, 65 tokens) and at random
masking to 17 tokens (the cheapest step, where the loader is most exposed), the same run (batch 128, 2560 samples,
2 torch threads) trains alternately on the embedded pool in memory and on the same scenes written as webdataset
shards by `sweep make-data` (64-px JPEGs read, decoded and cropped by `workers` loader processes that share the 2
cores with the trainer, or between steps by the trainer itself with `workers: 0`; `auto` leaves the setting empty,
as a grid does: 0 on the CPU), `--repeats` times each, in the order memory, files, memory, files, ... so that machine
drift hits both. The rate compared is the record's
`compute.samples_per_second` (samples over the time spent in training steps, which includes waiting for the next
batch), the median over repeats.

Target: with the loader, training on shards reaches >= 0.9 of the step rate on in-memory data (CPU sizes, 2 cores),
checked on the `auto` rows (what a run gets by default).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

TARGET = 0.9


def train(config: dict, out: Path) -> float:
    """samples/s of one `sweep train` run (a fresh run directory each time)."""
    cfg_file = out.with_suffix(".yaml")
    cfg_file.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "sweep", "train", str(cfg_file), "--out", str(out), "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())["compute"]["samples_per_second"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cpu-s", "cpu-m", "cpu-l"])
    parser.add_argument("--workers", nargs="+", default=["auto", "2"],
                        help="loader processes to try; auto: the setting left empty (0 on the CPU); the target is "
                             "checked on auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2560, help="pre-training samples per run")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a model misses the target")
    args = parser.parse_args()

    from sweep.data.generate import make_data

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data", train_samples=2048, shard_size=256, zeroshot_samples=40, retrieval_images=10,
                  progress=False)
        base = {"pretrain_samples": args.samples,
                "batch_size": 128, "threads": 2, "eval_zeroshot_samples": 40, "eval_retrieval_samples": 40,
                "train_scenes": 2048, "checkpoint_every": 0}
        files = {"dataset": "webdataset", "train_data": str(tmp / "data" / "shards" / "train-{00000..00007}.tar")}
        print(f"{'model':6} {'cell':9} {'workers':>7} {'memory/s':>9} {'files/s':>8} {'ratio':>6}  "
              f"runs (memory | files)")
        for model in args.models:
            for strategy, tokens in (("none", None), ("random", 17)):
                for workers in args.workers:
                    rates: dict[str, list[float]] = {"memory": [], "files": []}
                    cell = {**base, "model": model, "image_strategy": strategy, "image_tokens": tokens}
                    loader = {} if workers == "auto" else {"workers": int(workers)}
                    for r in range(args.repeats):
                        for kind, extra in (("memory", {}), ("files", {**files, **loader})):
                            out = tmp / f"{model}-{strategy}-{workers}-{kind}-{r}"
                            rates[kind].append(train({**cell, **extra}, out))
                    memory, on_files = statistics.median(rates["memory"]), statistics.median(rates["files"])
                    ratio = on_files / memory
                    failed |= ratio < TARGET and workers == "auto"
                    print(f"{model:6} {strategy + str(tokens or 65):9} {workers:>7} {memory:9.0f} {on_files:8.0f} "
                          f"{ratio:6.2f}  {' '.join(f'{v:.0f}' for v in rates['memory'])} | "
                          f"{' '.join(f'{v:.0f}' for v in rates['files'])}", flush=True)
    print(f"target: files/memory >= {TARGET} with workers auto: {'FAIL' if failed else 'PASS'}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
