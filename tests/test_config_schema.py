"""JobConfig's JSON Schema is generated from JobConfig, and agrees with its validation."""

from __future__ import annotations

import dataclasses

import pytest

from cryomamba.config import JobConfig
from cryomamba.config_schema import job_config_schema
from cryomamba.errors import ConfigError

SCHEMA = job_config_schema()["properties"]


def test_every_field_and_its_default_and_nothing_else():
    assert list(SCHEMA) == [f.name for f in dataclasses.fields(JobConfig)]
    defaults = JobConfig().to_dict()
    assert {k: v["default"] for k, v in SCHEMA.items()} == defaults


@pytest.mark.parametrize("name", [n for n, s in SCHEMA.items() if "minimum" in s or "maximum" in s])
def test_numeric_limits_are_the_validations(name):
    schema = SCHEMA[name]
    step = 1 if schema["type"] == "integer" else 1e-6
    for bound, outside in (("minimum", -step), ("maximum", step)):
        if bound in schema:
            JobConfig(**{name: schema[bound]})  # the limit itself is accepted
            with pytest.raises(ConfigError):
                JobConfig(**{name: schema[bound] + outside})


@pytest.mark.parametrize("name", [n for n, s in SCHEMA.items() if "enum" in s])
def test_enums_are_exactly_what_validation_accepts(name):
    for value in SCHEMA[name]["enum"]:
        JobConfig(**{name: value})
    with pytest.raises(ConfigError):
        JobConfig(**{name: "not-one-of-them"})


def test_list_items_follow_their_rules():
    formats = SCHEMA["formats"]["items"]["enum"]
    assert JobConfig(formats=formats).formats == tuple(formats)
    with pytest.raises(ConfigError):
        JobConfig(formats=["mrc", "tiff"])
    folds = SCHEMA["folds"]["items"]
    JobConfig(folds=[folds["minimum"], folds["maximum"]])
    with pytest.raises(ConfigError):
        JobConfig(folds=[folds["maximum"] + 1])
    with pytest.raises(ConfigError):
        JobConfig(folds=[0, 0])  # uniqueItems


def test_device_pattern_matches_validation():
    import re

    pattern = SCHEMA["device"]["pattern"]
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "gpu", "cuda:", "cuda:x", "CPU"):
        valid = re.search(pattern, device) is not None
        if valid:
            JobConfig(device=device)
        else:
            with pytest.raises(ConfigError):
                JobConfig(device=device)


def test_a_server_narrows_models_and_devices():
    schema = job_config_schema(models=["tiny"], devices=["cuda:0"])["properties"]
    assert schema["model"]["enum"] == ["tiny"] and "default" not in schema["model"]
    assert schema["device"]["enum"] == ["auto", "cuda:0"] and schema["device"]["default"] == "auto"


def test_a_field_without_a_rule_is_an_error(monkeypatch):
    from cryomamba import config_schema

    real = config_schema._rules
    monkeypatch.setattr(
        config_schema, "_rules", lambda m, d: {k: v for k, v in real(m, d).items() if k != "fp16"}
    )
    with pytest.raises(KeyError, match="fp16"):
        job_config_schema()
