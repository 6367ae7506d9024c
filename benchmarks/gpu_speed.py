"""The trainer's step on a GPU, compiled, at every strategy and length, with the batch rule; open_clip_train beside it.

    python benchmarks/gpu_speed.py                       # ViT-B-16 and ViT-L-16 on cuda (planned to fit 8 min)
    python benchmarks/gpu_speed.py --models ViT-B-16 --tokens 17 --no-open-clip          # one length
    python benchmarks/gpu_speed.py --compile whole       # torch.compile of the whole encoders instead of blocks
    python benchmarks/gpu_speed.py --models ViT-B-16 --tokens 17 --strategies random --no-open-clip  # one cell
    python benchmarks/gpu_speed.py --profile             # also: where a step's time goes (GPU busy share, kernels)
    python benchmarks/gpu_speed.py --batch 4096 --seconds 6   # a larger global batch, nearer a study's 32,768:
                                                         # short lengths take bigger micro-batches
    python benchmarks/gpu_speed.py --device cpu --models cpu-s --batch 64 --compile off  # a CPU smoke run
    python benchmarks/gpu_speed.py --json > gpu_speed.jsonl

One step is the trainer's (`sweep.train.train_stage` without the data order): uint8 images -> `Pixels` ->
`reduce_images(strategy, tokens)` with masks drawn on the device -> `ContrastiveStep` (bf16 autocast, fused AdamW,
grad clip 1.0), text at the full context 32, the transformer blocks compiled as a run compiles them
(`compile_blocks`). Images are random 224-px pixels on the device, so no loader is measured here
(`files_speed.py`, `data_speed.py` measure the loader).

The batch rule (the trainer's): every length of a model trains the same global batch (`--batch`, default 1024, as
a study keeps it across lengths); the micro-batch is the whole batch where it fits, halved on out-of-memory until it
does (accumulation recomputes the micro-batches' forward passes, exact). So short sequences do the whole batch in one
pass and full length what its memory allows.

Per cell: the first step compiles (its seconds are `compile_s`: compilation, any out-of-memory halving, and the
step), one more untimed step, then `--steps` steps back to back between two `synchronize()` calls (no host sync per
step, as in a run); with `--seconds`, fewer (at least 2) where the untimed step says they would take longer. Columns:
  samples_per_second  batch x timed steps / their seconds
  micro               pairs per forward/backward pass (batch / micro passes; > 1 pass adds a no-grad forward)
  speedup             samples/s of the cell / samples/s of `none` at full length, same model and batch
  ideal_speedup       FLOPs per sample of the full-length step / of the cell's, both as executed: the project's count
                      (`sweep.flops.step_flops`, attention included) plus, where a step accumulates, its extra
                      no-grad forward pass (a third of forward + backward)
  efficiency          speedup / ideal_speedup
  TFLOP/s             executed FLOPs per step / seconds per step (delivered, not peak)

Then open_clip's own loop on the same model, batch (`--open-clip-batch`, default 256) and precision
(`open_clip_train.main --dataset-type synthetic --precision amp_bf16`, eager, `--workers` loader processes, in a
subprocess), and our step at full length at that batch, just before and after it: `ours/open_clip`.

Targets (issue 10): full length, ours >= 1.3x open_clip_train on ViT-B-16; at 17 image tokens every strategy
>= 0.85 of its FLOPs-ideal speedup, at 50 tokens >= 0.9 (ViT-B-16 and ViT-L-16). --strict exits 1 on a FAIL.
Progress and how long each part took go to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
import torch  # noqa: E402

from benchmarks.token_speed import open_clip_speed  # noqa: E402
from sweep.config import RunConfig  # noqa: E402
from sweep.data.synthetic import image_caption_pairs  # noqa: E402
from sweep.flops import step_flops, tower_flops  # noqa: E402
from sweep.models import MODELS, build_model  # noqa: E402
from sweep.strategies.image import IMAGE_STRATEGIES, reduce_images  # noqa: E402
from sweep.train.loop import Pixels  # noqa: E402
from sweep.train.step import ContrastiveStep, Runtime, allow_recompiles, compile_blocks, make_optimizer  # noqa: E402

TOKENS = {"paper": [101, 50, 17], "cpu": [50, 17]}
PHASES = ("vision forward", "text forward", "backward", "optimizer")  # sweep.train.step's named ranges
TARGETS = {17: 0.85, 50: 0.9}  # image tokens -> the efficiency every strategy must reach there
OPEN_CLIP_TARGET = 1.3
LR = 1e-4  # the value does not change a step's cost; a small one keeps repeated steps on two batches finite


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """One model, its optimizer and step (compiled as asked), and two fixed batches on the device."""

    def __init__(self, name: str, batch: int, device: torch.device, precision: str, compile: str):
        self.spec, self.name, self.batch, self.device = MODELS[name], name, batch, device
        torch.manual_seed(0)
        self.model = build_model(name).to(device)
        self.model.train()
        cfg = RunConfig(model=name)
        runtime = Runtime(device, torch.bfloat16 if precision == "bf16" else None, compile != "off")
        self.step_fn = ContrastiveStep(self.model, make_optimizer(self.model, cfg, LR), runtime, 0, cfg.grad_clip)
        if compile == "blocks":
            compile_blocks(self.model)
        elif compile == "whole":  # the alternative to compare with: both towers as one graph per shape
            allow_recompiles()
            self.step_fn.encoders = torch.compile(self.step_fn.encoders, dynamic=False)
        self.pixels, self.generator = Pixels(device), torch.Generator(device).manual_seed(0)
        size = self.spec.image_size
        _, captions = image_caption_pairs(0, "train", 0, 2 * batch, 8)
        images = torch.randint(0, 256, (2 * batch, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        tokens = open_clip.tokenize(captions, self.spec.text_tokens)
        self.batches = [(images[i * batch:(i + 1) * batch].to(device), tokens[i * batch:(i + 1) * batch].to(device))
                        for i in range(2)]
        self.calls = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def steps(self, strategy: str, tokens: int, n: int, batch: int | None = None) -> float:
        """Seconds of n consecutive steps (one sync at the end, as a run reads the loss back rarely)."""
        self.sync()
        tic = time.perf_counter()
        for _ in range(n):
            images_u8, text = self.batches[self.calls % 2]
            self.calls += 1
            if batch is not None:
                images_u8, text = images_u8[:batch], text[:batch]
            images, keep = reduce_images(self.pixels(images_u8), strategy, tokens, self.spec.patch_size,
                                         self.generator)
            loss = self.step_fn(images, keep, text)
        self.sync()
        seconds = time.perf_counter() - tic
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name} {strategy} {tokens}: loss became {loss.item()}")
        return seconds

    def micro(self) -> int:
        return self.step_fn.micro_batch_size or self.batch


def cells_for(spec, tokens: list[int], strategies: list[str] | None = None) -> list[tuple[str, int]]:
    """Full length first (every speedup is against it), then each strategy (all, or `strategies`) at each length."""
    cells = [("none", spec.image_tokens)]
    for k in tokens:
        cells += [(s, k) for s, st in IMAGE_STRATEGIES.items()
                  if s != "none" and (strategies is None or s in strategies) and k in st.allowed_tokens(spec.grid)]
    return cells


def executed_flops(name: str, strategy: str, tokens: int, batch: int, micro: int) -> float:
    """FLOPs of one step as run: forward + backward, plus a no-grad forward (~1/3) when it accumulates."""
    flops = step_flops(name, strategy, tokens, MODELS[name].text_tokens, batch)
    return flops * (4 / 3 if micro < batch else 1.0)


def timed_steps(steps: int, budget: float | None, warm_step_s: float) -> int:
    """How many steps to time: `steps`, or fewer (but 2) where they would take over `budget` seconds."""
    if budget is None:
        return steps
    return min(steps, max(2, math.ceil(budget / warm_step_s)))


def measure(bench: Bench, cells: list[tuple[str, int]], steps: int, emit=lambda row: None,
            budget: float | None = None) -> list[dict]:
    """One row per cell, the full length first; `emit` gets each row as soon as it is complete. With `budget`, a
    cell whose steps are long times fewer of them (`timed_steps`)."""
    rows = []
    for strategy, tokens in cells:
        bench.step_fn.micro_batch_size = 0  # the batch rule anew at each length: the whole batch if it fits
        tic = time.perf_counter()
        bench.steps(strategy, tokens, 1)  # compiles (and finds the micro-batch that fits)
        compile_s = time.perf_counter() - tic
        n = timed_steps(steps, budget, bench.steps(strategy, tokens, 1))
        seconds = bench.steps(strategy, tokens, n)
        micro = bench.micro()
        flops = executed_flops(bench.name, strategy, tokens, bench.batch, micro)
        rows.append({"model": bench.name, "strategy": strategy, "image_tokens": tokens, "batch": bench.batch,
                     "micro": micro, "samples_per_second": round(bench.batch * n / seconds, 1),
                     "tflops": round(flops * n / seconds / 1e12, 1), "flops_per_step": flops,
                     "compile_s": round(compile_s, 1), "timed_s": round(seconds, 2), "steps": n})
        row, full = rows[-1], rows[0]
        row["speedup"] = round(row["samples_per_second"] / full["samples_per_second"], 3)
        row["ideal_speedup"] = round(full["flops_per_step"] / row["flops_per_step"], 3)
        row["efficiency"] = round(row["speedup"] / row["ideal_speedup"], 3)
        emit(row)
        log(f"  {bench.name} {strategy} {tokens}: {row['samples_per_second']:.0f} samples/s, micro {micro}, "
            f"first step {compile_s:.1f} s, {n} timed steps {seconds:.1f} s")
    return rows


def profile_cell(bench: Bench, strategy: str, tokens: int, steps: int = 3, batch: int | None = None) -> dict:
    """Where a compiled cell's step time goes, at `batch` (default the bench's): torch.profiler over `steps` steps
    (after one more warm step). On CUDA, `gpu_busy` is the kernels' time over the wall time (below 1: the GPU waits
    for the host, i.e. per-step overhead); the table (stderr) lists the operators and kernels that take the most."""
    from torch.profiler import ProfilerActivity, profile
    cuda = bench.device.type == "cuda"
    batch = batch or bench.batch
    bench.steps(strategy, tokens, 1, batch)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        seconds = bench.steps(strategy, tokens, steps, batch)
    averages = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    log(f"  profile {bench.name} {strategy} {tokens}, batch {batch}: {1e3 * seconds / steps:.1f} ms per step\n"
        + averages.table(sort_by=sort, row_limit=12, max_name_column_width=60))
    row = {"model": bench.name, "profiled": f"{strategy} {tokens}", "batch": batch,
           "ms_per_step": round(1e3 * seconds / steps, 2)}
    if cuda:
        kernels_us = sum(getattr(e, "self_device_time_total", 0) for e in averages)
        row["gpu_busy"] = round(kernels_us / 1e6 / seconds, 3)
    # the step's named ranges (sweep.train.step): their kernels' time (on the CPU, their CPU time), per step, and
    # the forward passes' delivered TFLOP/s (a third of each tower's forward + backward count; a step that
    # accumulates runs every forward twice, once without gradients)
    phases = {e.key: (e.device_time_total if cuda else e.cpu_time_total) / 1e3 / steps for e in averages
              if e.key in PHASES}
    row["phase_ms"] = {name: round(phases[name], 2) for name in PHASES if name in phases}
    vision, text = tower_flops(bench.name, strategy, tokens, bench.spec.text_tokens)
    passes = 1 if bench.micro() >= batch else 2
    forward = {"vision forward": passes * vision / 3, "text forward": passes * text / 3}
    row["forward_tflops"] = {name: float(f"{batch * flops / (phases[name] / 1e3) / 1e12:.3g}")
                             for name, flops in forward.items() if phases.get(name)}
    log(f"  phases (ms per step): {row['phase_ms']}; forward TFLOP/s: {row['forward_tflops']}")
    return row


def compare_open_clip(bench: Bench, batch: int, steps: int, workers: int, precision: str, tmp: Path) -> dict:
    full = bench.spec.image_tokens
    bench.step_fn.micro_batch_size = 0  # the batch rule at this batch
    bench.steps("none", full, 2, batch)  # compile and warm our step at this batch
    before = bench.steps("none", full, steps, batch)
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()  # the cells' cached blocks would leave open_clip_train's process no room
    tic = time.perf_counter()
    oc = open_clip_speed(bench.name, batch, torch.get_num_threads(), 3, steps, tmp, device=str(bench.device),
                         precision="amp_bf16" if precision == "bf16" else "fp32", workers=workers)
    oc_s = time.perf_counter() - tic
    after = bench.steps("none", full, steps, batch)
    ours = batch * steps / ((before + after) / 2)
    log(f"  {bench.name}: open_clip_train {oc['samples_per_second']:.0f} samples/s ({oc_s:.0f} s subprocess), "
        f"ours {ours:.0f} samples/s around it")
    return {"model": bench.name, "batch": batch, "ours_samples_per_second": round(ours, 1),
            "open_clip_samples_per_second": round(oc["samples_per_second"], 1),
            "ours_over_open_clip": round(ours / oc["samples_per_second"], 3),
            "open_clip_data_seconds_per_step": round(oc["data_seconds"], 4),
            "open_clip_compute_samples_per_second": round(oc["compute_samples_per_second"], 1),
            "open_clip_wall_s": round(oc_s, 1)}


def checks(rows: list[dict], comparisons: list[dict]) -> list[tuple[bool, str]]:
    out = []
    for c in comparisons:
        if MODELS[c["model"]].scale == "paper":
            out.append((c["ours_over_open_clip"] >= OPEN_CLIP_TARGET,
                        f"{c['model']} full length, batch {c['batch']}: ours / open_clip_train = "
                        f"{c['ours_over_open_clip']:.2f} (target >= {OPEN_CLIP_TARGET})"))
    for model in dict.fromkeys(r["model"] for r in rows):
        if MODELS[model].scale != "paper":
            continue
        for tokens, target in TARGETS.items():
            at = [r for r in rows if r["model"] == model and r["image_tokens"] == tokens]
            if at:
                detail = ", ".join(f"{r['strategy']} {r['efficiency']:.2f}" for r in at)
                out.append((all(r["efficiency"] >= target for r in at),
                            f"{model} at {tokens} tokens: {detail} (target >= {target} of FLOPs-ideal)"))
    return out


def print_table(rows: list[dict], comparisons: list[dict]) -> None:
    print(f"{'model':<10}{'strategy':<9}{'tokens':>7}{'batch':>6}{'micro':>6}{'samples/s':>11}{'speedup':>9}"
          f"{'ideal':>7}{'eff':>6}{'TFLOP/s':>9}{'compile s':>10}")
    last = None
    for r in rows:
        if last is not None and r["model"] != last:
            print()
        last = r["model"]
        print(f"{r['model']:<10}{r['strategy']:<9}{r['image_tokens']:>7}{r['batch']:>6}{r['micro']:>6}"
              f"{r['samples_per_second']:>11.0f}{r['speedup']:>9.2f}{r['ideal_speedup']:>7.2f}{r['efficiency']:>6.2f}"
              f"{r['tflops']:>9.1f}{r['compile_s']:>10.1f}")
    if comparisons:
        print("\nFull length, same model, batch and precision: ours (compiled step) vs open_clip_train.main (eager)")
        print(f"{'model':<10}{'batch':>6}{'ours/s':>9}{'open_clip/s':>13}{'ours/oc':>9}{'oc data s/step':>16}"
              f"{'oc compute/s':>14}")
        for c in comparisons:
            print(f"{c['model']:<10}{c['batch']:>6}{c['ours_samples_per_second']:>9.0f}"
                  f"{c['open_clip_samples_per_second']:>13.0f}{c['ours_over_open_clip']:>9.2f}"
                  f"{c['open_clip_data_seconds_per_step']:>16.4f}{c['open_clip_compute_samples_per_second']:>14.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-16"], choices=list(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, help="reduced image lengths (default: 101 50 17 for "
                        "paper sizes, 50 17 for cpu sizes)")
    parser.add_argument("--strategies", nargs="+", choices=[s for s in IMAGE_STRATEGIES if s != "none"],
                        help="reduction strategies of the reduced lengths (default: every one)")
    parser.add_argument("--batch", type=int, default=1024, help="global batch of every cell (default 1024)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per cell (default 8)")
    parser.add_argument("--seconds", type=float, help="time fewer steps (at least 2) where --steps would take "
                        "longer than this: for a large --batch, whose full-length steps accumulate many passes")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--compile", choices=["blocks", "whole", "off"], default="blocks",
                        help="blocks: as the trainer compiles (default); whole: the encoders as one graph; off")
    parser.add_argument("--no-open-clip", action="store_true", help="skip the open_clip_train comparison")
    parser.add_argument("--open-clip-batch", type=int, default=256, help="batch of the comparison (default 256)")
    parser.add_argument("--workers", type=int, default=8, help="open_clip_train's loader processes (default 8)")
    parser.add_argument("--profile", action="store_true", help="after the cells, profile the full length and "
                        "`random` at the shortest length (GPU busy share of the step, top kernels on stderr, each "
                        "named range's time), and the full length at the open_clip comparison's batch")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a check fails")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")

    started = time.perf_counter()
    rows: list[dict] = []
    comparisons: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu_speed-") as tmp:
        for name in args.models:
            spec, tic = MODELS[name], time.perf_counter()
            log(f"{name}: batch {args.batch}, {args.steps} timed steps per cell, {device} {precision}, "
                f"compile {args.compile}")
            bench = Bench(name, args.batch, device, precision, args.compile)
            emit = (lambda row: print(json.dumps(row), flush=True)) if args.json else (lambda row: None)
            rows += measure(bench, cells_for(spec, args.tokens or TOKENS[spec.scale], args.strategies), args.steps,
                            emit, args.seconds)
            cells_s = time.perf_counter() - tic
            if args.profile:
                shortest = min(args.tokens or TOKENS[spec.scale])
                for strategy, tokens in (("none", spec.image_tokens), ("random", shortest)):
                    bench.step_fn.micro_batch_size = 0
                    row = profile_cell(bench, strategy, tokens)
                    emit(row)
                    if "gpu_busy" in row:
                        log(f"  {name} {strategy} {tokens}: GPU busy {row['gpu_busy']:.0%} of the step")
            if not args.no_open_clip:
                small = min(args.open_clip_batch, args.batch)
                comparisons.append(compare_open_clip(bench, small, args.steps, args.workers, precision, Path(tmp)))
                emit(comparisons[-1])
                if args.profile and small < args.batch:  # ours at the comparison's batch, where it lost 23%
                    emit(profile_cell(bench, "none", spec.image_tokens, batch=small))
            peak = (f"; peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                    if device.type == "cuda" else "")
            log(f"{name}: cells {cells_s:.0f} s (compile {sum(r['compile_s'] for r in rows if r['model'] == name):.0f}"
                f" s of it), open_clip comparison {time.perf_counter() - tic - cells_s:.0f} s{peak}")
            del bench
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    results = checks(rows, comparisons)
    if not args.json:  # (JSON rows were printed as they were measured)
        print_table(rows, comparisons)
        print(f"\n{where}, {precision}, compile {args.compile}, torch {torch.__version__}; "
              f"total {time.perf_counter() - started:.0f} s")
    for ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'} {detail}", file=sys.stderr if args.json else sys.stdout)
    return 1 if args.strict and not all(ok for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
