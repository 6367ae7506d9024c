"""Load sweep results into one tidy table: one row per run x stage.

Two inputs give the same table:

* a results directory: every ``result.json`` below it (any depth), as written by the trainer and read through
  `sweep.record` (the record's fields are documented in docs/results.md). ``metrics.pretrain``,
  ``metrics.pretrain_full_length`` and ``metrics.finetune`` become one row each; a stage that is absent, null or
  empty gives no row. A run with no metrics at all (typically ``status: failed``) keeps one row with an empty
  stage so it can still be listed. Runs of `sweep tune` trials (their record names its ``trial``) are left out:
  they tune settings, they do not measure the study.
* a flat CSV or Parquet table with at least the columns of `REQUIRED_TABLE_COLUMNS` (results produced elsewhere).

A results directory is written by many processes at once and lives on shared file systems, so some files may be
empty, half-written or corrupt. Those are skipped with an `AnalysisWarning` naming the file; they never stop the
analysis. The skipped files are also kept in ``df.attrs["skipped"]`` (a list of ``(path, reason)``) for the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from sweep.identity import ADDED_SETTINGS, ID_SETTINGS_V1
from sweep.record import RESULT_FILE, RecordError, ResultRecord, parse_record, read_record

from .errors import AnalysisInputError, AnalysisWarning

REQUIRED_TABLE_COLUMNS = (
    "model",
    "params",
    "image_strategy",
    "image_tokens",
    "text_strategy",
    "text_tokens",
    "seed",
    "stage",
    "zeroshot_top1",
)
ID_COLUMNS = ("run_id", "sweep", "status", "error")
SETTING_COLUMNS = ("model", "params", "vision_params", "text_params", "image_strategy", "image_tokens",
                   "text_strategy", "text_tokens", "seed", "stage")
# Optional: the parameters of each encoder (the text one without its token embedding), the paper's size axes.
TOWER_COLUMNS = ("vision_params", "text_params")
METRIC_COLUMNS = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1", "zeroshot_classes")
COMPUTE_COLUMNS = ("samples_seen", "train_flops", "wall_seconds", "train_seconds", "samples_per_second")
STAGES = ("pretrain", "pretrain_full_length", "finetune")
STRING_COLUMNS = ("run_id", "sweep", "status", "error", "model", "image_strategy", "text_strategy", "stage",
                  "setup_id", "source")
# What a curve varies (and the seeds it averages); every other scientific setting is its setup (`setup_id`).
CURVE_SETTINGS = ("seed", "image_strategy", "image_tokens", "text_strategy", "text_tokens")
# Settings a result.json must carry (top level, or in its resolved ``config``) to be placed in the grid.
_REQUIRED_RECORD_FIELDS = ("model", "image_strategy", "image_tokens", "text_strategy", "text_tokens")
_NO_STRATEGY = ("", "nan", "null", "full", "baseline")
_PROGRESS_MIN_FILES = 50


def load_results(path: str | Path, *, progress: bool | None = None) -> pd.DataFrame:
    """Load a results directory, a single result.json, or a .csv/.parquet table into the tidy table.

    Raises `AnalysisInputError` for input that cannot be analysed at all (missing path, unknown file type, a table
    without a required column, no readable rows). ``progress=None`` shows a progress bar only on a terminal.
    """
    path = Path(path)
    if not path.exists():
        raise AnalysisInputError(path, "no such file or directory")
    if path.is_dir():
        return load_result_dir(path, progress=progress)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet", ".pq"):
        return load_table(path)
    if path.name == RESULT_FILE or suffix == ".json":
        return _records_to_frame(path, [path], progress=False)
    raise AnalysisInputError(path, "expected a results directory, a .csv or .parquet table, or a result.json")


def find_result_files(root: Path) -> list[Path]:
    """Every result.json below ``root``, sorted so that the table order does not depend on the file system.

    Symbolic links to directories are followed (a results root that links in sweeps kept elsewhere), each real
    directory once."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or a directory reached twice
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        if RESULT_FILE in filenames:
            found.append(Path(dirpath) / RESULT_FILE)
    return found


def load_result_dir(root: str | Path, *, progress: bool | None = None) -> pd.DataFrame:
    """Every result.json under ``root`` (recursively) as the tidy table; unreadable files are skipped with a warning."""
    root = Path(root)
    files = find_result_files(root)
    if not files:
        raise AnalysisInputError(root, f"no {RESULT_FILE} files found below this directory")
    return _records_to_frame(root, files, progress=progress, skip_trials=True)


