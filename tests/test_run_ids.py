"""Run ids change only when the science changes: pinned for the shipped grids, blind to operational settings and
to settings added later with a default that reproduces earlier behaviour."""
import json
from pathlib import Path

import pytest
import yaml

from sweep.config import ADDED_SETTINGS, ID_SETTINGS_V1, OPERATIONAL, ConfigError, RunConfig, config_from_dict
from sweep.grid import load_grid, run_id
from sweep.settings import setting
from sweep.train import check_run_dir

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_run_ids.json").read_text())


@pytest.mark.parametrize("grid", sorted(PINNED))
def test_shipped_grids_keep_their_run_ids(grid):
    assert [r.run_id for r in load_grid(grid).runs] == PINNED[grid]


def test_every_scientific_setting_is_part_of_the_identity_rules():
    scientific = set(RunConfig.model_fields) - OPERATIONAL
    assert set(ID_SETTINGS_V1) <= scientific, "a setting of ID_SETTINGS_V1 was removed or made operational"
    later = scientific - set(ID_SETTINGS_V1)
    assert later == set(ADDED_SETTINGS), (
        f"settings added after run ids were introduced need an ADDED_SETTINGS entry (the value that reproduces "
        f"the behaviour from before they existed): {sorted(later ^ set(ADDED_SETTINGS))}")


class WithANewSetting(RunConfig):
    """RunConfig as it will be once a future issue adds a setting with a default that changes nothing."""

    loss_variant: str = setting("clip", "A hypothetical new scientific setting.")


@pytest.mark.parametrize("grid", sorted(PINNED))
def test_adding_a_setting_with_a_neutral_default_changes_no_id(grid):
    for run in load_grid(grid).runs:
        extended = WithANewSetting.from_mapping(run.config.to_dict())
        assert run_id(extended) == run.run_id
        changed = WithANewSetting.from_mapping({**run.config.to_dict(), "loss_variant": "siglip"})
        assert run_id(changed) != run.run_id


def test_operational_settings_change_no_id_but_every_scientific_one_does():
    base = config_from_dict({"model": "cpu-s", "image_strategy": "random", "image_tokens": 17})
    assert run_id(config_from_dict({**base.to_dict(), "threads": 3, "checkpoint_every": 7})) == run_id(base)
    changes = {"lr": 1e-4, "seed": 1, "batch_size": 64, "spacy_model": "other_model", "data_seed": 2,
               "finetune_samples": 256, "beta2": 0.98}
    ids = {run_id(base)}
    for name, value in changes.items():
        cfg = base.model_copy(update={name: value})
        ids.add(run_id(cfg))
    assert len(ids) == len(changes) + 1


def test_an_integer_learning_rate_is_the_same_run_as_its_float():
    assert run_id(config_from_dict({"lr": 1})) == run_id(config_from_dict({"lr": 1.0}))


def test_a_run_directory_written_before_a_setting_existed_still_resumes(tmp_path):
    cfg = config_from_dict({"model": "cpu-s", "pretrain_samples": 256, "batch_size": 64})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))  # has no loss_variant
    check_run_dir(WithANewSetting.from_mapping(cfg.to_dict()), tmp_path)
    with pytest.raises(ConfigError, match="changed: loss_variant"):
        check_run_dir(WithANewSetting.from_mapping({**cfg.to_dict(), "loss_variant": "siglip"}), tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "lr": 0.5, "threads": 9}))
    with pytest.raises(ConfigError, match="changed: lr"):
        check_run_dir(cfg, tmp_path)
