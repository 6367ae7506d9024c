"""`sweep search`: each curve's minimum token length found adaptively, training only the lengths that decide it.

A curve is one (model, axis, strategy) of a grid: its candidate lengths are the grid's lengths for it, its seeds
the grid's seeds, so every run a search trains is a run of the grid (same id; `sweep analyze` reads a searched
directory like any other, and `sweep launch` later completes it into the full grid without retraining), except
the further seeds up to `max_seeds` that a length within noise of the tolerance gets. The
question per curve is the shortest length whose drop stays within `max_drop`. Under the drop curve's monotonicity
(shorter never loses less) a length whose drop passes settles every longer one, and one that fails every shorter
one, so the search bisects:

  1. each model's full-length baseline, and per curve the candidate that best splits the bracket still open: where
     the analysis' fitted drop curve (3+ lengths measured) or the drop interpolated in log t between the bracket's
     ends crosses `max_drop`, else the middle candidate;
  2. a length whose mean drop is within z x its standard error of `max_drop` (z for `confidence`) gets another
     seed, up to `max_seeds` (the standard error from the seed spread pooled over cells, `noise` until there is
     enough of it);
  3. until the bracket's ends are adjacent candidates judged with that confidence, or the run budget is spent.

The search's measured minimum is the shortest length whose mean drop passes; its bracket (lower, upper] holds the
true minimum with the requested confidence (`upper` the shortest length that surely passes, `lower` the longest
that surely fails, 0 below the grid). A round trains every curve's next runs at once, through `sweep launch`'s
executors: locally the rounds follow each other in one command; on Slurm each `sweep search` submits one round
and returns, and the next call (once it has finished) plans the next from the results on disk. A run a curve needs
that ends without a value (failed, pruned, or no metric) stops that curve; `--rerun-failed` trains a failed or
pruned one once more.

    search:
      confidence: 0.95
      max_seeds: 1         # seeds per length at most (the grid's seeds come first)
      noise: 2.5           # seed-to-seed standard deviation of one run's metric, pp (until measured)
      budget: 30           # runs in all, baselines included (default: the grid's run count)
      max_drop: 5.0        # tolerance, metric and stage: by default the grid's analysis: section's
      metric: i2t_r1
      stage: finetune
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sweep.analysis_spec import DEFAULT_MAX_DROP, DEFAULT_METRIC, AnalysisSpec, check_readout
from sweep.config import RunConfig, config_from_dict, identity
from sweep.settings import ConfigError, Number, Settings, setting


class SearchSpec(Settings):
    """A grid's `search:` section."""

    section = "search"

    max_drop: Number = setting(DEFAULT_MAX_DROP, "Tolerance: the largest drop (percentage points of `metric`) a "
                               "length may have and still count as tolerated (default: the grid's analysis: "
                               "section's).", gt=0)
    confidence: Number = setting(0.95, "Confidence of each judgement (a length passes or fails) and so of the "
                                 "bracket.", gt=0.5, lt=1)
    max_seeds: int = setting(3, "Seeds per length at most; a length within noise of the tolerance gets more, "
                             "up to this (never fewer than the grid's seeds).", ge=1)
    noise: Number = setting(1.0, "Seed-to-seed standard deviation of one run's metric (pp), used until the runs "
                            "measure it (pooled over cells with several seeds, 4+ degrees of freedom).", gt=0)
    budget: int | None = setting(None, "Runs in all, baselines included; empty: the grid's run count.", ge=1)
    metric: str = setting(DEFAULT_METRIC, "The metric whose drop is judged (default: the analysis: section's).")
    stage: str = setting("finetune", "The stage it is read at: pretrain, pretrain_full_length or finetune "
                         "(default: the analysis: section's, else finetune where the runs fine-tune, else "
                         "pretrain).")


@dataclass
class Curve:
    """One (model, axis, strategy) of the grid with its candidate lengths and runs."""

    model: str
    axis: str
    strategy: str
    full: int
    lengths: list[int]  # ascending, all shorter than `full`
    seeds: list[int]  # the grid's, ascending
    base: RunConfig  # one run of the curve, the template of extra seeds
    baseline: RunConfig  # the model's full-length run (seed of `base`)
    variant: str = ""  # the settings that tell it from curves of the same model and strategy (e.g. "lr=0.001")

    @property
    def label(self) -> str:
        return f"{self.model} {self.axis} {self.strategy}" + (f" {self.variant}" if self.variant else "")

    def config(self, length: int, seed: int) -> RunConfig:
        """The run at `length` (the full length: the baseline) and `seed`: the grid's own where it has it."""
        if length == self.full:
            return config_from_dict({**self.baseline.to_dict(), "seed": seed})
        return config_from_dict({**self.base.to_dict(), f"{self.axis}_tokens": length, "seed": seed})

    def seed_list(self, count: int) -> list[int]:
        """The first `count` seeds: the grid's, then the next unused numbers."""
        extra = list(range(max(self.seeds) + 1, max(self.seeds) + 1 + count))
        return (self.seeds + extra)[:max(count, 1)]


