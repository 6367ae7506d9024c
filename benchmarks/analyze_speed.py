"""Time ``sweep analyze`` on a large synthetic sweep (target: under ten seconds for 100,000 result rows).

    python benchmarks/analyze_speed.py                    # 100,000-row Parquet table, in-process and as a command
    python benchmarks/analyze_speed.py --rows 20000 --json 2000   # also time 2,000 result.json files

The table comes from `analysis.synthetic` (known drop curves, Gaussian seed noise): ``--models`` sizes x 41 grid
cells x 2 stages x as many seeds as it takes to reach ``--rows``. The in-process time covers loading, drops, fits,
bootstrap, scaling law, figures and report; the command time adds interpreter start-up and imports.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import synthetic  # noqa: E402


def make_rows(rows: int, models: int) -> "synthetic.pd.DataFrame":
    sizes = {f"vit-{i:02d}": float(p) for i, p in enumerate(np.geomspace(5e6, 1e9, models))}
    per_seed = models * (1 + len(synthetic.IMAGE_TOKENS) * len(synthetic.IMAGE_STRATEGIES)
                         + len(synthetic.TEXT_TOKENS) * len(synthetic.TEXT_STRATEGIES)) * 2
    table = synthetic.make_table(sizes, seeds=math.ceil(rows / per_seed), noise=0.4)
    return table.sort_values("seed", kind="stable").head(rows).reset_index(drop=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="result rows (run x stage) to generate")
    parser.add_argument("--models", type=int, default=24, help="model sizes in the grid")
    parser.add_argument("--json", type=int, default=0, metavar="N", help="also write and time N result.json rows")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    args = parser.parse_args()

    from analysis.pipeline import run_analysis
    import matplotlib

    matplotlib.use("Agg")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = make_rows(args.rows, args.models)
        path = tmp / f"results.{args.format}"
        table.to_parquet(path) if args.format == "parquet" else table.to_csv(path, index=False)
        print(f"{len(table):,} result rows: {table['model'].nunique()} models, {table['seed'].nunique()} seeds, "
              f"{table.groupby(['model', 'image_strategy', 'image_tokens', 'text_strategy', 'text_tokens']).ngroups}"
              f" grid cells, {args.format}")

        start = time.perf_counter()
        analysis, _ = run_analysis(path, tmp / "out-inprocess", progress=False)
        inproc = time.perf_counter() - start
        print(f"in-process analysis: {inproc:.2f} s ({len(analysis.min_tokens)} drop curves fitted, "
              f"{analysis.min_tokens['n_boot'].iloc[0]} bootstrap replicates each)")

        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "analysis", str(path), "--out", str(tmp / "out-cli"), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
        command = time.perf_counter() - start
        print(f"`python -m analysis` (= sweep analyze) end to end: {command:.2f} s "
              f"({'under' if command < 10 else 'OVER'} the 10 s target)")

        if args.json:
            runs = table.head(args.json)
            start = time.perf_counter()
            files = synthetic.write_result_files(runs, tmp / "results")
            print(f"wrote {len(files):,} result.json files in {time.perf_counter() - start:.2f} s")
            start = time.perf_counter()
            run_analysis(tmp / "results", tmp / "out-json", progress=False)
            print(f"analysis of the result.json directory: {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
