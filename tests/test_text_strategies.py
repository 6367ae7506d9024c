"""Which words each text strategy keeps, and the invariants every encoded row obeys."""

from __future__ import annotations

import atexit
import shutil
import tempfile

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweep.strategies.text import (
    EOT_TOKEN,
    SOT_TOKEN,
    TEXT_STRATEGIES,
    CaptionWords,
    TextReducer,
    allowed_text_tokens,
    basic_clean,
    block,
    check_text_settings,
    describe,
    mask_text,
    random_words,
    split_words,
    _word_ids,
)

CACHE_DIR = tempfile.mkdtemp(prefix="text-strategies-cache-")
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)  # not left in /tmp, a disk CI shares
DOG = "a small red dog runs quickly across the green field"


def masked(caption: str, strategy: str, text_tokens: int, seed: int = 0) -> str:
    return mask_text([caption], strategy, text_tokens, seed=seed, cache_dir=CACHE_DIR)[0]


# --- exact outputs (checked against the parts of speech spaCy gives; see the comments) ----------------------------

@pytest.mark.parametrize(
    "text_tokens, expected",
    [
        (4, "dog field"),  # 2 word tokens: the two nouns
        (6, "small red dog field"),  # then the adjectives, left to right
        (8, "small red dog runs green field"),  # all three adjectives, then the verb
        (16, DOG),  # 10 one-token words fit in 14
    ],
)
def test_syntax_keeps_nouns_then_adjectives_then_verbs(text_tokens: int, expected: str) -> None:
    assert masked(DOG, "syntax", text_tokens) == expected


@pytest.mark.parametrize(
    "caption, by_length",
    [
        # man/horse/beach/sunset NOUN, riding VERB, rest left to right
        ("a man riding a horse on the beach at sunset",
         {4: "man horse", 6: "man horse beach sunset", 8: "a man riding horse beach sunset"}),
        # cats/bench NOUN, black/wooden ADJ, sleeping VERB; "two" (NUM) and "are" (AUX) are the rest
        ("two black cats are sleeping on a wooden bench",
         {4: "cats bench", 6: "black cats wooden bench", 8: "two black cats sleeping wooden bench"}),
        # AUX "is" ranks with the rest, so the earlier "a" wins the last place at 6
        ("a dog is running near a tree",
         {5: "dog running tree", 6: "a dog running tree", 8: "a dog is running near tree"}),
        # punctuation and a contraction: "doesn" takes the POS of spaCy's "does" (AUX), "'t" of "n't" (PART)
        ("The dog doesn't sleep, it runs.",
         {4: "dog sleep", 6: "the dog sleep runs", 8: "the dog doesn 't sleep runs"}),
        # case is kept for tagging: proper nouns rank with nouns
        ("Anna walks her grey dog in Central Park",
         {6: "anna dog central park"}),
    ],
)
def test_syntax_examples(caption: str, by_length: dict[int, str]) -> None:
    for text_tokens, expected in by_length.items():
        assert masked(caption, "syntax", text_tokens) == expected, text_tokens


def test_syntax_skips_a_word_that_does_not_fit_and_fills_with_shorter_ones() -> None:
    # "quokka" is 3 BPE tokens: at 2 word tokens it cannot fit, the next nouns do; at 4 it fits with one more.
    assert len(_word_ids("quokka")) == 3
    caption = "a quokka and a red kangaroo eat fresh grass"
    assert masked(caption, "syntax", 4) == "kangaroo grass"
    assert masked(caption, "syntax", 6) == "quokka kangaroo"


@pytest.mark.parametrize(
    "text_tokens, expected",
    [(4, "a small"), (6, "a small red dog"), (8, "a small red dog runs quickly"), (16, DOG)],
)
def test_truncation_keeps_the_first_words(text_tokens: int, expected: str) -> None:
    assert masked(DOG, "truncation", text_tokens) == expected


def test_truncation_keeps_the_first_tokens_as_open_clip_cuts_a_caption() -> None:
    import open_clip

    caption = "a quokka and a red kangaroo"  # "quokka" is 3 BPE tokens: qu ok ka
    assert masked(caption, "truncation", 4) == "a qu"  # half a word, as CLIPA's truncation
    assert masked(caption, "truncation", 6) == "a quokka"
    for text_tokens in (4, 5, 6, 8):
        row = TextReducer("truncation", text_tokens, cache_dir=CACHE_DIR)([caption])[0]
        assert row.tolist() == open_clip.tokenize([caption], context_length=text_tokens)[0].tolist()