@dataclass
class Verdict:
    """Where one curve's search stands."""

    train: list[tuple[int, int]] = field(default_factory=list)  # (length, number of seeds it should have)
    measured: float = math.nan  # shortest length whose mean drop passes (the full length when none does)
    lower: float = 0.0  # the minimum lies in (lower, upper]: lower the longest length that surely fails (0: none)
    upper: float = math.nan  # the shortest that surely passes (the full length at worst)
    resolved: bool = False  # lower and upper are adjacent candidates
    why: str = ""  # when not resolved and nothing left to train


def check_search(raw: Any, grid_runs: list, source: str | Path, analysis: AnalysisSpec | None = None) -> SearchSpec:
    """The grid's validated `search:` section; the tolerance, metric and stage it leaves out are the grid's
    `analysis:` section's, where it has one."""
    base = grid_runs[0].config
    if analysis is not None and isinstance(raw, dict):
        raw = {"max_drop": analysis.max_drop, "metric": analysis.metric, "stage": analysis.stage, **raw}
    elif isinstance(raw, dict):  # the analysis' default stage: the fine-tune where the runs have one
        raw = {"stage": "finetune" if base.finetune_samples else "pretrain", **raw}
    spec = SearchSpec.from_mapping(raw, source)
    check_readout(spec.stage, spec.metric, base, "search", source)
    for run in grid_runs:
        cfg = run.config
        if cfg.image_strategy != "none" and cfg.text_strategy != "none":
            raise ConfigError("axes", f"{run.run_id} reduces both axes; a search follows one axis per curve",
                              source)
    curves = curves_of(grid_runs)
    for curve in curves:
        if curve.full in curve.lengths:
            raise ConfigError("axes", f"{curve.axis}_tokens {curve.full} is {curve.model}'s full length: a search "
                              f"measures the {curve.strategy} curve's shorter lengths against the full-length "
                              "baseline; leave it out of the axis", source)
    if not curves:
        raise ConfigError("search", "the grid has no reduced-length runs, so no drop curve to search: give an axis "
                          "of image or text token lengths", source)
    seeds = max(len(c.seeds) for c in curves)
    if spec.max_seeds < seeds:
        raise ConfigError("search.max_seeds", f"{spec.max_seeds} is fewer than the grid's {seeds} seeds per cell",
                          source)
    return spec


def curves_of(runs: list) -> list[Curve]:
    """The grid's curves: its reduced runs grouped by every setting but the token length and the seed."""
    from sweep.grid import full_length

    groups: dict[tuple, list[RunConfig]] = {}
    for run in runs:
        cfg = run.config
        if cfg.image_strategy == "none" and cfg.text_strategy == "none":
            continue
        key = tuple(p for p in identity(cfg) if p[0] not in ("image_tokens", "text_tokens", "seed"))
        groups.setdefault(key, []).append(cfg)
    curves = []
    setups = [dict(key) for key in groups]
    for key, configs in groups.items():
        first = configs[0]
        axis = "image" if first.image_strategy != "none" else "text"
        full = first.spec.image_tokens if axis == "image" else first.spec.text_tokens
        strategy = getattr(first, f"{axis}_strategy")
        # another setting swept beside the lengths (e.g. lr) makes curves of one model and strategy: name it
        siblings = [s for s in setups if s["model"] == first.model and s[f"{axis}_strategy"] == strategy]
        variant = ", ".join(f"{name}={value}" for name, value in key
                            if len({json.dumps(s.get(name), sort_keys=True) for s in siblings}) > 1)
        curves.append(Curve(first.model, axis, strategy, full,
                            sorted({getattr(c, f"{axis}_tokens") for c in configs}), sorted({c.seed for c in configs}),
                            first, full_length(first), variant))
    return sorted(curves, key=lambda c: (c.model, c.axis, c.strategy, c.variant))


# --------------------------------------------------------------------------------------------------- the decision

