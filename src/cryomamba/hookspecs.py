"""The hooks a CryoMamba plugin can implement (pluggy project name "cryomamba").

Each registration hook receives a registry and calls `registry.add(name, obj)`; every
implementation is called (no first-result short cut), builtins included, so builtins and
outside plugins take exactly the same path (STYLE §2–3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from .executors.base import Executor
    from .models import ModelSpec
    from .registry import Registry
    from .sinks.base import Sink

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("cryomamba")
hookimpl = pluggy.HookimplMarker("cryomamba")


# -- registration: called once, when the plugin manager is first built ----------------------
@hookspec
def cryomamba_register_executors(registry: Registry[Callable[..., Executor]]) -> None:
    """Add executor factories: `registry.add("name", factory)`.

    A factory is called with keyword options (e.g. `server=`, `token=` for `remote`) and
    returns an object with `submit(source, config, sinks, *, job=None) -> Job` and `close()`
    (`cryomamba.executors.base.Executor`).
    Called for every plugin; the return value is ignored.
    """


@hookspec
def cryomamba_register_sinks(registry: Registry[Callable[..., Sink]]) -> None:
    """Add sink factories: `registry.add("name", factory)`.

    A factory returns an object with `handle(event) -> None`, called from a thread of its
    own for each event it has not missed. Called for every plugin; return value ignored.
    """


@hookspec
def cryomamba_register_models(registry: Registry[ModelSpec]) -> None:
    """Add trained models: `registry.add("name", ModelSpec(...))`.

    A `ModelSpec` names an nnU-Net v2 trained-model folder. Called for every plugin;
    return value ignored. A later registration of the same name is an error.
    """
