"""The one-call pipeline: `segment()` waits for the result, `submit()` returns the `Job`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .config import JobConfig
from .events import Event
from .executors.base import Executor, get_executor
from .job import Job
from .segmentation import Segmentation
from .sinks.base import Sink

SinkLike = Sink | Callable[[Event], Any] | str
"""A sink, a function called with each event, or a registered sink's name ("file", ...)."""

__all__ = ["segment", "submit"]


def submit(
    source: Any,
    config: JobConfig | None = None,
    *,
    executor: str | Executor = "local",
    sinks: Sequence[SinkLike] = (),
    **executor_options: Any,
) -> Job:
    """Start segmenting `source` (a `Volume`, an MRC path or a 3D array) and return its `Job`.

    `executor` is a registered name ("local", "remote", ...) or an executor object; extra
    keyword options (e.g. `server=`, `token=`) go to the executor's factory.
    """
    config = config or JobConfig()
    if not isinstance(config, JobConfig):
        raise TypeError(f"config must be a JobConfig, got {type(config).__name__}")
    return get_executor(executor, **executor_options).submit(source, config, sinks)


def segment(
    source: Any,
    model: str | os.PathLike[str] = "demo-membrane",
    *,
    executor: str | Executor = "local",
    sinks: Sequence[SinkLike] = (),
    timeout: float | None = None,
    executor_options: dict[str, Any] | None = None,
    **config: Any,
) -> Segmentation:
    """Segment `source` with `model` and wait for the result; config fields go as keywords.

    Raises `JobFailedError` / `JobCanceledError` if the job did not complete, and the first
    sink error (e.g. an unwritable output folder) if a sink failed to handle the result.
    """
    cfg = JobConfig(model=os.fspath(model), **config)
    job = submit(source, cfg, executor=executor, sinks=sinks, **(executor_options or {}))
    result = job.result(timeout)
    if job.sink_errors:
        raise job.sink_errors[0]
    return result
