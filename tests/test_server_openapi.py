"""/v1/openapi.json: a valid OpenAPI 3.0 document that lists every route and tells the truth.

The last test points schemathesis at a live server (admin token, a few hundred generated
requests, a fixed seed): no 5xx, every status code documented, every body and header as
the document says, valid requests accepted and invalid ones refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import mrcfile
import numpy as np
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import StopReason
from schemathesis.engine.events import (
    EngineFinished,
    FatalError,
    NonFatalError,
    ScenarioFinished,
)
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR
from server_fixtures import LiveServer
from starlette.routing import Route, WebSocketRoute

from cryomamba.server import create_app
from cryomamba.server.settings import ServerSettings
from cryomamba.testing import make_model_folder

TERMINAL = ("completed", "failed", "canceled")
SEED = 20261122


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    """A server holding a completed, a failed and a canceled job, so listings show all kinds."""
    base = tmp_path_factory.mktemp("server-openapi")
    models = base / "models"
    make_model_folder(models / "tiny", patch_size=(16, 16, 16), features=(4, 8, 16), seed=1)
    root = base / "root"
    root.mkdir()
    with mrcfile.new(root / "small.mrc") as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=(24, 32, 32)).astype(np.float32))
        mrc.voxel_size = 10.0
    with mrcfile.new(root / "no-voxel-size.mrc") as mrc:  # passes submit, fails in the worker
        mrc.set_data(np.random.default_rng(1).normal(size=(24, 32, 32)).astype(np.float32))
    live = LiveServer(
        base / "data",
        models_dir=models,
        roots=[root],
        extra_args=["--rate-limit", "1000000", "--auth-failures", "1000000"],
    )
    live.start()
    with live.client(live.token("alice", "read,upload,submit")) as alice:
        jobs = [
            _submit(alice, {"model": "tiny"}),
            _submit(alice, {"model": "tiny"}, "no-voxel-size.mrc"),  # voxel_size_unknown
            _submit(alice, {"model": "tiny"}),
        ]
        alice.delete(f"/v1/jobs/{jobs[2]}")  # canceled, queued or running
        states = sorted(_wait(alice, job) for job in jobs)
    assert states == ["canceled", "completed", "failed"]
    yield live
    live.stop()


def _submit(client, config: dict, server_path: str = "small.mrc") -> str:
    r = client.post("/v1/jobs", json={"server_path": server_path, "config": config})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait(client, job_id: str) -> str:
    deadline = time.monotonic() + 120
    while (state := client.get(f"/v1/jobs/{job_id}").json()["state"]) not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return state


@pytest.fixture(scope="module")
def document(server) -> dict:
    with server.client() as client:
        r = client.get("/v1/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


def _refs(node) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_document_is_valid_openapi_3(document):
    errors = [f"{e.instance_path}: {e.message}" for e in OPENAPI_30_VALIDATOR.iter_errors(document)]
    assert errors == []
    assert document["openapi"].startswith("3.0.")
    for ref in set(_refs(document)):
        node = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # every $ref points at something
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_the_document_describes_this_server(document):
    config = document["components"]["schemas"]["JobConfig"]["properties"]
    assert config["model"]["enum"] == ["demo-membrane", "tiny"]
    assert config["device"]["enum"] == ["auto", "cpu"]
    init = document["components"]["schemas"]["UploadInit"]["properties"]
    assert init["size"]["maximum"] == 64 << 30
    assert (init["part_size"]["minimum"], init["part_size"]["maximum"]) == (8 << 20, 32 << 20)


def test_every_route_is_documented_and_every_documented_route_exists(tmp_path, document):
    app = create_app(ServerSettings(data_dir=tmp_path / "data", devices=("cpu",)))
    app.state.server.storage.close()
    served = set()
    for route in app.routes:
        if isinstance(route, WebSocketRoute) or route.path == "/metrics":
            continue
        assert isinstance(route, Route)
        served |= {(route.path, m.lower()) for m in route.methods if m != "HEAD"}
    documented = {(path, m) for path, item in document["paths"].items() for m in item}
    assert served == documented
    assert all(path.startswith("/v1/") for path, _ in served)


@pytest.mark.slow
def test_the_live_server_keeps_to_its_document(server):
    """schemathesis's own run (examples, coverage, fuzzing, stateful), seeded and bounded.

    The Python API drives the same engine as `st run`; its pytest plugin's lazy loader does
    not work with this pytest, and a run over all operations reads better as one test.
    """
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "base-url": server.url,
            "headers": {"Authorization": f"Bearer {server.token('root', 'admin')}"},
            "generation": {"max-examples": 20, "deterministic": True, "database": "none"},
            "checks": {
                # A too-large upload is refused with 413, which is a refusal too.
                "negative_data_rejection": {
                    "expected-statuses": [400, 401, 403, 404, 405, 409, 413, 415, 422, 429],
                },
            },
            "operations": [
                {
                    # A part's length and index depend on its upload: a schema cannot say that.
                    "include-operation-id": "putUploadPart",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": [200, 401, 403, 404, 409, 410, 422, 429],
                        }
                    },
                }
            ],
        }
    )
    schema = schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json", config=config)
    events = list(schemathesis.engine.from_schema(schema).execute())

    errors = [e for e in events if isinstance(e, (NonFatalError, FatalError))]
    assert errors == []
    finished = events[-1]
    assert isinstance(finished, EngineFinished)
    assert finished.stop_reason == StopReason.COMPLETED
    scenarios = [e for e in events if isinstance(e, ScenarioFinished)]
    cases = sum(len(e.recorder.cases) for e in scenarios)
    assert cases >= 200  # a real run, not one that skipped everything
    failures = {
        f"{check.failure_info.failure.operation}: {check.failure_info.failure}\n"
        f"{check.failure_info.code_sample}"
        for e in scenarios
        for checks in e.recorder.checks.values()
        for check in checks
        if check.failure_info is not None
    }
    assert not failures, "\n\n".join(sorted(failures))
    assert finished.failures == []
