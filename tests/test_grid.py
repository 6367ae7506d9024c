"""Grid files expand into the runs they stand for, with stable ids, and every mistake is one clear line."""
import pytest

from sweep.cli import main
from sweep.config import ConfigError
from sweep.grid import expand, load_grid, run_id

BASE = {"sweep": "t", "settings": {"model": "cpu-s", "pretrain_samples": 1024}}


def ids(raw):
    return [r.run_id for r in expand(raw, "g.yaml")[1]]


def test_axes_expand_as_a_product_plus_one_baseline_per_model():
    raw = {**BASE, "axes": {"model": ["cpu-s", "cpu-m"], "seed": [0, 1],
                            "image": [{"image_strategy": ["random", "block"], "image_tokens": [17, 37]}]}}
    _, runs = expand(raw, "g.yaml")
    reduced = [r for r in runs if not r.baseline]
    baselines = [r for r in runs if r.baseline]
    assert len(reduced) == 2 * 2 * 2 * 2
    assert len(baselines) == 2 * 2  # one per model and seed
    assert {(r.config.image_strategy, r.config.image_tokens) for r in baselines} == {("none", 65)}


def test_paired_axis_gives_each_strategy_its_own_lengths():
    raw = {**BASE, "axes": {"image": [{"image_strategy": ["random", "grid"], "image_tokens": [17, 26]},
                                      {"image_strategy": "resize", "image_tokens": 50}]}}
    cells = {(r.config.image_strategy, r.config.image_tokens) for r in expand(raw, "g.yaml")[1]}
    assert cells == {("random", 17), ("random", 26), ("grid", 17), ("grid", 26), ("resize", 50), ("none", 65)}


def test_include_and_exclude():
    raw = {**BASE, "axes": {"image_strategy": ["random"], "image_tokens": [17, 26, 37]},
           "exclude": [{"image_tokens": 26}], "include": [{"image_strategy": "block", "image_tokens": 5}],
           "baselines": False}
    cells = {(r.config.image_strategy, r.config.image_tokens) for r in expand(raw, "g.yaml")[1]}
    assert cells == {("random", 17), ("random", 37), ("block", 5)}


@pytest.mark.parametrize("entry", [
    {"image_tokens": [26, 99]},                        # a list matches any of its values
    {"lr": "1e-3", "image_tokens": 26},                # YAML's 1e-3 is the settings' 1.0e-3
    {"weight_decay": 0.2, "image_tokens": 26.0},       # an unset setting is its default (0.2), 26.0 is 26
])
def test_exclude_matches_values_as_the_run_reads_them(entry):
    raw = {**BASE, "settings": {**BASE["settings"], "lr": 1.0e-3},
           "axes": {"image_strategy": ["random"], "image_tokens": [17, 26]}, "exclude": [entry], "baselines": False}
    assert {r.config.image_tokens for r in expand(raw, "g.yaml")[1]} == {17}


def test_exclude_of_an_empty_token_count_is_the_full_length():
    raw = {**BASE, "axes": {"image_tokens": [None, 65 - 16 + 1]}, "settings": {**BASE["settings"],
           "image_strategy": "random"}, "exclude": [{"image_tokens": 65}], "baselines": False}
    assert [r.config.image_tokens for r in expand(raw, "g.yaml")[1]] == [50]


def test_an_exclude_entry_matching_nothing_is_a_mistake():
    raw = {**BASE, "axes": {"seed": [0, 1, 2]}, "exclude": [{"seed": 1}, {"seed": 7}], "baselines": False}
    with pytest.raises(ConfigError, match=r"exclude\[1\]: matches no cell"):
        expand(raw, "g.yaml")
    raw["exclude"][1] = {"seed": 1, "model": "cpu-s"}  # within the first entry: overlapping, not a mistake
    assert [r.config.seed for r in expand(raw, "g.yaml")[1]] == [0, 2]


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("sweep: s\nsettings:\n  lr: 0.1\n  lr: 0.2\naxes:\n  seed: [0]\n")
    with pytest.raises(ConfigError, match="line 4.*'lr' is given twice"):
        load_grid(grid)
    grid.write_text("base: &b {lr: 0.1}\nsweep: s\nsettings:\n  <<: *b\n  lr: 0.2\naxes:\n  seed: [0]\n")
    with pytest.raises(ConfigError, match="base: unknown key"):  # an override of a merged key is no repeat
        load_grid(grid)


def test_a_baseline_already_in_the_grid_is_not_added_twice():
    raw = {**BASE, "axes": {"image": [{"image_strategy": "none"}, {"image_strategy": "random", "image_tokens": 17}]}}
    assert len(ids(raw)) == 2


