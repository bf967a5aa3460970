"""Plugin manager: builtins through the hooks, outside plugins, blocking, broken plugins."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

from cryomamba import hookimpl, hookspecs, plugins


@pytest.fixture
def fresh_plugins():
    plugins.reset()
    yield plugins
    plugins.reset()


def test_builtins_are_registered_through_the_hooks(fresh_plugins):
    pm = fresh_plugins.get_plugin_manager()
    for name in fresh_plugins.DEFAULT_PLUGINS:
        assert pm.has_plugin(name)
    assert {"local"} <= set(fresh_plugins.executors().names())
    assert {"callback", "file"} <= set(fresh_plugins.sinks().names())
    assert "demo-membrane" in fresh_plugins.models()


def test_a_throwaway_plugin_adds_an_executor_a_sink_and_a_model(fresh_plugins, tmp_path):
    from cryomamba.models import ModelSpec

    class Plugin:
        @hookimpl
        def cryomamba_register_executors(self, registry):
            registry.add("null", object)

        @hookimpl
        def cryomamba_register_sinks(self, registry):
            registry.add("null-sink", object)

        @hookimpl
        def cryomamba_register_models(self, registry):
            registry.add("my-model", ModelSpec("my-model", tmp_path))

    pm = fresh_plugins.get_plugin_manager()
    pm.register(Plugin(), name="throwaway")
    fresh_plugins.reset(keep_manager=True)
    try:
        assert "null" in fresh_plugins.executors()
        assert "null-sink" in fresh_plugins.sinks()
        assert fresh_plugins.models().get("my-model").path == tmp_path
    finally:
        pm.unregister(name="throwaway")


def test_registering_a_name_twice_is_an_error(fresh_plugins):
    class Clash:
        @hookimpl
        def cryomamba_register_executors(self, registry):
            registry.add("local", object)

    fresh_plugins.get_plugin_manager().register(Clash(), name="clash")
    fresh_plugins.reset(keep_manager=True)
    with pytest.raises(ValueError, match="registered twice"):
        fresh_plugins.executors()


def test_disabled_plugins_are_skipped(fresh_plugins, monkeypatch):
    monkeypatch.setenv("CRYOMAMBA_DISABLED_PLUGINS", "cryomamba.sinks.builtin")
    assert "file" not in fresh_plugins.sinks()
    assert "local" in fresh_plugins.executors()


def _fake_distribution(root: Path, name: str, entry: str) -> None:
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[cryomamba]\n{name} = {entry}\n")


def test_entry_point_plugins_load_and_broken_ones_warn(fresh_plugins, tmp_path, monkeypatch):
    (tmp_path / "good_cm_plugin.py").write_text(
        "from cryomamba import hookimpl\n"
        "@hookimpl\n"
        "def cryomamba_register_sinks(registry):\n"
        "    registry.add('from-entry-point', dict)\n"
    )
    _fake_distribution(tmp_path, "good_cm_plugin", "good_cm_plugin")
    _fake_distribution(tmp_path, "broken_cm_plugin", "no_such_module_xyz")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="broken_cm_plugin.*skipped"):
        pm = fresh_plugins.get_plugin_manager()
    assert pm.has_plugin("good_cm_plugin")
    assert "from-entry-point" in fresh_plugins.sinks()
    sys.modules.pop("good_cm_plugin", None)


def test_every_hook_is_documented_and_tested():
    hooks = [
        n
        for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if n.startswith("cryomamba_")
    ]
    assert hooks, "no hooks found"
    source = Path(__file__).read_text()
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert len(doc.strip()) > 40, f"{name} needs a docstring saying when/what/returns"
        assert source.count(f"def {name}") >= 1, f"{name} has no test plugin implementing it"
