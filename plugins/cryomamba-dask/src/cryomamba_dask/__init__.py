"""CryoMamba on a Dask cluster: the executor `dask` (one tomogram = one task on one worker).

`DaskExecutor` and `ClusterError` load on first use, so importing this package (as the
plugin manager does) does not import dask.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ClusterError", "DaskExecutor"]


def __getattr__(name: str) -> Any:
    if name == "DaskExecutor":
        from .executor import DaskExecutor

        return DaskExecutor
    if name == "ClusterError":
        from .cluster import ClusterError

        return ClusterError
    raise AttributeError(f"module 'cryomamba_dask' has no attribute {name!r}")
