"""Turn the `cluster=` option into a connected `distributed.Client`.

- `None`: a `LocalCluster` on this machine: one worker per visible GPU (dask-cuda's
  `LocalCUDACluster` when installed), else `workers` CPU workers, each with one task slot
  and an equal share of the cores for torch.
- `"tcp://host:8786"` (any scheduler address): a running scheduler; unreachable means a
  `ClusterError` within `connect_timeout_s`, never a hang.
- a `distributed.Client`: used as is (and not closed by us).
- `"slurm"`: a `dask_jobqueue.SLURMCluster` built from Dask's own config
  (`jobqueue.slurm.*`: queue, account, walltime, memory, job_extra_directives...), scaled
  to `workers` jobs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from cryomamba.errors import ConfigError, CryoMambaError

__all__ = ["ClusterError", "Connection", "connect", "local_cluster_shape"]

log = logging.getLogger(__name__)


_QUIET_HTTP = "127.0.0.1:0"


class ClusterError(CryoMambaError, ConnectionError):
    """The Dask scheduler cannot be reached, or a cluster cannot be started."""

    code = "cluster_unreachable"
    retryable = True


@dataclass
class Connection:
    """A client, the cluster we started for it (None when the caller owns it), and whether
    closing the executor should close the client."""

    client: Any
    cluster: Any = None
    owns_client: bool = True
    torch_threads: int | None = None

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def local_cluster_shape(workers: int | None, cores: int | None = None) -> tuple[int, int]:
    """(CPU workers, torch threads per worker): the cores split fairly, at least one each."""
    cores = cores or os.cpu_count() or 1
    n = workers if workers is not None else max(1, cores // 4)
    if n < 1:
        raise ConfigError(f"workers must be at least 1, got {n}", hint="e.g. workers=2")
    return n, max(1, cores // n)


def _gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no usable torch/CUDA: CPU workers
        return 0


def connect(
    cluster: Any = None,
    *,
    workers: int | None = None,
    connect_timeout_s: float = 10.0,
    local_directory: str | None = None,
) -> Connection:
    """A `Connection` for the `cluster=` option (see the module docstring)."""
    from distributed import Client

    if isinstance(cluster, Client):
        return Connection(client=cluster, owns_client=False)
    if cluster is None:
        return _local(workers, local_directory)
    if isinstance(cluster, str) and cluster == "slurm":
        return _slurm(workers, connect_timeout_s)
    if isinstance(cluster, str) and "://" in cluster:
        return Connection(client=_client(cluster, connect_timeout_s))
    if hasattr(cluster, "scheduler_address"):  # a cluster object the caller started
        return Connection(client=_client(cluster, connect_timeout_s))
    raise ConfigError(
        f"cluster must be None, a scheduler address, a distributed.Client or 'slurm', "
        f"got {cluster!r}",
        hint="e.g. cluster='tcp://head-node:8786' or cluster='slurm'",
    )


def _client(address: Any, timeout: float) -> Any:
    from distributed import Client

    where = getattr(address, "scheduler_address", address)
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {where} within {timeout:g} s: {exc}",
            hint="start one with `dask scheduler` (workers with `dask worker ADDRESS`), "
            "check the address and port, and that no firewall is in the way",
        ) from None


def _local(workers: int | None, local_directory: str | None) -> Connection:
    from distributed import LocalCluster

    gpus = _gpu_count()
    common: dict[str, Any] = {
        "processes": True,
        "dashboard_address": None,
        # no dashboard, and its HTTP routes on a free loopback port (not 8787, which another
        # cluster may hold: distributed would warn and move)
        "scheduler_kwargs": {"dashboard_address": _QUIET_HTTP},
        "local_directory": local_directory,
    }
    if gpus and workers is None:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            LocalCUDACluster = None
        if LocalCUDACluster is not None:
            cluster = LocalCUDACluster(threads_per_worker=1, resources={"GPU": 1}, **common)
        else:  # one worker per GPU, each pinned to its device by CUDA_VISIBLE_DEVICES
            cluster = _pinned_gpu_cluster(gpus, common)
        log.info("started a LocalCluster with %d GPU worker(s)", gpus)
        return Connection(client=_client(cluster, 30), cluster=cluster)
    n, threads = local_cluster_shape(workers)
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, env=env, **common)
    log.info("started a LocalCluster with %d CPU worker(s), %d torch thread(s) each", n, threads)
    return Connection(client=_client(cluster, 30), cluster=cluster, torch_threads=threads)


def _pinned_gpu_cluster(gpus: int, common: dict[str, Any]) -> Any:
    """One single-threaded worker per GPU, each seeing only its device (no dask-cuda)."""
    from distributed import Nanny, Scheduler, SpecCluster

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(gpus)]
    workers = {
        f"gpu-{d}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": d},
                "local_directory": common["local_directory"],
            },
        }
        for d in devices
    }
    scheduler = {
        "cls": Scheduler,
        "options": {"dashboard": False, "dashboard_address": _QUIET_HTTP},
    }
    return SpecCluster(workers=workers, scheduler=scheduler)


def _slurm(workers: int | None, timeout: float) -> Connection:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "cluster='slurm' needs dask-jobqueue",
            hint="pip install 'dask-jobqueue>=0.9' (or cryomamba-dask[slurm])",
        ) from None
    import shutil

    import dask

    missing = [k for k in ("cores", "memory") if dask.config.get(f"jobqueue.slurm.{k}") is None]
    if missing:
        raise ConfigError(
            "cluster='slurm' needs "
            + " and ".join(f"jobqueue.slurm.{k}" for k in missing)
            + " in Dask's config",
            hint="set them (and queue, walltime...) in ~/.config/dask/jobqueue.yaml; "
            "docs/cluster.md has a copy-paste example",
        )
    if shutil.which("sbatch") is None:
        raise ClusterError(
            "cluster='slurm' needs sbatch, which is not on PATH here",
            hint="run on a SLURM login node (or a machine that can submit SLURM jobs)",
        )
    try:
        cluster = SLURMCluster()  # everything from dask config: jobqueue.slurm.*
    except Exception as exc:  # a missing setting, no sbatch on PATH...
        raise ClusterError(
            f"cannot start a SLURMCluster: {exc}",
            hint="set jobqueue.slurm.* in ~/.config/dask/jobqueue.yaml (docs/cluster.md) "
            "and run where sbatch works",
        ) from None
    cluster.scale(jobs=workers or 1)
    log.info("SLURMCluster: asked for %d job(s)\n%s", workers or 1, cluster.job_script())
    return Connection(client=_client(cluster, timeout), cluster=cluster)
