from __future__ import annotations

import pytest

from cryomamba import ConfigError, JobConfig


def test_defaults_are_valid_and_round_trip_through_json():
    cfg = JobConfig(model="demo-membrane", folds=[0, 2], formats=["mrc", "stats"], tile_step=0.25)
    assert cfg.folds == (0, 2) and cfg.formats == ("mrc", "stats")
    again = JobConfig.from_json(cfg.to_json())
    assert again == cfg
    assert JobConfig.from_dict(cfg.to_dict()) == cfg


def test_frozen():
    with pytest.raises(AttributeError):
        JobConfig().tile_step = 0.3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"tile_step": 0}, "tile_step"),
        ({"tile_step": 1.5}, "tile_step"),
        ({"tile_step": "half"}, "tile_step"),
        ({"device": "gpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"tile_batch": 0}, "tile_batch"),
        ({"tile_batch": True}, "tile_batch"),
        ({"tile_batch": "fast"}, "tile_batch"),
        ({"preview_scale": 9}, "preview_scale"),
        ({"preview_interval_s": -1}, "preview_interval_s"),
        ({"formats": ["mrc", "tiff"]}, "tiff"),
        ({"folds": [0, 0]}, "repeat"),
        ({"folds": [-1]}, "folds"),
        ({"model": ""}, "model"),
        ({"checkpoint": "latest.pth"}, "checkpoint"),
        ({"mirroring": "yes"}, "mirroring"),
        ({"compile": 1}, "compile"),
    ],
)
def test_invalid_values_are_refused_with_the_field_named_and_a_hint(changes, phrase):
    with pytest.raises(ConfigError, match=phrase) as info:
        JobConfig(**changes)
    assert info.value.hint, "every refusal says what to do instead"


def test_unknown_keys_and_bad_json_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown config key.*tile_size") as info:
        JobConfig.from_dict({"tile_size": 3})
    assert "tile_step" in info.value.hint
    with pytest.raises(ConfigError, match="not valid JSON"):
        JobConfig.from_json("{model: ")
    with pytest.raises(ConfigError, match="JSON object"):
        JobConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_tile_batch_is_auto_by_default_or_a_number():
    assert JobConfig().tile_batch == "auto"
    assert JobConfig.from_json(JobConfig(tile_batch=4).to_json()).tile_batch == 4
    assert JobConfig.from_dict({"tile_batch": "auto"}).tile_batch == "auto"


def test_tile_batch_on_the_command_line():
    import argparse

    from cryomamba.config import tile_batch_arg

    assert tile_batch_arg("auto") == "auto" and tile_batch_arg("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="'auto' or a number"):
        tile_batch_arg("many")


def test_replace_validates_again():
    assert JobConfig().replace(mirroring=True).mirroring is True
    with pytest.raises(ConfigError):
        JobConfig().replace(tile_step=2)