def judge(curve: Curve, values: dict[int, list[float]], spec: SearchSpec, sigma: float) -> Verdict:
    """The next runs of a curve from its measured values: `values[length]` the metric per seed trained so far (the
    full length: the baseline's). Pure: the same values give the same verdict."""
    from scipy.stats import norm

    grid_seeds = len(curve.seeds)
    base = values.get(curve.full, [])
    verdict = Verdict(upper=float(curve.full))
    if not base:  # the baseline and the first guess train together
        first = curve.lengths[(len(curve.lengths) - 1) // 2]
        verdict.train = [(curve.full, grid_seeds), (first, grid_seeds)]
        return verdict
    # every added seed is another look at the same length: split the error over the looks (Bonferroni)
    z = float(norm.ppf(1 - (1 - spec.confidence) / spec.max_seeds))
    drops, sure = {}, {}
    for length in curve.lengths:
        cell = values.get(length, [])
        if cell:
            drops[length] = float(np.mean(base) - np.mean(cell))
            se = sigma * math.sqrt(1 / len(cell) + 1 / len(base))
            sure[length] = abs(drops[length] - spec.max_drop) >= z * se
    passing = [t for t in drops if drops[t] <= spec.max_drop + 1e-9]
    hi = min(passing, default=curve.full)
    failing = [t for t in drops if t < hi and drops[t] > spec.max_drop + 1e-9]
    lo = max(failing, default=0)
    verdict.measured = float(hi)
    untested = [t for t in curve.lengths if lo < t < hi and t not in drops]
    if untested:  # bisection for the measured minimum
        verdict.train.append((_pick(untested, curve, drops, lo, hi, spec.max_drop), grid_seeds))
    # the confident bracket: the longest length that surely fails, the shortest that surely passes
    verdict.lower = float(max((t for t in drops if t <= lo and drops[t] > spec.max_drop and sure[t]), default=0))
    verdict.upper = float(min((t for t in drops if t >= hi and drops[t] <= spec.max_drop and sure[t]),
                              default=curve.full))
    # judgements inside it that are within noise of the tolerance get more seeds, and so does the baseline
    # while it has no more than they (a drop's error is the cell's and the baseline's)
    unsure = [t for t in drops if verdict.lower < t < verdict.upper and not sure[t]]
    for t in unsure:
        if len(values[t]) < spec.max_seeds:
            verdict.train.append((t, len(values[t]) + 1))
    if unsure and len(base) < spec.max_seeds and len(base) <= max(len(values[t]) for t in unsure):
        verdict.train.append((curve.full, len(base) + 1))
    if not verdict.train:  # past an end that stays within noise, the next length may be judged surely
        above = [t for t in curve.lengths if hi < t < verdict.upper and t not in drops]
        below = [t for t in curve.lengths if verdict.lower < t < lo and t not in drops]
        verdict.train += [(min(above), grid_seeds)] if above else []
        verdict.train += [(max(below), grid_seeds)] if below else []
    between = [t for t in curve.lengths if verdict.lower < t < verdict.upper]
    # cells measured on fewer seeds than the grid has (seeds added to it since, a round cut short) get them first
    short = [t for t in (curve.full, *drops) if len(values[t]) < grid_seeds]
    verdict.train = [(t, grid_seeds) for t in short] + verdict.train
    verdict.resolved = not between and not short
    if not verdict.train and between:
        verdict.why = f"{', '.join(map(str, unsure))} within noise of the tolerance at {spec.max_seeds} seed(s)"
    return verdict


def _pick(untested: list[int], curve: Curve, drops: dict[int, float], lo: int, hi: int, max_drop: float) -> int:
    """The untested length nearest (in log t) to where the drop is predicted to reach `max_drop`: the analysis'
    fitted curve where 3+ lengths are measured, else linear in log t between the bracket's measured ends; the
    middle one when neither predicts."""
    from analysis.fit import fit_drop_curve
    from analysis.minima import focus_scale

    guess = math.nan
    if len(drops) >= 3:
        tokens = np.array(list(drops), dtype=float)
        fit = fit_drop_curve(tokens, np.array(list(drops.values())), curve.full, focus=focus_scale(max_drop))
        guess = fit.crossing(max_drop) if fit.status == "ok" else math.nan
    if not math.isfinite(guess) and lo in drops:
        d_lo, d_hi = drops[lo], drops.get(hi, 0.0)
        share = (d_lo - max_drop) / (d_lo - d_hi) if d_lo > d_hi else 0.5
        guess = math.exp(math.log(lo) + min(max(share, 0.0), 1.0) * (math.log(hi) - math.log(lo)))
    if not math.isfinite(guess) or guess <= 0:
        return untested[(len(untested) - 1) // 2]
    return min(untested, key=lambda t: (abs(math.log(t) - math.log(guess)), -t))


def pooled_noise(curves: list[Curve], values: dict[str, dict[int, list[float]]], prior: float) -> float:
    """The seed-to-seed standard deviation pooled over every cell with several seeds (the prior until those give
    4 degrees of freedom)."""
    squares, dof, seen = 0.0, 0, set()
    for curve in curves:
        for length, cell in values[curve.label].items():
            # a baseline once, however many curves share it (each setup of a model has its own)
            key = ("full", setup_of(curve.baseline)) if length == curve.full else (curve.label, length)
            if len(cell) >= 2 and key not in seen:
                seen.add(key)
                squares += float(np.var(cell, ddof=1)) * (len(cell) - 1)
                dof += len(cell) - 1
    return math.sqrt(squares / dof) if dof >= 4 else prior


# ------------------------------------------------------------------------------------------------ on the disk

def read_values(curve: Curve, folder: Path, spec: SearchSpec) -> tuple[dict[int, list[float]], set[str],
                                                                       dict[str, str]]:
    """Per length, the metric of each completed run of the curve (the grid's seeds first); the ids of those runs;
    and the run id -> status of every run that ended without a value (failed, pruned, or no metric)."""
    from sweep.grid import run_id
    from sweep.record import RecordError, read_record, read_status

    values: dict[int, list[float]] = {}
    completed: set[str] = set()
    ended: dict[str, str] = {}
    for length in [*curve.lengths, curve.full]:
        for seed in curve.seed_list(spec.max_seeds):
            rid = run_id(curve.config(length, seed))
            status = read_status(folder / rid)
            if status is None:
                continue
            if status[0] != "completed":
                ended[rid] = status[1] or status[0]
                continue
            try:
                stage = read_record(folder / rid).metrics.get(spec.stage)
            except RecordError as err:
                ended[rid] = f"unreadable result.json ({err})"
                continue
            value = stage.values().get(spec.metric) if stage is not None else None
            if value is None or not math.isfinite(value):
                ended[rid] = f"no {spec.metric} at stage {spec.stage}"
            else:
                values.setdefault(length, []).append(float(value))
                completed.add(rid)
    return values, completed, ended


@dataclass
class Plan:
    """One round: the runs to train now and every curve's verdict."""

    runs: list  # sweep.grid.Run
    verdicts: dict[str, Verdict]
    curves: list[Curve]
    spent: int  # runs of the search that have ended
    budget: int
    failed: dict[str, str]  # run id -> why, for runs the search needs that ended without a value
    sigma: float
    ended: dict[str, set[str]]  # per curve: its runs (baseline included) that have a result, with or without a value


def plan(grid, results: str | Path, retry: frozenset[str] | set[str] = frozenset()) -> Plan:
    """The next round of the grid's search, from the results on disk. A needed run that ended without a value stops
    its curve, unless its id is in `retry` and it failed or was pruned: it is then trained again."""
    from sweep.grid import Run, run_id

    spec: SearchSpec = grid.search
    folder = Path(results) / grid.sweep
    curves = curves_of(grid.runs)
    grid_ids = {r.run_id for r in grid.runs}
    values, done_ids, ended, per_curve = {}, set(), {}, {}
    for curve in curves:
        values[curve.label], completed, failed = read_values(curve, folder, spec)
        per_curve[curve.label] = completed | set(failed)
        done_ids |= completed
        ended.update(failed)
    sigma = pooled_noise(curves, values, spec.noise)
    spent = len(done_ids | set(ended))
    budget = spec.budget or len(grid.runs)
    verdicts, wanted, blocked = {}, {}, {}
    for curve in curves:
        verdict = judge(curve, values[curve.label], spec, sigma)
        for length, seeds in verdict.train:
            for seed in curve.seed_list(seeds):
                cfg = curve.config(length, seed)
                rid = run_id(cfg)
                if rid in ended and not (rid in retry and retrainable(folder / rid)):
                    blocked[rid] = ended[rid]  # needed, but it ended without a value: this curve stops here
                    verdict.why = f"run {rid} ended without {spec.metric}: {ended[rid]}"
                elif rid in ended or length not in values[curve.label] \
                        or len(values[curve.label][length]) < seeds:
                    wanted.setdefault(rid, Run(rid, cfg, baseline=length == curve.full and rid in grid_ids))
        verdicts[curve.label] = verdict
    todo = [run for rid, run in wanted.items() if rid not in done_ids]
    todo.sort(key=lambda r: (not r.baseline, r.run_id))  # baselines first when the budget runs short
    # a run trained again was counted against the budget when it first ended: only new runs need room
    again = [run for run in todo if run.run_id in ended]
    new = [run for run in todo if run.run_id not in ended][:max(0, budget - spent)]
    return Plan(again + new, verdicts, curves, spent, budget, blocked, sigma, per_curve)


def retrainable(run_dir: Path) -> bool:
    """A run that a new attempt may give a value: it failed or was pruned (a completed run without the metric
    would complete the same way again)."""
    from sweep.record import read_status

    status = read_status(run_dir)
    return status is not None and status[0] != "completed"


# --------------------------------------------------------------------------------------------------- reporting

def report(grid, results: str | Path, found: Plan) -> str:
    """Per curve: bracket, measured minimum, fitted minimum with its interval (the analysis of the searched
    directory), the curve's runs trained and the runs the full grid has for it; then the totals."""
    from sweep.grid import run_id

    spec: SearchSpec = grid.search
    folder = Path(results) / grid.sweep
    fitted = _fitted(folder, spec)
    starting = {r.run_id for r in found.runs}
    width = max(24, *(len(c.label) for c in found.curves))
    lines = [f"{'curve':<{width}} {'bracket':>10} {'measured':>8} {'fitted [interval]':>20} {'runs':>4} {'grid':>4}  "
             "state"]
    trained, baselines = set(), set()
    for curve in found.curves:
        v = found.verdicts[curve.label]
        seeds = curve.seed_list(spec.max_seeds)
        ids = {run_id(curve.config(t, s)) for t in curve.lengths for s in seeds}
        baseline_ids = {run_id(curve.config(curve.full, s)) for s in seeds}
        baselines |= {run_id(curve.config(curve.full, s)) for s in curve.seeds}  # more seeds: seeds the grid lacks
        cells = found.ended[curve.label] & ids  # the baseline's runs are the model's, not the curve's
        trained |= found.ended[curve.label]
        if v.resolved:
            state = "resolved"
        elif v.why:
            state = v.why
        elif v.train and starting & (ids | baseline_ids):
            state = "searching"
        else:
            state = "budget spent"
        bracket = f"({v.lower:g}, {v.upper:g}]"
        fit = fitted.get((setup_of(curve.base), curve.axis, curve.strategy), "-")
        measured = f"{v.measured:g}" if math.isfinite(v.measured) else "-"
        lines.append(f"{curve.label:<{width}} {bracket:>10} {measured:>8} {fit:>20} {len(cells):>4} "
                     f"{len(curve.lengths) * len(curve.seeds):>4}  {state}")
    in_grid = trained & {r.run_id for r in grid.runs}
    outside = {"full-length baselines the grid leaves out": len((trained - in_grid) & baselines),
               "with seeds the grid lacks": len(trained - in_grid - baselines)}  # a length given more seeds
    extra = "".join(f" and {n} more {what}" for what, n in outside.items() if n)
    share = 100 * len(in_grid) / len(grid.runs)
    lines.append(f"runs: {len(in_grid)} trained of the grid's {len(grid.runs)} ({share:.0f}%){extra}, budget "
                 f"{found.budget}; "
                 f"tolerance {spec.max_drop:g} pp of {spec.metric} at {spec.stage}, seed noise {found.sigma:.2f} pp")
    return "\n".join(lines)


def setup_of(cfg: RunConfig) -> str:
    """The analysis' `setup_id` of a run: its settings but the seed and the token reduction."""
    from analysis.load import setup_id

    return setup_id(cfg.to_dict())


def _fitted(folder: Path, spec: SearchSpec) -> dict[tuple[str, str, str], str]:
    """The analysis' fitted minimum and interval per curve of the searched directory, as text, keyed by (setup_id,
    axis, strategy): each setup is analysed alone, so curves that differ in another setting are not pooled."""
    import warnings

    from analysis.errors import AnalysisInputError
    from analysis.load import load_results
    from analysis.pipeline import analyze

    out = {}
    with warnings.catch_warnings():  # what is wrong with a run is the report's and sweep status's to say
        warnings.simplefilter("ignore")
        try:
            table = load_results(folder, progress=False)
        except (AnalysisInputError, ValueError, KeyError):
            return out
        results = {}
        for setup, runs in table.groupby("setup_id"):
            try:
                results[setup] = analyze(runs, metric=spec.metric, stage=spec.stage, max_drop=spec.max_drop,
                                         n_boot=200)
            except (AnalysisInputError, ValueError, KeyError):
                continue
    for setup, result in results.items():
        for row in result.min_tokens.itertuples():
            fit = f"{row.min_tokens_fit:.1f}" if np.isfinite(row.min_tokens_fit) else "n/a"
            interval = f" [{row.ci_low:.1f}, {row.ci_high:.1f}]" if np.isfinite(row.ci_low) else ""
            out[(setup, row.axis, row.strategy)] = fit + interval
    return out
