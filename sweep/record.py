"""The result record: the one definition of `<results>/<sweep>/<run_id>/result.json`.

The trainer builds a `ResultRecord` and writes it with `write_record`; `sweep launch`, `sweep status` and the
analysis read it with `read_record` / `read_status` only. Every field is documented in docs/results.md (a test
checks that the document names every field declared here).

Reading is lenient in what may be absent (a record from an older version, or one written by another tool, may lack
fields: they read as null) and strict in what is present (a token count that is not a number makes the record
unreadable, never a wrong row). Unknown fields are kept: more fields are welcome. Records written before
`schema_version` existed are version 1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sweep.results import write_json_atomic

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
# the run's settings that also sit at the top of the record (copied from `config` when a record lacks them)
RUN_SETTINGS = ("model", "image_strategy", "image_tokens", "text_strategy", "text_tokens", "seed")


class RecordError(ValueError):
    """A result.json that cannot be used; the message says why in one line."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StageMetrics(_Part):
    """What one stage reached, measured right after it, at that stage's own token lengths (also recorded here)."""

    zeroshot_top1: float | None = None
    zeroshot_top5: float | None = None
    zeroshot_classes: int | None = Field(None, gt=0)
    i2t_r1: float | None = None
    t2i_r1: float | None = None
    image_strategy: str | None = None
    image_tokens: int | None = Field(None, gt=0)
    text_strategy: str | None = None
    text_tokens: int | None = Field(None, gt=0)

    def values(self) -> dict[str, float]:
        """The stage's numeric metrics (the declared ones and any extra), without its settings."""
        settings = {"image_strategy", "image_tokens", "text_strategy", "text_tokens"}
        return {k: v for k, v in self.model_dump().items()
                if k not in settings and isinstance(v, (int, float)) and not isinstance(v, bool)}


class StageCompute(_Part):
    train_seconds: float | None = None
    first_step_seconds: float | None = None
    flops_per_step: int | None = None
    steps: int | None = None
    samples: int | None = None
    micro_batch_size: int | None = None
    skipped_samples: int | None = None
    broken_shards: int | None = None
    loader_workers: int | None = None


class Compute(_Part):
    samples_seen: int | None = None
    train_flops: int | float | None = None
    wall_seconds: float | None = None
    train_seconds: float | None = None
    samples_per_second: float | None = None
    stages: dict[str, StageCompute] = Field(default_factory=dict)
    threads: int | None = None
    world_size: int | None = None
    device: str | None = None
    device_name: str | None = None
    precision: str | None = None
    compiled: bool | None = None
    workers: int | None = None


class Resume(_Part):
    stage: str
    step: int


class Evaluation(_Part):
    """One evaluation during a run: after `step` steps of `stage`, at that stage's token lengths."""

    stage: str
    step: int
    metrics: StageMetrics


