"""Text token reduction: which words of a caption the text encoder sees at a reduced `text_tokens`.

The unit kept or dropped is the CLIP *word*: open_clip's SimpleTokenizer cleans the caption (ftfy, HTML entities,
whitespace), lowercases it and splits it with its regex into words ("don't" -> "don", "'t"; "dog," -> "dog", ",");
each word becomes one or more BPE tokens. A kept word keeps all of its BPE tokens. The encoded row is

    <start_of_text> (49406), the kept words in their original order, <end_of_text> (49407), zeros up to text_tokens

so there are never more than `text_tokens` tokens and the end token, where open_clip pools the text feature, is
never cut off. Words get `text_tokens - 2` BPE tokens in all (the word budget).

Strategies (`TEXT_STRATEGIES`, name -> function choosing which words to keep):
  - `none`: every word, cut at the budget token by token: exactly open_clip's plain tokenization (the baseline;
    only at the full context length).
  - `truncation`: the first tokens, as open_clip cuts a caption to a shorter context (and CLIPA truncates): every
    word, cut at the budget token by token, so the last word kept may lose its last BPE tokens.
  - `random`: a uniformly random subset of words: words in a random order, each kept if its tokens still fit.
  - `block`: a random contiguous span of words: a start word drawn uniformly among the starts whose span is not cut
    short by the caption's end, then words from there while they fit.
  - `syntax`: words ranked by part of speech (spaCy, whole caption in context): nouns and proper nouns, then
    adjectives, then verbs, then the rest (AUX, e.g. "is", counts as the rest); ties left to right; words taken
    in rank order, each kept if its tokens still fit (a long noun that does not fit is skipped, so a shorter
    lower-ranked word can fill the space).
With one-token words (almost all English words), `random` keeps exactly min(words, budget) words, and `block` is
open_clip's block mask. Literal "<start_of_text>"/"<end_of_text>" in a caption are plain text here (open_clip would
turn them into control tokens); otherwise `none` equals `open_clip.tokenize(..., context_length)`.

Add a strategy in a few lines:

    @register_text_strategy("nouns_only", needs_pos=True)
    def nouns_only(caption: CaptionWords, budget: int, rng: np.random.Generator | None) -> list[int]:
        return first_fit([i for i, pos in enumerate(caption.pos) if pos == "NOUN"], caption.lengths, budget)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex
import torch

from sweep.strategies.syntax import (
    DEFAULT_SPACY_MODEL,
    POS_RANK,
    REST_RANK,
    SyntaxTagger,
    check_spacy_model,
)

SOT_TOKEN = 49406
EOT_TOKEN = 49407
FULL_CONTEXT_LENGTH = 32
MIN_TEXT_TOKENS = 3  # start, one word token, end

# open_clip's SimpleTokenizer.pat without its leading special-token alternatives (see the module docstring).
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@dataclass(frozen=True)
class CaptionWords:
    """One caption split into CLIP words: what a strategy chooses from."""

    words: tuple[str, ...]  # lowercased CLIP words, in order
    token_ids: tuple[tuple[int, ...], ...]  # BPE token ids of each word
    lengths: tuple[int, ...]  # len(token_ids[i])
    pos: tuple[str, ...] | None = None  # universal POS tag per word (spaCy), only for strategies with needs_pos

    @property
    def total(self) -> int:
        return sum(self.lengths)


TextStrategy = Callable[[CaptionWords, int, "np.random.Generator | None"], Iterable[int]]
TEXT_STRATEGIES: dict[str, TextStrategy] = {}


def register_text_strategy(
    name: str, *, deterministic: bool = True, needs_pos: bool = False
) -> Callable[[TextStrategy], TextStrategy]:
    """Register `fn(caption, budget, rng) -> indices of kept words` under `name`.

    `budget` is the number of BPE tokens the words may use; `rng` is a numpy Generator for random strategies
    (None for deterministic ones, whose encoded rows are cached per caption). Words beyond the budget are cut,
    so a strategy can never produce an over-long row; the kept words are put back in their original order.
    """

    def decorator(fn: TextStrategy) -> TextStrategy:
        fn.deterministic = deterministic  # type: ignore[attr-defined]
        fn.needs_pos = needs_pos  # type: ignore[attr-defined]
        TEXT_STRATEGIES[name] = fn
        return fn

    return decorator


def first_fit(order: Iterable[int], lengths: Sequence[int], budget: int) -> list[int]:
    """Words taken in `order`, each kept if its tokens still fit; returned in original order."""
    kept, used = [], 0
    for i in order:
        n = lengths[i]
        if used + n <= budget:
            kept.append(int(i))
            used += n
            if used == budget:
                break
    kept.sort()
    return kept


@register_text_strategy("none")
def keep_everything(caption: CaptionWords, budget: int, rng: np.random.Generator | None) -> range:
    """The baseline: all words; the encoder cuts at the budget token by token, as open_clip does."""
    return range(len(caption.words))


@register_text_strategy("truncation")
def truncation(caption: CaptionWords, budget: int, rng: np.random.Generator | None) -> range:
    """The first tokens: all words, which the encoder cuts at the budget token by token (half a word included)."""
    return range(len(caption.words))


@register_text_strategy("random", deterministic=False)
def random_words(caption: CaptionWords, budget: int, rng: np.random.Generator | None) -> Sequence[int]:
    """A uniformly random subset of words, as many as fit."""
    if caption.total <= budget:
        return range(len(caption.words))
    assert rng is not None
    return first_fit(rng.permutation(len(caption.words)).tolist(), caption.lengths, budget)


@register_text_strategy("block", deterministic=False)
def block(caption: CaptionWords, budget: int, rng: np.random.Generator | None) -> Sequence[int]:
    """A random contiguous span of words, as long as fits."""
    lengths = caption.lengths
    if caption.total <= budget:
        return range(len(lengths))
    assert rng is not None
    # The latest start whose span reaches the caption's end; later starts would only give shorter spans.
    last_start, tail = len(lengths), 0
    while last_start > 0 and tail + lengths[last_start - 1] <= budget:
        last_start -= 1
        tail += lengths[last_start]
    starts = [i for i in range(min(last_start, len(lengths) - 1) + 1) if lengths[i] <= budget]
    if not starts:
        return []
    start = starts[int(rng.integers(len(starts)))]
    end, used = start, 0
    while end < len(lengths) and used + lengths[end] <= budget:
        used += lengths[end]
        end += 1
    return range(start, end)


@register_text_strategy("syntax", needs_pos=True)
def syntax(caption: CaptionWords, budget: int, rng: np.random.Generator | None) -> list[int]:
    """Nouns, then adjectives, then verbs, then the rest (ties left to right), as many as fit."""
    assert caption.pos is not None
    order = sorted(range(len(caption.words)), key=lambda i: (POS_RANK.get(caption.pos[i], REST_RANK), i))
    return first_fit(order, caption.lengths, budget)


def allowed_text_tokens(strategy: str, context_length: int = FULL_CONTEXT_LENGTH) -> list[int]:
    """The `text_tokens` a strategy accepts (for config validation).

    `none` is the baseline, so only the full `context_length`; every other strategy any length from 3 (start, one
    word token, end) to `context_length`.
    """
    _strategy(strategy)
    if strategy == "none":
        return [context_length]
    return list(range(MIN_TEXT_TOKENS, context_length + 1))


def check_text_settings(
    text_strategy: str,
    text_tokens: int,
    context_length: int = FULL_CONTEXT_LENGTH,
    spacy_model: str = DEFAULT_SPACY_MODEL,
) -> None:
    """Everything a config loader should check before a run starts; raises ValueError with a one-line message."""
    allowed = allowed_text_tokens(text_strategy, context_length)
    if text_tokens not in allowed:
        span = str(allowed[0]) if len(allowed) == 1 else f"{allowed[0]}..{allowed[-1]}"
        raise ValueError(
            f"text_tokens {text_tokens} is not allowed for text_strategy '{text_strategy}' "
            f"with context length {context_length} (allowed: {span})"
        )
    if getattr(TEXT_STRATEGIES[text_strategy], "needs_pos", False):
        check_spacy_model(spacy_model)


def _strategy(name: str) -> TextStrategy:
    try:
        return TEXT_STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown text_strategy '{name}' (known: {', '.join(sorted(TEXT_STRATEGIES))})"
        ) from None


@functools.lru_cache(maxsize=1)
def _tokenizer():  # noqa: ANN202 - open_clip's SimpleTokenizer; built once (reads the BPE merges, ~0.3 s)
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


_WORD_IDS: dict[str, tuple[int, ...]] = {}


def _word_ids(word: str) -> tuple[int, ...]:
    ids = _WORD_IDS.get(word)
    if ids is None:
        tok = _tokenizer()
        byte_word = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
        ids = tuple(tok.encoder[piece] for piece in tok.bpe(byte_word).split(" "))
        _WORD_IDS[word] = ids
    return ids


def basic_clean(text: str) -> str:
    """open_clip's basic_clean (ftfy, then HTML entities twice, then strip), with a fast path: ftfy and
    html.unescape change nothing in printable ASCII without '&', most alt-text, which then skips ~16 us of ftfy."""
    if text.isascii() and text.isprintable() and "&" not in text:
        return text.strip()
    from open_clip.tokenizer import basic_clean as full

    return full(text)


def split_words(caption: str) -> tuple[str, list[int], list[str]]:
    """(text for the tagger, start offset of each CLIP word in it, the CLIP words), as open_clip's 'lower' clean.

    The tagger gets the cleaned text with its case (better tags); words are found on the lowercased copy, whose
    offsets are the same unless lowercasing changed the length, in which case the lowercased text is tagged.
    """
    from open_clip.tokenizer import whitespace_clean

    cased = whitespace_clean(basic_clean(caption))
    lower = cased.lower()
    matches = list(_WORD_PATTERN.finditer(lower))
    text = cased if len(cased) == len(lower) else lower
    return text, [m.start() for m in matches], [m.group() for m in matches]


def encode_kept(caption: CaptionWords, kept: Iterable[int], text_tokens: int) -> list[int]:
    """Start token, the kept words' tokens in original order (cut at the budget), end token; unpadded."""
    budget = text_tokens - 2
    ids: list[int] = [SOT_TOKEN]
    for i in sorted(kept):
        ids.extend(caption.token_ids[i])
    del ids[budget + 1 :]
    ids.append(EOT_TOKEN)
    return ids


