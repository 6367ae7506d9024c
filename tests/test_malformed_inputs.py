"""Bad input never reaches a traceback: generated malformed grid and run files (binary, truncated, wrong types at
every level) each end `launch`, `plan` and `train` with exit code 2, one line on stderr naming the file, and
nothing written or submitted."""
import copy
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.cli import main
from sweep.config import ConfigError, load_run_config
from sweep.grid import load_grid

SMOKE = Path("grids/smoke.yaml").read_bytes()
EXAMPLE = Path("grids/run-example.yaml").read_bytes()
WRONG_VALUES = [None, True, 1.5, -1, "not-a-value", [], {}, [[1, 2]], {"a": {"b": 1}}, "\u00e9\u4e2d", 10**30]


def byte_level(good: bytes) -> list[tuple[str, bytes]]:
    rng = random.Random(0)
    cases = [("empty", b""), ("blank", b"  \n\n"), ("only-comments", b"# nothing here\n"),
             ("list", b"- a\n- b\n"), ("scalar", b"42\n"), ("null", b"~\n"), ("nul-bytes", b"sweep: a\x00b\n"),
             ("latin-1", "sweep: caf\u00e9\n".encode("latin-1")), ("utf-16", good.decode().encode("utf-16")),
             ("random-binary", bytes(rng.randrange(256) for _ in range(300))), ("gzip-magic", b"\x1f\x8b\x08" + good),
             ("tabs", b"sweep:\n\t- x\n"), ("unclosed", b"axes: [cpu-s\n"), ("non-string-keys", b"1: 2\n? [a]\n: b\n"),
             ("python-tag", b"sweep: !!python/object/apply:os.system ['true']\n"), ("deep", b"[" * 5000)]
    cases += [(f"truncated-{n}", good[:n]) for n in range(0, len(good), max(1, len(good) // 40))]
    return cases


def paths(tree, prefix=()):
    """Every (path, value) of a parsed YAML tree, containers included."""
    yield prefix, tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from paths(value, prefix + (i,))


def with_value(tree, path, value):
    out = copy.deepcopy(tree)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def wrong_types(good: bytes) -> list[tuple[str, bytes]]:
    tree = yaml.safe_load(good)
    cases = []
    for path, value in paths(tree):
        if not path:
            continue
        for wrong in WRONG_VALUES:
            if type(wrong) is type(value) and not isinstance(wrong, (list, dict)):
                continue
            name = "/".join(map(str, path)) + f"={wrong!r}"[:40]
            cases.append((name, yaml.safe_dump(with_value(tree, path, wrong)).encode()))
    return cases


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def check_rejected(tmp_path, capsys, argv: list[str], source: Path) -> None:
    before = files_under(tmp_path)
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(source) in err and "Traceback" not in err
    assert files_under(tmp_path) == before, "a rejected input wrote files"


@pytest.mark.parametrize("kind", ["bytes", "types"])
def test_malformed_grid_files_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, kind):
    cases = byte_level(SMOKE) if kind == "bytes" else wrong_types(SMOKE)
    rejected = 0
    for name, content in cases:
        grid = tmp_path / "grid.yaml"
        grid.write_bytes(content)
        try:
            load_grid(grid)
            continue  # some truncations and some substitutions are still a valid grid (e.g. another sweep name)
        except ConfigError:
            rejected += 1
        results = tmp_path / "results"
        for argv in (["launch", str(grid), "--results", str(results), "--executor", "local"],
                     ["launch", str(grid), "--results", str(results), "--dry-run"],
                     ["plan", str(grid)]):
            check_rejected(tmp_path, capsys, argv, grid)
        assert not results.exists()
    assert rejected >= 0.8 * len(cases), f"only {rejected} of {len(cases)} malformed grids were rejected"


@pytest.mark.parametrize("kind", ["bytes", "types"])
def test_malformed_run_files_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, kind):
    cases = byte_level(EXAMPLE) if kind == "bytes" else wrong_types(EXAMPLE)
    rejected = 0
    for name, content in cases:
        config = tmp_path / "run.yaml"
        config.write_bytes(content)
        try:
            load_run_config(config)
            continue
        except ConfigError:
            rejected += 1
        check_rejected(tmp_path, capsys, ["train", str(config), "--out", str(tmp_path / "run")], config)
    assert rejected >= 0.8 * len(cases), f"only {rejected} of {len(cases)} malformed run files were rejected"


def test_a_directory_or_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    for path in (tmp_path, tmp_path / "missing.yaml"):
        for argv in (["launch", str(path), "--results", str(tmp_path / "r")], ["plan", str(path)],
                     ["train", str(path), "--out", str(tmp_path / "run")]):
            check_rejected(tmp_path, capsys, argv, path)


@pytest.mark.slow
def test_the_installed_command_rejects_a_binary_grid_without_a_traceback(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_bytes(bytes(range(256)) * 4)
    for argv in (["launch", str(grid), "--results", str(tmp_path / "r")], ["plan", str(grid)],
                 ["train", str(grid), "--out", str(tmp_path / "run")]):
        out = subprocess.run([sys.executable, "-m", "sweep", *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
        assert str(grid) in out.stderr and not out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_analyze_on_a_directory_without_results_says_so(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    for manifest in (None, "[1, 2]", '{"runs": {}, "analysis": [1]}', "{"):  # one that is not a sweep's is ignored
        if manifest is not None:
            (tmp_path / "manifest.json").write_text(manifest)
        assert main(["analyze", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no result.json" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] * bool(manifest) + ["notes.txt", "sub"]


def test_analyze_on_result_files_that_are_not_records_says_so(tmp_path, capsys):
    for i, content in enumerate(["[1, 2]", "\x00binary", '{"image_tokens": "many"}', "{"]):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "result.json").write_text(content)
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "none of the 4 result files could be read" in err[-1]
    assert not (tmp_path / "analysis").exists()