def test_run_ids_are_stable_readable_and_change_with_any_setting():
    raw = {**BASE, "axes": {"image_strategy": ["random"], "image_tokens": [17]}, "baselines": False}
    first = ids(raw)
    assert first == ids(raw)
    assert first[0].startswith("cpu-s_random17_none32_s0_")
    changed = {**raw, "settings": {**BASE["settings"], "lr": 1e-4}}
    assert ids(changed) != first
    operational = {**raw, "settings": {**BASE["settings"], "threads": 1, "checkpoint_every": 3}}
    assert ids(operational) == first  # how a run is executed does not make it another run


@pytest.mark.parametrize("raw,field", [
    ({"axes": {"seed": [0]}}, "sweep"),
    ({**BASE, "sweep": "has space", "axes": {"seed": [0]}}, "sweep"),
    ({**BASE}, "axes"),
    ({**BASE, "axes": {"seed": []}}, "axes.seed"),
    ({**BASE, "axes": {"model": ["cpu-s", "cpu-xxl"]}}, "model"),
    ({**BASE, "axes": {"image_strategy": ["warp"]}}, "image_strategy"),
    ({**BASE, "axes": {"image_strategy": ["grid"], "image_tokens": [20]}}, "image_tokens"),
    ({**BASE, "axes": {"image_strategy": ["random"], "image_tokens": [100]}}, "image_tokens"),
    ({**BASE, "axes": {"text_strategy": ["syntax"], "text_tokens": [64]}}, "text_tokens"),
    ({**BASE, "axes": {"lr": ["fast"]}}, "lr"),
    ({**BASE, "axes": {"batch_size": [1.5]}}, "batch_size"),
    ({**BASE, "axes": {"learning_rate": [0.1]}}, "axes.learning_rate"),
    ({**BASE, "axes": {"image": ["random"]}}, "axes.image[0]"),
    ({**BASE, "axes": {"image": [{"image_strategy": "random", "tokens": 17}]}}, "axes.image[0].tokens"),
    ({**BASE, "axes": {"seed": [0, 0]}}, "axes"),
    ({**BASE, "axes": {"seed": [0]}, "settings": {"bogus": 1}}, "settings.bogus"),
    ({**BASE, "axes": {"seed": [0]}, "settings": {"lr": [1, 2]}}, "settings.lr"),
    ({**BASE, "axes": {"seed": [0]}, "extra": 1}, "extra"),
    ({**BASE, "axes": {"seed": [0]}, "exclude": [{"seed": 0}]}, "exclude"),
    ({**BASE, "axes": {"seed": [0]}, "include": ["x"]}, "include"),
    ({**BASE, "axes": {"seed": [0]}, "include": [{"seed": 1}, {"seed": 0}]}, "include[1]"),
    ({**BASE, "axes": {"seed": [0]}, "baselines": "yes"}, "baselines"),
    ({**BASE, "axes": {"seed": [[0, 1]]}}, "axes.seed"),
])
def test_malformed_grids_name_the_field(raw, field):
    with pytest.raises(ConfigError) as info:
        expand(raw, "g.yaml")
    assert info.value.field.startswith(field), str(info.value)
    assert str(info.value).startswith("g.yaml: ") and "\n" not in str(info.value)



@pytest.mark.parametrize("raw,field,name", [
    ({**BASE, "axes": {"image_tokenz": [17]}}, "axes.image_tokenz", "image_tokens"),
    ({**BASE, "axes": {"seed": [0]}, "settings": {"pretrain_sample": 64}}, "settings.pretrain_sample",
     "pretrain_samples"),
])
def test_a_misspelt_setting_is_named_with_its_nearest_setting(raw, field, name):
    with pytest.raises(ConfigError) as info:
        expand(raw, "g.yaml")
    assert info.value.field == field and f"did you mean {name}" in str(info.value), str(info.value)

