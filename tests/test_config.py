"""Bad settings fail at load time with one line naming the file and the field; good ones resolve fully."""
import pytest

from sweep.cli import main
from sweep.config import ConfigError, RunConfig, config_from_dict, field_docs, load_run_config, parse_overrides


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text, *overrides):
    with pytest.raises(ConfigError) as info:
        load_run_config(write(tmp_path, text), list(overrides))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "run.yaml") in message
    return info.value


def test_run_example_loads_and_resolves():
    cfg = load_run_config("grids/run-example.yaml")
    assert (cfg.model, cfg.image_strategy, cfg.image_tokens, cfg.text_tokens) == ("cpu-s", "random", 17, 32)


def test_full_length_defaults_are_filled_from_the_model():
    cfg = config_from_dict({"model": "cpu-m"})
    assert (cfg.image_tokens, cfg.text_tokens) == (65, 32)
    cfg = config_from_dict({"model": "ViT-B-16"})
    assert (cfg.image_tokens, cfg.text_tokens) == (197, 32)


@pytest.mark.parametrize("text,field,needle", [
    ("model: cpu-xl\n", "model", "cpu-s"),
    ("image_strategy: patchy\n", "image_strategy", "random"),
    ("image_strategy: grid\nimage_tokens: 20\n", "image_tokens", "2, 5, 10, 17, 26, 37, 50, 65"),
    ("image_strategy: block\nimage_tokens: 66\n", "image_tokens", "allowed"),
    ("image_strategy: random\nimage_tokens: 1\n", "image_tokens", "2..65"),
    ("image_strategy: none\nimage_tokens: 17\n", "image_tokens", "65"),
    ("text_strategy: truncation\ntext_tokens: 40\n", "text_tokens", "allowed"),
    ("text_strategy: shuffle\n", "text_strategy", "syntax"),
    ("batch_size: 12.5\n", "batch_size", "integer"),
    ("batch_size: true\n", "batch_size", "integer"),
    ("lr: fast\n", "lr", "number"),
    ("lr: -1\n", "lr", "positive"),
    ("pretrain_samples: 10\n", "pretrain_samples", "less than one batch"),
    ("train_scenes: 100\n", "train_scenes", "less than one batch (128)"),
    ("beta2: 1.5\n", "beta2", "[0, 1)"),
    ("learning_rate: 0.1\n", "learning_rate", "unknown setting"),
    ("dataset: laion\n", "dataset", "synthetic"),
    ("seed: -3\n", "seed", ">= 0"),
    ("- model\n", "top level", "mapping"),
    ("model: [cpu-s\n", "line", "YAML"),
])
def test_bad_settings_name_the_field(tmp_path, text, field, needle):
    err = error_of(tmp_path, text)
    assert err.field.startswith(field), err
    assert needle in str(err)


def test_exponents_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a researcher means the number
    assert load_run_config(write(tmp_path, "lr: 1e-3\n"), ["finetune_lr=5e-4"]).lr == 0.001


def test_overrides_are_checked_like_file_values(tmp_path):
    assert load_run_config(write(tmp_path, "model: cpu-s\n"), ["image_strategy=resize", "image_tokens=17"]
                           ).image_tokens == 17
    err = error_of(tmp_path, "model: cpu-s\n", "image_strategy=grid", "image_tokens=18")
    assert err.field == "image_tokens" and str(err.source).endswith("(--set)")  # the file holds no such value
    err = error_of(tmp_path, "model: cpu-s\nimage_tokens: 18\n", "image_strategy=grid")
    assert err.field == "image_tokens" and str(err.source).endswith(".yaml")  # the file's value is the wrong one
    err = error_of(tmp_path, "model: cpu-s\n", "nonsense")
    assert err.field == "--set"


@pytest.mark.parametrize("separator", [",", "|", "\t", ";", "#", " "])
def test_an_override_is_taken_as_written_where_yaml_would_read_it_otherwise(separator):
    # YAML refuses `,` and a tab, reads `|` as a block scalar and `#` as a comment: a separator is meant as text
    assert parse_overrides([f"csv_separator={separator}"]) == {"csv_separator": separator}
    assert parse_overrides(["lr=0.5", "eval_embedded=false", "image_tokens=", "model=cpu-m"]) == {
        "lr": 0.5, "eval_embedded": False, "image_tokens": None, "model": "cpu-m"}


def test_missing_spacy_model_fails_at_load_time(tmp_path):
    err = error_of(tmp_path, "text_strategy: syntax\ntext_tokens: 8\nspacy_model: no_such_pipeline_xyz\n")
    assert err.field == "spacy_model" and "pip install" in str(err)


def test_every_setting_is_documented():
    docs = field_docs()
    assert set(docs) == set(RunConfig.model_fields)
    assert all(len(d) > 10 for d in docs.values())


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path, "model: cpu-s\nimage_strategy: grid\nimage_tokens: 20\n")
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image_tokens" in err and str(path) in err
    assert not out.exists()


def test_cli_missing_file_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_mask_image_writes_a_png_and_rejects_impossible_counts(tmp_path, capsys):
    from PIL import Image

    for strategy in ["random", "grid", "block", "resize"]:
        out = tmp_path / f"{strategy}.png"
        assert main(["mask-image", "--strategy", strategy, "--tokens", "17", "--out", str(out),
                     "--samples", "3"]) == 0
        assert Image.open(out).size[0] > 3 * 64
    assert main(["mask-image", "--strategy", "grid", "--tokens", "18", "--out", str(tmp_path / "x.png")]) == 2
    assert "17, 26" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra,needle", [(["--seed", "-1"], "seed"), (["--out", "{tmp}"], "--out"),
                                          (["--out", "{tmp}/x.txt"], "--out")])
def test_mask_image_refuses_a_negative_seed_or_an_output_that_is_no_png(tmp_path, capsys, extra, needle):
    args = ["mask-image", "--strategy", "random", "--tokens", "17", "--out", str(tmp_path / "x.png")]
    assert main(args + [e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_cache_directory_under_a_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    assert main(["mask-text", "--strategy", "syntax", "--tokens", "4", "a red dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SWEEP_CACHE_DIR" in err and "a_file is a file" in err


def test_make_data_refuses_an_image_size_it_could_not_hold_and_writes_nothing(tmp_path, capsys):
    assert main(["make-data", str(tmp_path / "data"), "--image-size", "100000"]) == 2
    assert "--image-size" in capsys.readouterr().err and not (tmp_path / "data").exists()
