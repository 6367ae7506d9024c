"""Grid files -> the list of runs they stand for, each a validated RunConfig with a stable run id.

A grid file is YAML with these keys (only `sweep` and `axes` are required):

    sweep: image_strategies          # name of the sweep: results go to <results>/<sweep>/<run_id>/
    settings: {pretrain_samples: 8192, batch_size: 128}   # RunConfig fields shared by every run
    axes:                            # expanded as a cartesian product
      model: [cpu-s, cpu-m, cpu-l]   #   a RunConfig field: a list of values
      image:                         #   any other name: a group of sub-grids whose cells are pooled, e.g. to pair
        - {image_strategy: [random, grid, block], image_tokens: [50, 37, 26, 17]}   # strategies with their
        - {image_strategy: resize, image_tokens: [50, 17]}                          # own token lengths
    include: [{model: cpu-s, image_strategy: random, image_tokens: 33}]   # extra cells (over settings)
    exclude: [{model: cpu-l, image_tokens: 5}]   # drop expanded cells that match every key of an entry (values
                                     # compared as the run reads them; a list matches any; matching nothing: error)
    baselines: true                  # add each model's full-length run once (default true)
    slurm: {partition: gpu, gpus_per_node: 8, nodes: 2, cpus: 8, mem_gb: 400, time_min: 600}   # SlurmOptions
    tune: {params: {lr: {low: 3.0e-4, high: 1.0e-2, log: true}}, trials: 8}   # for `sweep tune` (sweep/tune.py)
    analysis: {metric: i2t_r1, max_drop: 5.0}   # how `sweep analyze` reads the sweep (sweep/analysis_spec.py)
    search: {max_seeds: 2}           # for `sweep search` (sweep/search.py)

Every problem is reported as one line naming the file and the field, before anything runs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from sweep.analysis_spec import check_analysis
from sweep.config import ConfigError, RunConfig, SlurmOptions, config_from_dict, identity, read_yaml_mapping
from sweep.sizes import MODELS
from sweep.settings import check_keys, nearest_settings, unknown_setting

GRID_KEYS = ("sweep", "settings", "axes", "include", "exclude", "baselines", "slurm", "tune", "analysis",
             "search")
FIELDS = set(RunConfig.model_fields)
# settings whose one value is itself a list or mapping (e.g. eval_sets): whole in `settings`, never an axis
STRUCTURED = {name for name, f in RunConfig.model_fields.items()
              if getattr(f.annotation, "__origin__", None) in (list, dict)}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# the settings that make a run its model's full-length baseline
FULL_LENGTH = {"image_strategy": "none", "image_tokens": None, "text_strategy": "none", "text_tokens": None}


@dataclass(frozen=True)
class Run:
    run_id: str
    config: RunConfig
    baseline: bool  # added automatically as a model's full-length run
    tuned: tuple[str, ...] = ()  # settings a tuning study chose (`launch --from-tune`): not part of its setup


@dataclass(frozen=True)
class Grid:
    path: Path
    sweep: str
    runs: list[Run]
    slurm: SlurmOptions
    raw: dict[str, Any]
    tune: Any = None  # the validated `tune:` section (sweep.tune.TuneSpec), if the grid has one
    search: Any = None  # the validated `search:` section (sweep.search.SearchSpec), if the grid has one
    analysis: Any = None  # the validated `analysis:` section (sweep.analysis_spec.AnalysisSpec), if it has one


def run_id(cfg: RunConfig) -> str:
    """Readable and stable: model, strategies, tokens, seed, and a hash of the run's identity (every setting that
    shapes the result; see sweep.config.identity for why adding a setting changes no id)."""
    digest = hashlib.sha256(repr(identity(cfg)).encode()).hexdigest()[:8]  # repr of str/int/float is stable
    return (f"{cfg.model}_{cfg.image_strategy}{cfg.image_tokens}_{cfg.text_strategy}{cfg.text_tokens}"
            f"_s{cfg.seed}_{digest}")


def _as_list(value: Any, field: str) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(field, "is empty; give at least one value")
    return values


def _product(mapping: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """{a: [1, 2], b: 3} -> [{a: 1, b: 3}, {a: 2, b: 3}], checking that every key is a RunConfig field."""
    check_keys(mapping, where)
    for key in mapping:
        if key not in FIELDS:
            raise ConfigError(f"{where}.{key}", unknown_setting(key, FIELDS))
    keys = list(mapping)
    lists = [_as_list(mapping[k], f"{where}.{k}") for k in keys]
    for key, values in zip(keys, lists):
        for v in values:
            if isinstance(v, (dict, list)):
                raise ConfigError(f"{where}.{key}", f"values must be scalars, got {v!r}")
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def _axis_cells(name: str, values: Any) -> list[dict[str, Any]]:
    where = f"axes.{name}"
    if name in FIELDS:
        return _product({name: values}, "axes")
    groups = _as_list(values, where)
    cells = []
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            if nearest_settings(name, FIELDS):  # a typo, not a group of sub-grids
                raise ConfigError(where, unknown_setting(name, FIELDS))
            raise ConfigError(f"{where}[{i}]", f"{name!r} is not a setting, so it must be a list of sub-grids "
                              f"(mappings of settings to values); got {group!r}")
        if not group:
            raise ConfigError(f"{where}[{i}]", "is an empty sub-grid")
        cells += _product(group, f"{where}[{i}]")
    return cells


@functools.lru_cache(maxsize=None)
def _field_reader(key: str) -> TypeAdapter:
    """The validator of one RunConfig field alone (built once: building it costs more than using it)."""
    return TypeAdapter(RunConfig.model_fields[key].rebuild_annotation(), config=ConfigDict(strict=True))


def _as_run_reads(key: str, value: Any, model: Any) -> Any:
    """A value as a run reads it (1e-3 and 0.001 alike, an empty image_tokens as the model's full length), so an
    exclude entry matches a cell however either is written; a value the field refuses stays as written."""
    try:
        value = _field_reader(key).validate_python(value)
    except ValidationError:
        return value
    if value is None and key in ("image_tokens", "text_tokens") and model in MODELS:
        return getattr(MODELS[model], key)
    return value


def _matches(cell: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether a cell (settings included) has every value of an exclude entry; unset settings take defaults."""
    def value(mapping: dict[str, Any], key: str) -> Any:
        raw = mapping[key] if key in mapping else cell.get(key, RunConfig.model_fields[key].default)
        return _as_run_reads(key, raw, cell.get("model", RunConfig.model_fields["model"].default))
    return all(value(entry, k) == value(cell, k) for k in entry)


def _cell_label(cell: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell.items())


def expand(raw: dict[str, Any], source: str | Path) -> tuple[str, list[Run]]:
    """The runs of a parsed grid (validated), in a stable order; raises ConfigError naming `source`."""
    try:
        return _expand(raw)
    except ConfigError as err:
        raise ConfigError(err.field, err.message, source) from None


def _expand(raw: dict[str, Any]) -> tuple[str, list[Run]]:
    check_keys(raw, "top level")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; a grid has: {', '.join(GRID_KEYS)}")
    sweep = raw.get("sweep")
    if not isinstance(sweep, str) or not NAME.match(sweep):
        raise ConfigError("sweep", f"must be a name of letters, digits, '_', '.', '-' (got {sweep!r})")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise ConfigError("settings", "must be a mapping of settings to single values")
    check_keys(settings, "settings")
    for key, value in settings.items():
        if key not in FIELDS:
            raise ConfigError(f"settings.{key}", unknown_setting(key, FIELDS))
        if isinstance(value, (list, dict)) and key not in STRUCTURED:
            raise ConfigError(f"settings.{key}", "must be a single value (put lists under axes)")
    axes = raw.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise ConfigError("axes", "must be a non-empty mapping of axis names to lists of values")
    check_keys(axes, "axes")
    baselines = raw.get("baselines", True)
    if not isinstance(baselines, bool):
        raise ConfigError("baselines", f"must be true or false, got {baselines!r}")

    cells = [{}]
    for name, values in axes.items():
        cells = [{**c, **a} for c in cells for a in _axis_cells(name, values)]
    for key in ("exclude", "include"):
        entries = raw.get(key) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
            raise ConfigError(key, "must be a list of non-empty mappings of settings")
        for i, entry in enumerate(entries):
            _product(entry, f"{key}[{i}]")  # checks the keys
    excluded = [False] * len(cells)
    for i, entry in enumerate(raw.get("exclude") or []):
        matching = _product(entry, f"exclude[{i}]")  # a list of values matches any of them
        hits = [any(_matches({**settings, **c}, m) for m in matching) for c in cells]
        if not any(hits):  # judged on every expanded cell, so an entry overlapping another one is no mistake
            raise ConfigError(f"exclude[{i}]", f"matches no cell of the grid ({_cell_label(entry)})")
        excluded = [a or b for a, b in zip(excluded, hits)]
    cells = [c for c, out in zip(cells, excluded) if not out]
    origins = ["axes"] * len(cells)  # where each cell comes from, for a duplicate's message
    for i, entry in enumerate(raw.get("include") or []):
        extra = _product(entry, f"include[{i}]")
        cells, origins = cells + extra, origins + [f"include[{i}]"] * len(extra)
    if not cells:
        raise ConfigError("exclude", "removes every cell of the grid")

    runs: dict[str, Run] = {}
    for cell, origin in zip(cells, origins):
        try:
            cfg = config_from_dict({**settings, **cell})
        except ConfigError as err:
            raise ConfigError(err.field, f"{err.message} (in the cell {_cell_label(cell)})") from None
        rid = run_id(cfg)
        if rid in runs:
            raise ConfigError(origin, f"duplicate cell: {_cell_label(cell)} is the same run as one before it")
        runs[rid] = Run(rid, cfg, baseline=False)
    if baselines:
        seen = set()
        for run in list(runs.values()):
            full = {**run.config.to_dict(), **FULL_LENGTH}
            key = json.dumps(full, sort_keys=True)
            if key in seen:  # most runs share their baseline: build each one once
                continue
            seen.add(key)
            cfg = config_from_dict(full)
            rid = run_id(cfg)
            runs.setdefault(rid, Run(rid, cfg, baseline=True))
    return sweep, sorted(runs.values(), key=lambda r: (not r.baseline, r.run_id))


def full_length(cfg: RunConfig) -> RunConfig:
    """The baseline of a run: the same settings at the model's full lengths."""
    return config_from_dict({**cfg.to_dict(), **FULL_LENGTH})


def load_grid(path: str | Path) -> Grid:
    """Read, expand and validate a grid file completely (nothing is written or submitted)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "grid keys")
    sweep, runs = expand(raw, path)
    slurm = SlurmOptions.from_mapping(raw.get("slurm") or {}, path)
    tune = None
    if "tune" in raw:  # a bare `tune:` is an empty section, checked as such
        from sweep.tune import check_tune

        swept = {key for cell in [raw["axes"], *(raw.get("include") or [])] for key in cell if key in FIELDS}
        swept |= {key for name, groups in raw["axes"].items() if name not in FIELDS
                  for group in _as_list(groups, name) for key in group}  # one sub-grid may be written alone
        tune = check_tune(raw["tune"] if raw["tune"] is not None else {}, runs, swept, path)
    analysis = check_analysis(raw["analysis"], runs, path) if "analysis" in raw else None
    search = None
    if "search" in raw:  # a bare `search:` means every default
        from sweep.search import check_search

        search = check_search(raw["search"] if raw["search"] is not None else {}, runs, path, analysis)
    return Grid(path, sweep, runs, slurm, raw, tune, search, analysis)
