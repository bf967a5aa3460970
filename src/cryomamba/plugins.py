"""The plugin manager: builtins first, then the "cryomamba" entry points, minus blocked names.

Set `CRYOMAMBA_DISABLED_PLUGINS` to a comma-separated list of plugin names to skip them.
A plugin that fails to import warns and is skipped; it never breaks `import cryomamba`.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .registry import Registry

if TYPE_CHECKING:
    from .executors.base import Executor
    from .models import ModelSpec
    from .sinks.base import Sink

__all__ = [
    "DEFAULT_PLUGINS",
    "executors",
    "get_plugin_manager",
    "models",
    "reset",
    "sinks",
]

log = logging.getLogger(__name__)

DEFAULT_PLUGINS: tuple[str, ...] = (
    "cryomamba.executors.local",
    "cryomamba.executors.remote",
    "cryomamba.sinks.builtin",
    "cryomamba.models",
)
ENTRY_POINT_GROUP = "cryomamba"

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registries: dict[str, Registry[Any]] = {}


def _disabled() -> set[str]:
    return {
        n.strip() for n in os.environ.get("CRYOMAMBA_DISABLED_PLUGINS", "").split(",") if n.strip()
    }


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("cryomamba")
            pm.add_hookspecs(hookspecs)
            blocked = _disabled()
            for name in DEFAULT_PLUGINS:
                if name not in blocked:
                    pm.register(importlib.import_module(name), name=name)
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in blocked or pm.has_plugin(ep.name):
                    continue
                try:
                    pm.register(ep.load(), name=ep.name)
                except Exception as exc:  # a broken outside plugin warns and is skipped
                    warnings.warn(
                        f"cryomamba plugin {ep.name!r} ({ep.value}) failed to load and "
                        f"was skipped: {exc}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            pm.check_pending()
            _pm = pm
        return _pm


def _registry(kind: str, hook: str) -> Registry[Any]:
    with _lock:
        if kind not in _registries:
            registry: Registry[Any] = Registry(kind)
            getattr(get_plugin_manager().hook, hook)(registry=registry)
            _registries[kind] = registry
        return _registries[kind]


def executors() -> Registry[Callable[..., Executor]]:
    """Executor factories by name (`local`, `remote`, and any a plugin adds)."""
    return _registry("executor", "cryomamba_register_executors")


def sinks() -> Registry[Callable[..., Sink]]:
    """Sink factories by name (`callback`, `file`, ...)."""
    return _registry("sink", "cryomamba_register_sinks")


def models() -> Registry[ModelSpec]:
    """Model specs by name (the bundled `demo-membrane` among them)."""
    return _registry("model", "cryomamba_register_models")


def reset(*, keep_manager: bool = False) -> None:
    """Forget the registries (and the manager, unless `keep_manager`): for tests and reloads."""
    global _pm
    with _lock:
        if not keep_manager:
            _pm = None
        _registries.clear()
