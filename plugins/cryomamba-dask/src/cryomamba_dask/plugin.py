"""The `cryomamba` entry point: registers the executor `dask` when `distributed` is installed.

Loading this module imports neither dask nor distributed: the factory imports them when an
executor is actually built, so `import cryomamba` and listing executors stay cheap.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from cryomamba import hookimpl

__all__ = ["cryomamba_register_executors", "make_executor"]


def make_executor(**options: Any) -> Any:
    """Build a `DaskExecutor` (imported here, so dask loads only when one is wanted)."""
    from .executor import DaskExecutor

    return DaskExecutor(**options)


@hookimpl
def cryomamba_register_executors(registry) -> None:
    # an executor whose packages are missing is simply not offered
    if importlib.util.find_spec("distributed") is not None:
        registry.add("dask", make_executor)