def _records_to_frame(source: Path, files: list[Path], *, progress: bool | None, skip_trials: bool = False
                      ) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    trials = 0
    launched: dict[Path, dict[str, list]] = {}  # per sweep directory: run a launch asked for -> its tuned
    for file in _progress(files, progress):
        try:
            record = read_record(file)
            sweep_dir = file.parent.parent
            if sweep_dir not in launched:
                launched[sweep_dir] = _launched_runs(sweep_dir)
            # a `sweep tune` trial is tuning, not a result of the study, unless a launch of the study asked for
            # that very run (`launch --from-tune` into the tuning sweep: the best trial's run is the study's)
            if record.trial and skip_trials and file.parent.name not in launched[sweep_dir]:
                trials += 1
                continue
            rows.extend(parse_result_record(record, file, launched[sweep_dir].get(file.parent.name, ())))
        except RecordError as exc:
            skipped.append((str(file), str(exc)))
            warnings.warn(f"skipping {file}: {exc}", AnalysisWarning, stacklevel=2)
    if not rows:
        why = f" ({trials} are tuning trials, which are not analysed)" if trials else ""
        raise AnalysisInputError(source, f"none of the {len(files)} result files could be read{why}")
    df = _normalise(pd.DataFrame.from_records(rows))
    df.attrs["skipped"] = skipped
    return df


def _launched_runs(sweep_dir: Path) -> dict[str, list]:
    """The runs a launch asked for -> the settings `launch --from-tune` took from a tuning study."""
    try:
        runs = json.loads((sweep_dir / "manifest.json").read_text()).get("runs", {})
        return {run_id: [t for t in entry.get("tuned") or [] if isinstance(t, str)]
                for run_id, entry in runs.items() if isinstance(entry, dict) and entry.get("launched")}
    except (OSError, ValueError, AttributeError, TypeError):  # no manifest, or not one: records speak for themselves
        return {}


def _progress(files: list[Path], progress: bool | None) -> Iterable[Path]:
    if progress is False or len(files) < _PROGRESS_MIN_FILES:
        return files
    if progress is None and not sys.stderr.isatty():
        return files
    from tqdm import tqdm

    return tqdm(files, desc="loading results", unit="file", file=sys.stderr)


def parse_result_record(record: Any, file: str | Path = "<record>", tuned: Iterable[str] = ()
                        ) -> list[dict[str, Any]]:
    """One result record (the parsed result.json, or a ResultRecord) as tidy rows, one per stage with metrics.
    `tuned`: settings a tuning study chose for the run, left out of its setup (`setup_id`).

    Raises `RecordError` (caught by the loader, which skips the file) when the record is malformed or lacks the grid
    settings.
    """
    rec = record if isinstance(record, ResultRecord) else parse_record(record)
    missing = [name for name in _REQUIRED_RECORD_FIELDS if getattr(rec, name) is None]
    if missing:
        raise RecordError(f"missing field {missing[0]!r}")
    file_path = Path(file)
    base: dict[str, Any] = {
        "run_id": rec.run_id or file_path.parent.name,
        "sweep": rec.sweep or file_path.parent.parent.name,
        "status": rec.status,
        "error": rec.error or "",
        **{name: getattr(rec, name) for name in ("model", "params", "vision_params", "text_params",
                                                 "image_strategy", "image_tokens", "text_strategy", "text_tokens",
                                                 "seed")},
        "setup_id": setup_id(rec.config, tuned),
        "source": str(file),
    }
    for key in COMPUTE_COLUMNS:
        base[key] = getattr(rec.compute, key)
    # Each stage also records its own settings (a fine-tune runs at full length); the run's settings are the
    # top-level ones, so only the stage's metrics are taken from it.
    rows = [dict(base, stage=stage, **stage_compute(rec, stage),
                 **{k: v for k, v in metrics.values().items() if _is_number(v)})
            for stage, metrics in rec.stage_metrics().items()]
    return rows or [dict(base, stage="")]


# The training behind each stage's metrics: the pre-trained model evaluated at full length is the pre-trained one.
_TRAINED_BY = {"pretrain": ("pretrain",), "pretrain_full_length": ("pretrain",), "finetune": ("pretrain", "finetune")}


def stage_compute(rec: ResultRecord, stage: str) -> dict[str, Any]:
    """`train_flops`, `samples_seen` and `train_seconds` of the stages up to `stage`, from the record's per-stage
    compute: a pre-training row is placed at the compute of pre-training alone, not of the whole run. Empty (the
    run's totals stand) where the record lacks a stage's breakdown."""
    parts = [rec.compute.stages.get(name) for name in _TRAINED_BY.get(stage, ())]
    if not parts or any(p is None or p.flops_per_step is None or p.steps is None or p.samples is None
                        or p.train_seconds is None for p in parts):
        return {}
    return {"train_flops": sum(p.flops_per_step * p.steps for p in parts),
            "samples_seen": sum(p.samples for p in parts),
            "train_seconds": round(sum(p.train_seconds for p in parts), 3)}


