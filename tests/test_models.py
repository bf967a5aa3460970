"""Model registry: names, folders, $CRYOMAMBA_MODELS_DIR, clear errors for unknown names."""

from __future__ import annotations

import pytest

from cryomamba import ModelError, available_models, plugins, resolve_model
from cryomamba.models import BUNDLED_MODELS_DIR


def test_bundled_demo_model_is_registered_and_complete():
    spec = resolve_model("demo-membrane")
    assert spec.path == BUNDLED_MODELS_DIR / "demo-membrane"
    for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
        assert (spec.path / name).is_file(), name
    assert spec.labels() == {0: "background", 1: "membrane"}
    assert len(spec.checksum()) == 64
    assert "demo-membrane" in [m.name for m in available_models()]


def test_a_folder_path_is_a_model(tiny_model):
    spec = resolve_model(str(tiny_model))
    assert spec.path == tiny_model.resolve() and spec.name == tiny_model.name


def test_models_dir_environment_variable(tiny_model, monkeypatch):
    monkeypatch.setenv("CRYOMAMBA_MODELS_DIR", str(tiny_model.parent))
    plugins.reset()
    try:
        assert resolve_model(tiny_model.name).path == tiny_model
    finally:
        monkeypatch.delenv("CRYOMAMBA_MODELS_DIR")
        plugins.reset()


def test_unknown_model_names_the_choices():
    with pytest.raises(ModelError, match="unknown model 'membranes-v9'") as info:
        resolve_model("membranes-v9")
    assert "demo-membrane" in info.value.hint and "cryomamba models" in info.value.hint


def test_checksum_changes_with_the_weights(tiny_model, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    before = resolve_model(str(copy)).checksum()
    ckpt = copy / "fold_0" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    assert resolve_model(str(copy)).checksum() != before


def test_a_folder_that_is_no_model_says_so_and_points_inside(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError) as info:
        resolve_model(str(empty))
    assert "is not an nnU-Net v2 trained-model folder" in info.value.message
    assert "plans.json or dataset.json" in info.value.message
    assert "fold_N" in info.value.hint and "did you mean" not in info.value.hint
    # the dataset folder above a trained model: point at the model inside it
    with pytest.raises(ModelError) as info:
        resolve_model(str(tiny_model.parent))
    assert f"did you mean {tiny_model}?" in info.value.hint


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_a_models_dir_that_gives_nothing_is_reported(kind, tmp_path, monkeypatch, caplog):
    target = tmp_path / "models"
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
    monkeypatch.setenv("CRYOMAMBA_MODELS_DIR", str(target))
    plugins.reset()
    try:
        with caplog.at_level("WARNING", logger="cryomamba.models"):
            names = [m.name for m in available_models()]
        assert names == ["demo-membrane"]
        phrase = {"missing": "does not exist", "file": "is a file", "empty": "holds no model"}
        assert any(
            f"CRYOMAMBA_MODELS_DIR={target} {phrase[kind]}" in r.message for r in caplog.records
        )
        with pytest.raises(ModelError) as info:
            resolve_model("my-model")
        assert f"CRYOMAMBA_MODELS_DIR={target}" in info.value.message
    finally:
        monkeypatch.delenv("CRYOMAMBA_MODELS_DIR")
        plugins.reset()
