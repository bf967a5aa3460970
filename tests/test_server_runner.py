"""The server's job runner: its back end comes from the executor registry, and the job an
executor feeds is the one readers follow, recorded in the database before they see it."""

from __future__ import annotations

import threading
import time

import pytest

from cryomamba import hookimpl, plugins
from cryomamba.config import JobConfig
from cryomamba.events import Completed, Failed, Progress
from cryomamba.executors.local import LocalExecutor
from cryomamba.job import JobState
from cryomamba.server.runner import JobRunner
from cryomamba.server.storage import Storage, new_id


class SpyExecutor(LocalExecutor):
    """The local executor, remembering every job it was handed."""

    made: list[SpyExecutor] = []

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.options, self.jobs = options, []
        SpyExecutor.made.append(self)

    def submit(self, source, config, sinks=(), *, job=None):
        self.jobs.append(job)
        return super().submit(source, config, sinks, job=job)


class SpyPlugin:
    @hookimpl
    def cryomamba_register_executors(self, registry):
        registry.add("spy", SpyExecutor)


@pytest.fixture
def spy_registered():
    plugins.reset()
    pm = plugins.get_plugin_manager()
    pm.register(SpyPlugin(), name="spy-plugin")
    plugins.reset(keep_manager=True)
    SpyExecutor.made.clear()
    yield
    pm.unregister(name="spy-plugin")
    plugins.reset()


def job_row(mrc_file, model, **config) -> dict:
    return {
        "id": new_id(),
        "owner": "alice",
        "state": "queued",
        "device": None,
        "created_at": time.time(),
        "started_at": None,
        "finished_at": None,
        "source": {"path": str(mrc_file), "filename": mrc_file.name},
        "config": JobConfig(model=str(model), preview_interval_s=0.001, **config).to_dict(),
        "model": {"name": str(model)},
        "progress": None,
        "error": None,
        "artifacts": None,
    }


@pytest.fixture
def runner_for(tmp_path):
    made = []

    def make(executor: str, **options) -> JobRunner:
        storage = Storage(tmp_path / "db.sqlite3")
        runner = JobRunner(
            storage, tmp_path / "artifacts", ("cpu",), per_device=2, executor=executor, **options
        )
        made.append((runner, storage))
        runner.start()
        return runner

    yield make
    for runner, storage in made:
        runner.stop()
        storage.close()


def test_the_back_end_comes_from_the_registry_and_feeds_the_readers_job(
    spy_registered, runner_for, mrc_file, tiny_model
):
    runner = runner_for("spy", executor_options={"model_cache_size": 1})
    (executor,) = SpyExecutor.made
    assert executor.options == {"model_cache_size": 1}
    row = job_row(mrc_file, tiny_model, formats=("mrc", "stats"))
    job = runner.enqueue(row)
    seen_at_the_end = []

    def follow():
        for event in job.events(timeout=120):
            if event.terminal:  # the database already says so when a reader hears it
                seen_at_the_end.append((event, runner.storage.job(row["id"])))

    reader = threading.Thread(target=follow)
    reader.start()
    reader.join(120)
    assert executor.jobs == [job]  # one job: the executor fed the one the reader follows
    ((event, record),) = seen_at_the_end
    assert isinstance(event, Completed), event
    assert record["state"] == JobState.COMPLETED
    assert set(record["artifacts"]) == {"mask.mrc", "stats.json"}
    assert set(event.artifacts) == set(record["artifacts"])
    assert (runner.artifacts_dir / row["id"] / "mask.mrc").is_file()
    assert row["id"] not in runner.live


def test_an_unknown_executor_is_refused_at_once(tmp_path):
    from cryomamba.errors import ConfigError

    storage = Storage(tmp_path / "db.sqlite3")
    try:
        with pytest.raises(ConfigError, match="unknown executor 'nope'"):
            JobRunner(storage, tmp_path / "artifacts", ("cpu",), executor="nope")
    finally:
        storage.close()


def test_progress_reaches_the_database(runner_for, mrc_file, tiny_model):
    runner = runner_for("local")
    row = job_row(mrc_file, tiny_model, formats=("stats",))
    job = runner.enqueue(row)
    progress = [e for e in job.events(timeout=120) if isinstance(e, Progress)]
    assert progress
    stored = runner.storage.job(row["id"])["progress"]
    assert stored["fraction"] == 1.0 and stored["tiles_total"] == progress[-1].tiles_total


def test_a_failing_executor_fails_the_job_in_the_database(runner_for, mrc_file, tmp_path):
    runner = runner_for("local")
    row = job_row(mrc_file, tmp_path / "not-a-model")
    job = runner.enqueue(row)
    events = list(job.events(timeout=60))
    assert isinstance(events[-1], Failed) and events[-1].code == "invalid_model"
    record = runner.storage.job(row["id"])
    assert record["state"] == JobState.FAILED and record["error"]["code"] == "invalid_model"