BAD_FILES = {
    "unknown_strategy.yaml": "sweep: s\naxes:\n  image_strategy: [zoom]\n",
    "wrong_type.yaml": "sweep: s\nsettings:\n  batch_size: many\naxes:\n  seed: [0]\n",
    "bad_yaml.yaml": "sweep: s\naxes: [\n",
    "object.yaml": "sweep: !!python/object/apply:os.system ['echo hacked']\naxes:\n  seed: [0]\n",
    "slurm_option.yaml": "sweep: s\naxes:\n  seed: [0]\nslurm:\n  gpu_count: 2\n",
    "slurm_type.yaml": "sweep: s\naxes:\n  seed: [0]\nslurm:\n  cpus: lots\n",
    "duplicate.yaml": "sweep: s\naxes:\n  seed: [0]\ninclude:\n  - {seed: 0}\n",
    "above_full.yaml": "sweep: s\naxes:\n  image_strategy: [random]\n  image_tokens: [80]\n",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_launch_of_a_malformed_grid_exits_2_and_creates_nothing(tmp_path, capsys, name):
    grid = tmp_path / name
    grid.write_text(BAD_FILES[name])
    results = tmp_path / "results"
    assert main(["launch", str(grid), "--results", str(results), "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(grid) in err, err
    assert "hacked" not in err
    assert not results.exists()


def test_shipped_grids_load():
    for name, expected in [("grids/smoke.yaml", 5), ("grids/image_strategies.yaml", 3 * 4 * 3 + 3),
                           ("grids/text_strategies.yaml", 3 * 4 * 4 + 3), ("grids/seed_noise.yaml", 2 * 5)]:
        grid = load_grid(name)
        assert len(grid.runs) == expected, name
    noise, study = load_grid("grids/seed_noise.yaml"), load_grid("grids/image_strategies.yaml")
    assert {r.run_id for r in noise.runs if r.config.seed == 0} <= {r.run_id for r in study.runs}  # same settings
    grid = load_grid("grids/image_strategies.yaml")
    assert {r.config.model for r in grid.runs} == {"cpu-s", "cpu-m", "cpu-l"}
    assert {r.config.image_tokens for r in grid.runs} == {65, 37, 17, 5}
    for name in ("grids/image_strategies.yaml", "grids/text_strategies.yaml"):  # the paper's protocol
        grid = load_grid(name)
        assert all(r.config.finetune_samples > 0 for r in grid.runs), name
        assert grid.analysis.stage == "finetune", name


@pytest.mark.parametrize("flags,field", [(["--sbatch", "constraint"], "--sbatch"), (["--nodes", "0"], "--nodes"),
                                         (["--mem-gb", "lots"], "--mem-gb")])
def test_a_bad_resource_flag_is_named_as_given(capsys, flags, field):
    assert main(["plan", "grids/smoke.yaml", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"sweep plan: error: command line: {field}: ")


def test_the_planned_time_is_never_shorter_than_the_longest_run_nor_split_among_absent_runs():
    from sweep.plan import format_plan

    row = {"model": "cpu-s", "image_strategy": "none", "text_strategy": "none", "image_tokens": [65],
           "text_tokens": [32], "flops": 1e12, "gpu_hours": 0.0}
    one = format_plan([{**row, "runs": 1, "seconds": 60.0, "longest": 60.0}], parallel=8)
    assert one.splitlines()[-1].endswith("about 60 s with 1 in parallel")
    three = format_plan([{**row, "runs": 3, "seconds": 80.0, "longest": 60.0}], parallel=2)
    assert three.splitlines()[-1].endswith("about 60 s with 2 in parallel")  # not 40 s: one run alone takes 60


def test_a_run_of_several_processes_on_the_cpu_shares_its_steps_among_them():
    from sweep.config import config_from_dict
    from sweep.plan import RUN_OVERHEAD_S, estimate

    cfg = config_from_dict({"model": "cpu-s", "pretrain_samples": 1024})
    (alone,), (pair,) = estimate([cfg], 1, 100.0, 1), estimate([cfg], 1, 100.0, 2)  # the same timed step, cached
    assert pair["seconds"] - RUN_OVERHEAD_S == pytest.approx((alone["seconds"] - RUN_OVERHEAD_S) / 2)


def test_plan_prints_groups_with_flops_and_time(capsys):
    assert main(["plan", "grids/smoke.yaml"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP" in out and "total: 5 runs" in out
    for strategy in ["random", "grid", "block", "resize", "none"]:
        assert strategy in out


def test_run_id_depends_on_every_scientific_setting():
    from sweep.config import config_from_dict

    base = config_from_dict({"model": "cpu-s"})
    assert run_id(base) != run_id(config_from_dict({"model": "cpu-s", "weight_decay": 0.1}))
    assert run_id(base) != run_id(config_from_dict({"model": "cpu-s", "data_seed": 1}))


@pytest.mark.parametrize("name", ["smoke", "image_strategies", "text_strategies", "seed_noise", "run-example"])
def test_a_recipe_header_states_the_flops_that_plan_computes(name):
    import re

    from sweep.config import load_run_config
    from sweep.plan import run_flops

    path = f"grids/{name}.yaml"
    header = "".join(line for line in open(path) if line.startswith("#"))
    stated = re.search(r"Cost:.*?([\d.]+) ([GTP])FLOP", header, re.S)
    assert stated, f"{path} states no FLOPs in its Cost line"
    stated_flops = float(stated.group(1)) * {"G": 1e9, "T": 1e12, "P": 1e15}[stated.group(2)]
    try:
        configs = [r.config for r in load_grid(path).runs]
    except ConfigError:  # a single-run recipe for `sweep train`
        configs = [load_run_config(path)]
    planned = sum(run_flops(cfg) for cfg in configs)
    assert stated_flops == pytest.approx(planned, rel=0.02), (path, planned)