@pytest.mark.parametrize("text_tokens", [4, 6, 8])
def test_random_and_block_keep_as_many_words_as_fit(text_tokens: int) -> None:
    words = DOG.split()
    for seed in range(5):
        kept = masked(DOG, "random", text_tokens, seed).split()
        assert len(kept) == text_tokens - 2
        assert is_subsequence(kept, words)
        span = masked(DOG, "block", text_tokens, seed)
        assert len(span.split()) == text_tokens - 2
        assert f" {span} " in f" {DOG} "


def test_block_start_is_uniform_over_full_spans() -> None:
    caption = CaptionWords(tuple("abcdef"), tuple((i,) for i in range(6)), (1,) * 6)
    rng = __import__("numpy").random.default_rng(0)
    starts = {block(caption, 4, rng)[0] for _ in range(200)}
    assert starts == {0, 1, 2}  # a span of 4 starting at 3..5 would be cut short by the caption's end


def test_none_is_open_clip_tokenization() -> None:
    captions = [
        DOG,
        "A Large RED circle sits above a small blue square, and a tiny green triangle rests beside them; "
        "a purple hexagon floats far away near the axolotl's tank!!",
        "",
        "don't &amp; caf\u00e9   spaces",
    ]
    reducer = TextReducer("none", 32, cache_dir=CACHE_DIR)
    assert torch.equal(reducer(captions), open_clip.tokenize(captions, context_length=32))


# pieces of text that ftfy or html.unescape change, and plain ones around them
PIECES = ["a", "dog", "X", " ", "  ", ".", "'", '"', "<b>", "&", "&amp;", "&lt;", "&#39;", "&amp;amp;", "\t", "\n",
          "\r\n", "\x0c", "\x1b[31m", "\x7f", "\xa0", "\u00e9", "\u00c3\u00a9", "\u2019", "\u201c", "\ufb01",
          "\uff21", "e\u0301", "\u2028"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12).map("".join) | st.text(max_size=30))
def test_caption_cleaning_is_open_clip_basic_clean_for_every_text(text: str) -> None:
    """The printable-ASCII fast path (no ftfy) changes nothing: HTML entities, control characters, line breaks,
    mojibake, ligatures and wide letters still go through ftfy as in open_clip."""
    assert basic_clean(text) == open_clip.tokenizer.basic_clean(text)


def test_literal_special_tokens_in_a_caption_are_plain_text() -> None:
    ids = TextReducer("none", 32, cache_dir=CACHE_DIR)(["a dog <end_of_text> <START_OF_TEXT> cat"])[0].tolist()
    assert ids.count(EOT_TOKEN) == 1 and ids.count(SOT_TOKEN) == 1


def test_random_choices_follow_the_generator() -> None:
    reducer = TextReducer("random", 6, cache_dir=CACHE_DIR)
    batch = [DOG] * 16
    a = reducer(batch, torch.Generator().manual_seed(1))
    b = reducer(batch, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({tuple(row) for row in a.tolist()}) > 1  # differs per sample
    generator = torch.Generator().manual_seed(1)
    first, second = reducer(batch, generator), reducer(batch, generator)
    assert not torch.equal(first, second)  # and per call


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_a_batch_split_over_ranks_gets_the_words_of_the_whole_batch(strategy: str) -> None:
    reducer = TextReducer(strategy, 6, cache_dir=CACHE_DIR)
    batch = [DOG, "a blue cat sleeps on the warm red sofa in the sun"] * 6
    whole = reducer(batch, torch.Generator().manual_seed(3))
    parts = [reducer(batch[i:i + 4], torch.Generator().manual_seed(3), first_row=i) for i in range(0, 12, 4)]
    assert torch.equal(torch.cat(parts), whole)


def test_allowed_text_tokens_and_settings() -> None:
    assert allowed_text_tokens("none", 32) == [32]
    assert allowed_text_tokens("syntax", 32) == list(range(3, 33))
    with pytest.raises(ValueError, match="unknown text_strategy 'nope'"):
        allowed_text_tokens("nope", 32)
    with pytest.raises(ValueError, match="text_tokens 16 is not allowed for text_strategy 'none'"):
        TextReducer("none", 16)
    with pytest.raises(ValueError, match=r"allowed: 3\.\.32"):
        check_text_settings("block", 2)


def test_describe_drops_start_end_and_padding() -> None:
    tokens = TextReducer("truncation", 8, cache_dir=CACHE_DIR)([DOG, ""])
    assert describe(tokens) == ["a small red dog runs quickly", ""]


def test_warm_syntax_is_fast() -> None:
    import time

    captions = [f"{DOG} number {i}" for i in range(2000)]
    reducer = TextReducer("syntax", 8, cache_dir=CACHE_DIR)
    reducer.prepare(captions)
    start = time.perf_counter()
    for i in range(0, len(captions), 250):
        reducer(captions[i : i + 250])
    assert len(captions) / (time.perf_counter() - start) > 20_000


# --- invariants for any caption, strategy and allowed length ----------------------------------------------------

WORDS = ["a", "small", "red", "dog", "runs", "quokka", "axolotl", "is", "don't", "Central", "Park", ",", "!!", "42"]
captions_st = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(WORDS), max_size=40).map(" ".join),
)
REDUCERS: dict[tuple[str, int], TextReducer] = {}


