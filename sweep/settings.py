"""Settings declared once: the mechanism behind RunConfig and SlurmOptions.

Each setting is one pydantic field, declared with `setting(default, help, operational=..., <range>)`: its type
(the annotation), default, allowed range, help text (shown by `--help`) and whether it is operational (changes how
a run executes, not what it computes) live in that one line. Types are strict: YAML's `true` is not an integer,
`1.5` is not an integer, a number is not a string; integers are accepted where numbers are, and so is YAML 1.1's
`1e-3` (which it reads as a string).

Every problem becomes a `ConfigError`, one line naming the source file and the field.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A bad setting: ``str(err)`` is one line naming the source file and the field."""

    def __init__(self, field: str, message: str, source: str | Path | None = None):
        self.field, self.message, self.source = field, " ".join(str(message).split()), source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {self.message}")


def cache_dir() -> Path:
    """Where the caches every run shares live (rendered synthetic data, spaCy tags): `$SWEEP_CACHE_DIR` (`~`
    expanded; empty counts as unset), else `~/.cache/inverse-scaling-sweep`."""
    env = os.environ.get("SWEEP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "inverse-scaling-sweep"


def setting(default: Any, help: str, *, operational: bool = False, **constraints: Any) -> Any:
    """One setting: default, help text, whether it is operational, and range constraints (gt, ge, lt, le)."""
    extra = {"operational": True} if operational else None
    if isinstance(default, (dict, list)):
        return Field(default_factory=lambda: type(default)(default), description=help, json_schema_extra=extra,
                     **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def _number(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; a researcher means the number
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[float, BeforeValidator(_number)]
"""A float setting that also takes integers and '1e-3'-style strings."""


def invalid(field: str, message: str) -> PydanticCustomError:
    """An error raised by a cross-field check inside a model validator, reported against `field`."""
    return PydanticCustomError("setting", "{message}", {"field": field, "message": message})


class Settings(BaseModel):
    """Base of every group of settings: strict types, unknown keys refused, one-line errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=False)
    section: ClassVar[str] = ""
    """Prefix of the field names in error messages (e.g. 'slurm' gives 'slurm.gpus')."""

    @classmethod
    def from_mapping(cls, raw: Any, source: str | Path | None = None):
        """Validate a mapping (from YAML or the command line); raises ConfigError naming `source` and the field."""
        prefix = f"{cls.section}." if cls.section else ""
        if not isinstance(raw, dict):
            raise ConfigError(cls.section or "top level",
                              f"must be a mapping of settings, got {type(raw).__name__}", source)
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            field, message = describe(cls, err.errors())
            raise ConfigError(prefix + field, message, source) from None

    @classmethod
    def docs(cls) -> dict[str, str]:
        """Each setting's help text, for `--help` and documentation."""
        return {name: " ".join((f.description or "").split()) for name, f in cls.model_fields.items()}

    @classmethod
    def operational(cls) -> frozenset[str]:
        """Settings that change how a run executes, not what it computes (kept out of run ids)."""
        return frozenset(name for name, f in cls.model_fields.items()
                         if (f.json_schema_extra or {}).get("operational"))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "[key]"}  # pydantic's names of a union's members in `loc`
_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "float_parsing": "a number", "string_type": "a string", "bool_type": "true or false",
             "dict_type": "a mapping", "list_type": "a list", "finite_number": "a finite number"}


def nearest_settings(key: Any, known: Any) -> list[str]:
    """The settings `key` looks like a typo of (at most three, nearest first)."""
    return difflib.get_close_matches(str(key), sorted(known), n=3, cutoff=0.75)


def unknown_setting(key: Any, known: Any) -> str:
    """The message for a key that is no setting: the nearest names when it looks like a typo, else all of them."""
    if close := nearest_settings(key, known):
        return f"unknown setting; did you mean {' or '.join(close)}?"
    return f"unknown setting; known settings: {', '.join(sorted(known))}"


def _range(constraints: dict[str, Any]) -> str:
    lo = ("[", constraints["ge"]) if "ge" in constraints else ("(", constraints.get("gt"))
    hi = ("]", constraints["le"]) if "le" in constraints else (")", constraints.get("lt"))
    if lo[1] is not None and hi[1] is not None:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if constraints.get("gt") == 0:
        return "positive"
    if lo[1] is not None:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"


def _constraints(model: type[Settings], name: Any) -> dict[str, Any]:
    field = model.model_fields.get(name) if isinstance(name, str) else None
    out: dict[str, Any] = {}
    for meta in field.metadata if field else ():
        for key in ("gt", "ge", "lt", "le"):
            if getattr(meta, key, None) is not None:
                out[key] = getattr(meta, key)
    return out


def _path(error: dict[str, Any]) -> list[str]:
    """The setting an error is about: its `loc` without the union-member tags pydantic appends."""
    return [str(part) for part in error["loc"] if str(part) not in _TYPE_TAGS]


def describe(model: type[Settings], errors: list[dict[str, Any]]) -> tuple[str, str]:
    """(field, one-line message) of the first of pydantic's errors, in this project's words."""
    error = errors[0]
    kind, ctx = error["type"], error.get("ctx") or {}
    loc = _path(error)
    field = ".".join(loc) or "top level"
    value = error.get("input")
    union = [e["type"] for e in errors if _path(e) == loc]
    if len(union) > 1 and all(t in _EXPECTED for t in union):  # a value that fits none of a union's members
        return field, f"must be {' or '.join(dict.fromkeys(_EXPECTED[t] for t in union))}, got {_short(value)}"
    if kind == "setting":
        return ctx.get("field") or field, ctx["message"]
    if kind == "extra_forbidden":
        return field, unknown_setting(loc[-1], _model_at(model, loc[:-1]).model_fields)
    if kind == "invalid_key" or tuple(error["loc"][-1:]) == ("[key]",):
        return field, "keys must be names (strings)"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return field, f"must be {_range(_constraints(model, loc[0]) or ctx)}, got {value!r}"
    if kind in _EXPECTED:
        return field, f"must be {_EXPECTED[kind]}, got {_short(value)}"
    if kind == "missing":
        return field, "must be set"
    return field, error["msg"]


def _model_at(model: type[Settings], loc: list[str]) -> type[Settings]:
    """The settings class a nested error path points into (e.g. eval_sets.0 -> EvalSet)."""
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            continue  # a list index
        nested = [t for t in (field.annotation, *get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, Settings)]
        model = nested[0] if nested else model
    return model


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_yaml_mapping(path: str | Path, what: str = "settings") -> dict[str, Any]:
    """A YAML file that must hold a non-empty mapping with string keys, loaded safely (no object construction).

    Anything else (missing, a directory, not UTF-8 text, not YAML, empty, a list or a scalar) is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("path", "no such file", path) from None
    except IsADirectoryError:
        raise ConfigError("path", "is a directory, not a YAML file", path) from None
    except OSError as err:
        raise ConfigError("path", f"cannot be read ({err.strerror or err})", path) from None
    except UnicodeDecodeError as err:
        raise ConfigError("file", f"is not UTF-8 text (byte {err.start}); a YAML file of {what} was expected",
                          path) from None
    if "\x00" in text:
        raise ConfigError("file", f"holds NUL bytes: binary, not a YAML file of {what}", path)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "file"
        raise ConfigError(where, f"not valid YAML ({getattr(err, 'problem', None) or err})", path) from None
    except RecursionError:
        raise ConfigError("file", "nested too deeply to be a YAML file of settings", path) from None
    if raw is None:
        raise ConfigError("file", f"is empty; a mapping of {what} was expected", path)
    if not isinstance(raw, dict):
        raise ConfigError("top level", f"must be a mapping of {what}, got {type(raw).__name__}", path)
    check_keys(raw, "top level", path)
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently, so a
    second `lr:` further down a file would quietly overrule the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key overriding it is no repeat
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):  # not a setting's name: check_keys refuses it with a message
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def check_keys(mapping: dict, where: str, source: str | Path | None = None) -> None:
    """Every key of a YAML mapping must be a name: `1: x`, `null: x` or `[a]: x` are mistakes, not settings."""
    for key in mapping:
        if not isinstance(key, str):
            raise ConfigError(where or "top level", f"keys must be names (strings), got {key!r}", source)
