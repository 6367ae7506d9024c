"""Training data on disk: webdataset shards and CSV/TSV tables, read as streams of raw samples.

A raw sample is (key, image file bytes or path, caption); nothing is decoded here. The epoch's order is set by
`sweep.data.stream`; a source only answers "the samples of stream s of n in epoch e, in order":

- shards: the epoch's shard order is a permutation drawn from (seed, stage, epoch); stream s reads shards
  s, s+n, s+2n, ... of it, one after the other, and shuffles their samples through a buffer of its share of
  SHUFFLE_SAMPLES (webdataset's recipe, so a shard is read sequentially, never seeked in);
- a table: the epoch is a permutation of all rows; stream s takes rows s, s+n, ...

Both are pure functions of their arguments, so a stream can be restarted at any position and reproduce it.

Paths follow open_clip_train: `train_data` may use brace expansion (`shards/{00000..00099}.tar`) and join several
sources with `::`.
"""
from __future__ import annotations

import csv
import functools
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from braceexpand import braceexpand

# samples held by the shuffle buffers of all streams together, each stream's buffer an equal share (1,000 samples
# each for 16 streams): ~0.5 GB of ~30 KB JPEGs in all, however many streams an epoch is split into
SHUFFLE_SAMPLES = 16_000
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class RawSample:
    key: str
    image: bytes | str | None  # file bytes (shards), a path (tables), None when the sample has no image
    captions: tuple[str, ...] = ()  # every caption (retrieval sets have several per image); empty: none
    where: str = ""  # the sample for a message: "sample 000123 of shards/00004.tar", "row 7 of train.csv"
    lost: str | None = None  # set on a stand-in for the rest of a shard that broke off: why it did
    columns: tuple[str, str] | None = None  # a table's row: its (image, caption) columns, for a message

    @property
    def caption(self) -> str | None:
        """The caption a training pair uses: the first."""
        return self.captions[0] if self.captions else None

    def lacks(self) -> str | None:
        """Why the sample is no training pair for want of an image or a caption, in its source's terms; None when
        it has both. A caption of only whitespace is none (shards strip their captions' lines)."""
        image_column, caption_column = self.columns or (None, None)
        if self.image is None:
            return f"empty {image_column} column" if self.columns else "no image (.jpg/.jpeg/.png/.webp) in the sample"
        if not (self.caption or "").strip():
            return (f"empty {caption_column} column" if self.columns
                    else "no caption (.txt, or .json with caption/text/captions)")
        return None


def expand_paths(pattern: str) -> list[str]:
    """`a/{0..2}.tar::b.tar` -> [a/0.tar, a/1.tar, a/2.tar, b.tar] (open_clip_train's syntax)."""
    return [path for part in pattern.split("::") if part.strip() for path in braceexpand(part.strip())]


def rng_for(*keys: int) -> np.random.Generator:
    """An independent numpy generator per tuple of ints (seed, stage, epoch, stream, ...)."""
    return np.random.default_rng(list(keys))


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of n shards or rows: drawn once per process, shared by the streams it reads."""
    return rng_for(seed, stage, epoch).permutation(n)


def _captions_of(files: dict[str, bytes], several: bool) -> tuple[str, ...]:
    """The captions of a webdataset sample, from `.txt`, or from `.json` with `caption`, `text` or a `captions`
    list. A training pair has one caption: the whole `.txt` (LAION's captions may run over several lines; they are
    joined with spaces), or the json's `caption`/`text` (else the first of `captions`). With `several` (retrieval
    sets), every caption: one per line of `.txt`, or the json's `captions` list (else `caption`/`text`)."""
    if "txt" in files:
        lines = tuple(line.strip() for line in files["txt"].decode("utf-8", "replace").splitlines() if line.strip())
        return lines if several or not lines else (" ".join(lines),)
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            return ()
        if isinstance(meta, dict):
            many = meta.get("captions")
            many = tuple(many) if isinstance(many, list) and many and all(isinstance(c, str) for c in many) else ()
            one = next(((meta[name],) for name in ("caption", "text") if isinstance(meta.get(name), str)), ())
            return (many or one) if several else (one or many[:1])
    return ()


def tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream, in order: ustar, GNU long names and pax paths, as
    tarfile, GNU tar and webdataset's writers produce them. A plain reader, ~10x faster than `tarfile` per member
    (which matters at thousands of samples per second); a broken header or a cut file raises OSError."""
    long_name = None
    while True:
        header = f.read(512)
        if header == b"\0" * 512 or not header:
            return  # the end-of-archive blocks, or a file that ends between members (tarfile reads it so too)
        if len(header) < 512:
            raise OSError("the file ends inside a tar header")
        try:
            stored = int(header[148:156].strip(b" \0") or b"0", 8)
            size = int(header[124:136].strip(b" \0") or b"0", 8)
        except ValueError:
            raise OSError("not a tar header") from None
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum counts its own field as spaces
            raise OSError("a tar header fails its checksum")
        data = f.read(size)
        if len(data) < size or len(f.read(-size % 512)) < -size % 512:  # the member and its padding
            raise OSError("the file ends inside a member")
        kind = header[156:157]
        if kind == b"L":  # GNU: the next member's long name
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":  # pax: "<len> path=<name>\n" records for the next member
            for record in data.decode("utf-8", "replace").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345] != 0:  # ustar keeps a long path's directory apart
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
            yield long_name or name, data
            long_name = None
        else:
            long_name = None  # directories, links, global pax headers: not samples


def read_shard(path: str, several: bool = False) -> Iterator[RawSample]:
    """The samples of one tar shard (plain or gzipped) in file order: consecutive members that share a key (the
    name up to the first dot of the base name, webdataset's convention) form a sample; `several`: every caption
    of a sample, as a retrieval set reads them (`_captions_of`). A truncated or unreadable shard ends early, with
    an OSError after the samples read so far."""
    def sample(key: str, files: dict[str, bytes]) -> RawSample:
        image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
        return RawSample(key, image, _captions_of(files, several), f"sample {key} of {path}")

    key, files = None, {}
    try:
        # a process may hold up to 240 shards open (one per stream it reads): 256 KiB of read buffer each
        with open(path, "rb", buffering=1 << 18) as raw:
            f = gzip.open(raw) if raw.peek(2)[:2] == b"\x1f\x8b" else raw
            for name, data in tar_members(f):
                directory, _, base = name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or not stem:  # no extension, or hidden: macOS tar's ._<name> files are no sample's
                    continue
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key:
                    if key is not None:
                        yield sample(key, files)
                    key, files = member_key, {}
                files[ext.lower()] = data
    except (OSError, EOFError, zlib.error) as err:
        raise OSError(f"shard {path}: {err}") from None
    if key is not None:
        yield sample(key, files)


class ShardSource:
    """Webdataset shards, streamed. A shard that cannot be read to the end gives, where it broke off, one stand-in
    sample that says why (`lost`; its unread samples cannot be counted: the loader counts the broken shard); the
    stream goes on with the next shard."""

    def __init__(self, shards: list[str]):
        self.shards = shards

    @property
    def max_streams(self) -> int:
        return len(self.shards)  # a shard is read by one stream

    def stream(self, seed: int, stage: int, epoch: int, stream: int, streams: int) -> Iterator[RawSample]:
        order = epoch_order(len(self.shards), seed, stage, epoch)
        shuffle = rng_for(seed, stage, epoch, stream, 1)
        size = max(1, SHUFFLE_SAMPLES // streams)
        buffer: list[RawSample] = []
        for index in order[stream::streams]:
            for sample in _with_error(self.shards[index]):
                if len(buffer) < size:
                    buffer.append(sample)
                    continue
                # the draws depend only on how many samples came before, so a restart reproduces them
                j = int(shuffle.integers(len(buffer)))
                buffer[j], sample = sample, buffer[j]
                yield sample
        shuffle.shuffle(buffer)
        yield from buffer


def _with_error(path: str) -> Iterator[RawSample]:
    try:
        yield from read_shard(path)
    except OSError as err:
        yield RawSample(f"{path}#unreadable", None, where=f"the rest of {path}",
                        lost=str(err).removeprefix(f"shard {path}: "))


class TableSource:
    """A CSV/TSV of image paths and captions (open_clip_train's `csv_img_key`, `csv_caption_key`,
    `csv_separator`); relative image paths are relative to the table's directory."""

    def __init__(self, path: str, img_key: str, caption_key: str, separator: str):
        self.path, self.rows = path, read_table(path, img_key, caption_key, separator)
        self.columns = (img_key, caption_key)

    @property
    def max_streams(self) -> int:
        return len(self.rows)

    def stream(self, seed: int, stage: int, epoch: int, stream: int, streams: int) -> Iterator[RawSample]:
        order = epoch_order(len(self.rows), seed, stage, epoch)
        for index in order[stream::streams]:
            image, caption = self.rows[index]
            yield RawSample(f"{index}", image, (caption,), f"row {index + 1} of {self.path} (after the header)",
                            columns=self.columns)


def read_columns(path: str, columns: tuple[str, ...], separator: str) -> Iterator[tuple[str, ...]]:
    """The values of `columns` in each row of a CSV/TSV (UTF-8, with or without a byte-order mark), streamed; a
    row too short for a column has '' there, a blank line is no row. Fields are read with CSV quoting, as Python's
    csv module and pandas write them, strictly: a stray quote is an error rather than the start of a field that
    runs on through the rows below it. ValueError naming the file, and the line where it can."""
    line = 1  # where the row being read starts
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=separator, strict=True)
            header = next(reader, [])
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{path} has no column {missing[0]!r} (header: {separator.join(header)[:80]!r}, "
                                 f"separator {separator!r})")
            twice = [c for c in columns if header.count(c) > 1]
            if twice:  # which of them holds the data cannot be told
                raise ValueError(f"{path} has {header.count(twice[0])} columns named {twice[0]!r}")
            where = [header.index(c) for c in columns]
            line = reader.line_num + 1
            for row in reader:
                if row:
                    yield tuple(row[i] if i < len(row) else "" for i in where)
                line = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} line {_undecodable_line(path)} is not UTF-8 text ({err.reason})") from None
    except csv.Error as err:
        why = str(err).replace("\t", "\\t")  # csv's message quotes the separator, a tab as it is
        raise ValueError(f"{path} line {line}: {why} (fields are read with CSV quoting: one that starts with \" "
                         "ends at the next lone \", and a \" inside it is doubled)") from None


def _undecodable_line(path: str) -> int:
    # the text reader decodes ahead of the csv parser in blocks, so neither knows the line: look again, by line
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return number


def read_table(path: str, img_key: str, caption_key: str, separator: str) -> list[tuple[str | None, str]]:
    """[(absolute image path, caption)] of a CSV/TSV (`read_columns`); a row that lacks its image path has None,
    one that lacks its caption ''. ValueError naming what is wrong."""
    table = Path(path)
    rows = [(str(table.parent / image) if image else None, caption)
            for image, caption in read_columns(path, (img_key, caption_key), separator)]
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def is_shard(path: str) -> bool:
    """A path read as a tar shard (plain or gzipped) rather than as a table."""
    return path.endswith((".tar", ".tar.gz", ".tgz"))


def open_source(dataset: str, train_data: str, img_key: str, caption_key: str, separator: str
                ) -> ShardSource | TableSource:
    if dataset == "webdataset":
        return ShardSource(expand_paths(train_data))
    paths = expand_paths(train_data)
    if len(paths) != 1:
        raise ValueError(f"a csv training set is one table, got {len(paths)} paths")
    return TableSource(paths[0], img_key, caption_key, separator)