def setup_id(config: dict[str, Any], tuned: Iterable[str] = ()) -> str:
    """A hash of the run's settings other than the seed and its token reduction (`CURVE_SETTINGS`): runs with the
    same setup_id are seeds and points of the same curves. Settings a tuning study chose per run (`tuned`, from
    the manifest of a `launch --from-tune`) are left out too: each cell then has its best value, and its drop is
    against the baseline at the baseline's best. "" for a record without its resolved config."""
    if not config:
        return ""
    tuned = set(tuned)
    names = [n for n in (*ID_SETTINGS_V1, *sorted(ADDED_SETTINGS)) if n not in CURVE_SETTINGS and n not in tuned]
    pairs = [(n, json.dumps(config.get(n, ADDED_SETTINGS.get(n)), sort_keys=True)) for n in names]
    return hashlib.sha256(repr(pairs).encode()).hexdigest()[:8]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_table(path: str | Path) -> pd.DataFrame:
    """A flat CSV/Parquet table with `REQUIRED_TABLE_COLUMNS` as the tidy table.

    A missing column, a non-numeric value in a numeric column or an empty table raise `AnalysisInputError`.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path)
        else:
            df = pd.read_parquet(path)
    except pd.errors.EmptyDataError as exc:
        raise AnalysisInputError(path, "empty table (no header, no rows)") from exc
    except Exception as exc:  # pandas/pyarrow raise many types for a corrupt file
        raise AnalysisInputError(path, f"cannot read table ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    df.columns = [str(c).strip() for c in df.columns]
    for column in REQUIRED_TABLE_COLUMNS:
        if column not in df.columns:
            raise AnalysisInputError(path, f"missing required column {column!r}", field=column)
    if df.empty:
        raise AnalysisInputError(path, "empty table (header only, no rows)")
    for column in [c for c in ("params", *TOWER_COLUMNS, "seed", *METRIC_COLUMNS, *COMPUTE_COLUMNS)
                   if c in df.columns]:
        if pd.api.types.is_numeric_dtype(df[column]):
            continue
        values = pd.to_numeric(df[column], errors="coerce")
        suspect = values.isna() & df[column].notna()
        text = df.loc[suspect, column].astype(str).str.strip()
        bad = suspect.copy()
        bad[suspect] = ~text.isin(["", "nan", "NaN", "None", "null"])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise AnalysisInputError(
                path, f"column {column!r}: not a number in data row {row + 1}: {df[column].iloc[row]!r}", field=column
            )
    for column in ("image_tokens", "text_tokens"):
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() | (values <= 0)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise AnalysisInputError(
                path, f"column {column!r}: not a positive number in data row {row + 1}: {df[column].iloc[row]!r}",
                field=column,
            )
    return prepare_table(df, path)


def prepare_table(df: pd.DataFrame, source: str | Path = "<table>") -> pd.DataFrame:
    """A flat table (already in memory) as the tidy table: default ``sweep``/``status``/``error``, ids, dtypes."""
    df = df.copy()
    defaults = {"sweep": Path(str(source)).stem, "status": "completed", "error": "", "source": str(source)}
    for column, value in defaults.items():
        if column not in df.columns:
            df[column] = value
    if "run_id" not in df.columns:
        df["run_id"] = _synthetic_run_ids(df)
    out = _normalise(df)
    out.attrs["skipped"] = list(df.attrs.get("skipped", []))
    return out


def _synthetic_run_ids(df: pd.DataFrame) -> pd.Series:
    """A readable id from the settings, for tables that have none; repeats of the same cell get a #n suffix."""
    ids = (
        df["model"].astype(str)
        + "_" + df["image_strategy"].astype(str) + df["image_tokens"].astype(str)
        + "_" + df["text_strategy"].astype(str) + df["text_tokens"].astype(str)
        + "_s" + df["seed"].astype(str)
    )
    repeat = df.assign(_id=ids).groupby(["_id", df["stage"].astype(str)]).cumcount()
    return ids.where(repeat == 0, ids + "#" + repeat.astype(str))


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Fix dtypes and column order so that both inputs give the same table."""
    df = df.copy()
    for column in STRING_COLUMNS:
        if column not in df.columns:
            df[column] = ""
        df[column] = df[column].astype(object).fillna("").astype(str).str.strip()
    for column in ("image_strategy", "text_strategy", "stage", "status"):
        df[column] = df[column].str.lower()
    for column in ("image_strategy", "text_strategy"):
        # A blank strategy in a hand-made table means the full sequence.
        df.loc[df[column].isin(_NO_STRATEGY), column] = "none"
    df.loc[df["status"] == "", "status"] = "completed"
    numeric = [c for c in df.columns if c not in STRING_COLUMNS]
    for column in numeric:
        if not pd.api.types.is_numeric_dtype(df[column]):
            df[column] = pd.to_numeric(df[column], errors="coerce")
    for column in ("params", *TOWER_COLUMNS, "image_tokens", "text_tokens", "seed", "zeroshot_top1"):
        if column not in df.columns:
            df[column] = np.nan
    for column in ("params", *TOWER_COLUMNS):
        df[column] = df[column].astype(float)
    first = [c for c in (*ID_COLUMNS, *SETTING_COLUMNS) if c in df.columns]
    metrics = [c for c in METRIC_COLUMNS if c in df.columns]
    compute = [c for c in COMPUTE_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in (*first, *metrics, *compute, "source")]
    return df[first + metrics + rest + compute + ["source"]].reset_index(drop=True)