MAX_CACHED_CAPTIONS = 500_000  # ~0.5 GB of cached rows; the embedded pool (20,000 captions) always fits


class TextReducer:
    """Captions -> token rows [N, text_tokens] with one text strategy; the trainer's text transform.

    `prepare` splits (and, for `syntax`, tags) each distinct caption once; afterwards `__call__` is pure Python and
    numpy on cached word tokens (and cached rows for the deterministic strategies none, truncation, syntax).
    Captions that were not prepared are prepared on the fly.
    """

    def __init__(
        self,
        strategy: str,
        text_tokens: int,
        *,
        context_length: int = FULL_CONTEXT_LENGTH,
        spacy_model: str = DEFAULT_SPACY_MODEL,
        cache_dir: str | Path | None = None,
        n_process: int | None = None,
    ) -> None:
        check_text_settings(strategy, text_tokens, context_length, spacy_model)
        self.text_strategy = strategy
        self.text_tokens = text_tokens
        self.context_length = context_length
        self._fn = TEXT_STRATEGIES[strategy]
        self.deterministic: bool = getattr(self._fn, "deterministic", True)
        self.needs_pos: bool = getattr(self._fn, "needs_pos", False)
        self._tagger = SyntaxTagger(spacy_model, cache_dir, n_process=n_process) if self.needs_pos else None
        self._rows: dict[str, np.ndarray] = {}  # deterministic strategies: the encoded row per caption
        self._words: dict[str, CaptionWords] = {}  # random strategies: the words per caption

    @property
    def tagged_texts(self) -> int:
        """How many texts spaCy tagged for this reducer (not found in the cache)."""
        return self._tagger.tagged_texts if self._tagger is not None else 0

    def prepare(self, captions: Sequence[str]) -> None:
        """Split, tag (syntax) and, for deterministic strategies, encode every distinct new caption once."""
        store = self._rows if self.deterministic else self._words
        todo = [c for c in dict.fromkeys(captions) if c not in store]
        if not todo:
            return
        if len(store) + len(todo) > MAX_CACHED_CAPTIONS:  # a streamed dataset: its captions rarely come back
            store.clear()
            todo = list(dict.fromkeys(captions))
        splits = [split_words(c) for c in todo]
        if self._tagger is not None:
            tags: list[tuple[str, ...] | None] = list(self._tagger.tag([(text, starts) for text, starts, _ in splits]))
        else:
            tags = [None] * len(todo)
        for caption, (_, _, words), pos in zip(todo, splits, tags):
            token_ids = tuple(_word_ids(w) for w in words)
            cw = CaptionWords(tuple(words), token_ids, tuple(len(t) for t in token_ids), pos)
            if self.deterministic:
                row = np.zeros(self.text_tokens, dtype=np.int64)
                ids = encode_kept(cw, self._fn(cw, self.text_tokens - 2, None), self.text_tokens)
                row[: len(ids)] = ids
                self._rows[caption] = row
            else:
                self._words[caption] = cw

    def __call__(self, captions: Sequence[str], generator: torch.Generator | None = None, first_row: int = 0
                 ) -> torch.LongTensor:
        """Token rows [len(captions), text_tokens]; random strategies draw from `generator` (reproducible).

        Caption i's words are drawn from its own stream, seeded by the generator's draw and its row `first_row + i`
        of the global batch, so the choice for a sample does not depend on how the batch is split over ranks."""
        if isinstance(captions, str):
            captions = [captions]
        self.prepare(captions)
        if self.deterministic:
            if not captions:
                return torch.zeros(0, self.text_tokens, dtype=torch.long)
            return torch.from_numpy(np.stack([self._rows[c] for c in captions]))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        out = np.zeros((len(captions), self.text_tokens), dtype=np.int64)
        budget = self.text_tokens - 2
        for i, caption in enumerate(captions):
            cw = self._words[caption]
            rng = np.random.default_rng([seed, first_row + i])  # ~8 us
            ids = encode_kept(cw, self._fn(cw, budget, rng), self.text_tokens)
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)


def describe(tokens: torch.Tensor) -> list[str]:
    """The words each row gives the encoder, decoded, without start, end and padding (for `sweep mask-text`)."""
    tok = _tokenizer()
    lines = []
    for row in tokens.tolist():
        end = row.index(EOT_TOKEN) if EOT_TOKEN in row else len(row)
        body = row[1:end] if row and row[0] == SOT_TOKEN else row[:end]
        lines.append(" ".join(tok.decode(body).split()))
    return lines


def mask_text(
    captions: Sequence[str],
    strategy: str,
    text_tokens: int,
    seed: int = 0,
    spacy_model: str = DEFAULT_SPACY_MODEL,
    *,
    context_length: int = FULL_CONTEXT_LENGTH,
    cache_dir: str | Path | None = None,
) -> list[str]:
    """One line per caption: the words the text encoder receives (the body of `sweep mask-text`)."""
    reducer = TextReducer(
        strategy, text_tokens, context_length=context_length, spacy_model=spacy_model, cache_dir=cache_dir
    )
    generator = torch.Generator().manual_seed(seed)
    return describe(reducer(list(captions), generator))