class ResultRecord(_Part):
    """One run's outcome. Written once, when the run has ended (completed, failed, or pruned by a tuning trial)."""

    schema_version: int = SCHEMA_VERSION
    run_id: str | None = None
    sweep: str | None = None
    status: Literal["completed", "failed", "pruned"]
    error: str | None = None
    pruned_at: Resume | None = None
    trial: dict[str, Any] | None = None
    model: str | None = None
    params: int | None = Field(None, gt=0)
    vision_params: int | None = Field(None, gt=0)
    text_params: int | None = Field(None, gt=0)
    image_strategy: str | None = None
    image_tokens: int | None = Field(None, gt=0)
    text_strategy: str | None = None
    text_tokens: int | None = Field(None, gt=0)
    seed: int | None = None
    metrics: dict[str, StageMetrics | None] = Field(default_factory=dict)
    compute: Compute = Field(default_factory=Compute)
    config: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str | None] = Field(default_factory=dict)
    open_clip_model: str | None = None
    weights: str | None = None
    resumed: list[Resume] = Field(default_factory=list)
    final_loss: dict[str, float] = Field(default_factory=dict)
    evals: list[Evaluation] | None = None  # null in records from before it existed

    @model_validator(mode="before")
    @classmethod
    def _older_forms(cls, raw: Any) -> Any:
        """Nulls where an older record or another tool left a container out; settings from `config`."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for key in ("metrics", "compute", "config", "versions", "resumed", "final_loss"):
            if raw.get(key) is None:
                raw.pop(key, None)
        if raw.get("error") is not None and not isinstance(raw["error"], str):
            raw["error"] = json.dumps(raw["error"])
        config = raw.get("config") if isinstance(raw.get("config"), dict) else {}
        for key in RUN_SETTINGS:
            if raw.get(key) is None and config.get(key) is not None:
                raw[key] = config[key]
        return raw

    def stage_metrics(self) -> dict[str, StageMetrics]:
        """The stages that ran and were evaluated (a skipped fine-tune is absent)."""
        return {stage: m for stage, m in self.metrics.items() if m is not None and m.model_dump(exclude_none=True)}

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_record(raw: Any) -> ResultRecord:
    """A parsed result.json as a ResultRecord; raises RecordError saying what is wrong."""
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object, got {type(raw).__name__}")
    try:
        return ResultRecord.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise RecordError(f"field {where!r}: {first['msg']} (got {first.get('input')!r:.60})") from None


def read_record(path: str | Path) -> ResultRecord:
    """Read and check one result.json (a path to the file or to its run directory); RecordError if unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError("no such file") from None
    except OSError as err:
        raise RecordError(f"cannot read ({err.strerror or err})") from None
    if not data.strip():
        raise RecordError("empty file (half-written?)")
    try:
        raw = json.loads(data)
    except UnicodeDecodeError:
        raise RecordError("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON, half-written or corrupt ({err.msg}: line {err.lineno} column "
                          f"{err.colno})") from None
    return parse_record(raw)


class _Head(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: Literal["completed", "failed", "pruned"]
    error: Any = None
    pruned_at: Any = None


def read_status(run_dir: str | Path) -> tuple[str, str] | None:
    """(status, reason) of a run from its result.json: ('completed', ''), ('failed', why), ('pruned', where), or
    None when the run has no result yet. An unreadable file is ('failed', 'result.json is unreadable: ...').

    Only `status` and `error` are validated, so `sweep status` reads 10,000 records in well under a second."""
    try:
        data = (Path(run_dir) / RESULT_FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        return "failed", f"result.json is unreadable ({err.strerror or err})"
    try:
        head = _Head.model_validate_json(data)
    except ValidationError as err:
        return "failed", f"result.json is unreadable ({err.errors()[0]['msg']})"
    if head.status == "completed":
        return "completed", ""
    if head.status == "pruned":
        at = head.pruned_at if isinstance(head.pruned_at, dict) else {}
        return "pruned", f"pruned by its tuning trial at {at.get('stage')} step {at.get('step')}"
    return "failed", one_line(head.error or "failed without a reason")


def status_of(run_dir: str | Path) -> str | None:
    """'completed', 'failed', 'pruned' or None (no result yet)."""
    found = read_status(run_dir)
    return found[0] if found else None


def one_line(text: Any, width: int = 160) -> str:
    """`text` on one line of at most `width` characters; a mapping or list as JSON (as result.json holds it)."""
    line = " ".join(str(json.dumps(text, default=str) if isinstance(text, (dict, list)) else text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def write_record(run_dir: str | Path, record: ResultRecord) -> Path:
    """Write RUN_DIR/result.json atomically: a reader sees the whole record or none."""
    path = Path(run_dir) / RESULT_FILE
    write_json_atomic(path, record.to_json())
    return path


def result_mtime(run_dir: str | Path) -> float | None:
    try:
        return os.stat(Path(run_dir) / RESULT_FILE).st_mtime
    except OSError:
        return None
