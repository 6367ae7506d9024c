"""How fast the launcher's bookkeeping is at sweep scale (targets from issue 3):

- expanding and validating a 10,000-cell grid: under 1 second;
- `sweep status` reading 10,000 run directories: under 2 seconds.

    python benchmarks/launch_speed.py [--cells 10000] [--repeats 3] [--json]

Each timing is the median of --repeats runs in this process (imports and the first-call warm-up excluded).
The status check writes 10,000 realistic run directories (a result.json of a real record's size, a heartbeat)
into a temporary directory first, mixing completed, failed and never-started runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from sweep.grid import expand
from sweep.status import collect

STRATEGY_CELLS = [{"image_strategy": ["random", "grid", "block", "resize"], "image_tokens": [50, 37, 26, 17, 10, 5]}]


def grid_of(cells: int) -> dict:
    seeds = max(1, round(cells / (3 * 24)))
    return {"sweep": "bench", "settings": {"pretrain_samples": 6400},
            "axes": {"model": ["cpu-s", "cpu-m", "cpu-l"], "image": STRATEGY_CELLS, "seed": list(range(seeds))}}


def time_expand(raw: dict, repeats: int) -> tuple[float, int]:
    expand(raw, "bench.yaml")  # warm-up: imports, caches
    times, n = [], 0
    for _ in range(repeats):
        tic = time.perf_counter()
        _, runs = expand(raw, "bench.yaml")
        times.append(time.perf_counter() - tic)
        n = len(runs)
    return statistics.median(times), n


def write_sweep(root: Path, raw: dict, runs_wanted: int) -> int:
    _, runs = expand(raw, "bench.yaml")
    runs = runs[:runs_wanted]
    sweep = root / "bench"
    manifest = {"sweep": "bench", "runs": {}, "launches": []}
    filler = {"pretrain": {"zeroshot_top1": 12.3, "zeroshot_top5": 45.6, "i2t_r1": 7.8, "t2i_r1": 9.1,
                           "zeroshot_classes": 40}, "finetune": None}
    for i, run in enumerate(runs):
        run_dir = sweep / run.run_id
        run_dir.mkdir(parents=True)
        manifest["runs"][run.run_id] = {"config": run.config.to_dict(), "baseline": run.baseline,
                                        "jobs": []}
        if i % 10 == 9:
            continue  # never started
        status = "failed" if i % 10 == 8 else "completed"
        record = {"run_id": run.run_id, "status": status, "error": "loss became nan" if status == "failed" else None,
                  "metrics": filler, "config": run.config.to_dict(),
                  "compute": {"samples_seen": 6400, "train_flops": 1e12, "wall_seconds": 30.0},
                  "versions": {"torch": "2.14.1", "open_clip_torch": "3.3.0", "python": "3.11.7"}}
        (run_dir / "result.json").write_text(json.dumps(record, indent=2))
        (run_dir / "heartbeat").touch()
    (sweep / "manifest.json").write_text(json.dumps(manifest))
    return len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    raw = grid_of(args.cells)
    expand_s, n_runs = time_expand(raw, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        n_dirs = write_sweep(Path(tmp), raw, args.cells)
        collect(Path(tmp) / "bench")  # warm the page cache as a second `sweep status` would find it
        times = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            rows = collect(Path(tmp) / "bench")
            times.append(time.perf_counter() - tic)
        status_s = statistics.median(times)
    rows_out = [
        {"check": "expand+validate grid", "items": n_runs, "seconds": round(expand_s, 3), "target_s": 1.0,
         "ratio_to_target": round(expand_s / 1.0, 3)},
        {"check": "status of run dirs", "items": n_dirs, "seconds": round(status_s, 3), "target_s": 2.0,
         "ratio_to_target": round(status_s / 2.0, 3)},
    ]
    assert len(rows) == n_dirs
    if args.json:
        print(json.dumps(rows_out, indent=1))
        return
    print(f"{'check':<24} {'items':>7} {'seconds':>8} {'target':>7} {'time/target':>12}")
    for r in rows_out:
        verdict = "PASS" if r["seconds"] <= r["target_s"] else "FAIL"
        print(f"{r['check']:<24} {r['items']:>7} {r['seconds']:>8.3f} {r['target_s']:>6.1f}s "
              f"{r['ratio_to_target']:>12.3f}  {verdict}")


if __name__ == "__main__":
    main()