def reducer_for(strategy: str, text_tokens: int) -> TextReducer:
    key = (strategy, text_tokens)
    if key not in REDUCERS:
        REDUCERS[key] = TextReducer(strategy, text_tokens, cache_dir=CACHE_DIR)
    return REDUCERS[key]


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def segments_as_words(body: list[int], word_ids: list[tuple[int, ...]]) -> bool:
    """Is `body` the concatenation of a subsequence of the words' token lists (whole words, in order)?"""
    reachable = {(0, 0)}  # (next word index, position in body)
    for w, ids in enumerate(word_ids):
        for nxt, pos in list(reachable):
            if nxt == w and body[pos : pos + len(ids)] == list(ids):
                reachable.add((w + 1, pos + len(ids)))
            if nxt == w:
                reachable.add((w + 1, pos))
    return (len(word_ids), len(body)) in reachable


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    caption=captions_st,
    strategy=st.sampled_from(sorted(TEXT_STRATEGIES)),
    text_tokens=st.integers(3, 32),
    seed=st.integers(0, 2**31),
)
def test_rows_are_well_formed(caption: str, strategy: str, text_tokens: int, seed: int) -> None:
    if strategy == "none":
        text_tokens = 32
    assert text_tokens in allowed_text_tokens(strategy, 32)
    reducer = reducer_for(strategy, text_tokens)
    row = reducer([caption], torch.Generator().manual_seed(seed))
    assert row.shape == (1, text_tokens) and row.dtype == torch.long
    ids = row[0].tolist()
    assert ids[0] == SOT_TOKEN
    assert ids.count(EOT_TOKEN) == 1 and ids.count(SOT_TOKEN) == 1
    end = ids.index(EOT_TOKEN)
    assert all(t == 0 for t in ids[end + 1 :])  # the end token is the last non-pad token
    body = ids[1:end]
    assert len(body) <= text_tokens - 2
    word_ids = [_word_ids(w) for w in split_words(caption)[2]]
    if strategy in ("none", "truncation"):  # the first tokens
        flat = [t for ids_ in word_ids for t in ids_]
        assert body == flat[: text_tokens - 2]
    else:
        assert segments_as_words(body, word_ids)  # whole words, a subsequence, original order
    again = reducer([caption], torch.Generator().manual_seed(seed))
    assert torch.equal(row, again)  # deterministic given the seed


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 4), max_size=30), budget=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_strategies_respect_the_budget(lengths: list[int], budget: int, seed: int) -> None:
    import numpy as np

    caption = CaptionWords(
        tuple(f"w{i}" for i in range(len(lengths))),
        tuple(tuple(range(n)) for n in lengths),
        tuple(lengths),
        tuple(["NOUN", "ADJ", "VERB", "DET"][i % 4] for i in range(len(lengths))),
    )
    for name, fn in TEXT_STRATEGIES.items():
        if name in ("none", "truncation"):  # every word: the encoder cuts them at the budget
            continue
        kept = list(fn(caption, budget, np.random.default_rng(seed)))
        assert kept == sorted(set(kept))
        assert sum(lengths[i] for i in kept) <= budget
        if name in ("random", "syntax"):  # greedy first fit: no word left out could still fit
            room = budget - sum(lengths[i] for i in kept)
            assert all(lengths[i] > room for i in range(len(lengths)) if i not in kept)
    if sum(lengths) <= budget:
        assert list(random_words(caption, budget, np.random.default_rng(seed))) == list(range(len(lengths)))
