"""deploy/: the Grafana dashboard and the Prometheus alert rules use only metrics we export.

Both files are parsed (JSON, YAML) and checked for the fields Grafana and Prometheus
require; every `cryomamba_*` name in their expressions must be a series a real server's
/metrics exports, and every label a selector or a `by (...)` names must be one of that
series' labels. Also here: the gauges and the error counter added for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import LiveServer

from cryomamba.server.metrics import Metrics, expected_seconds

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "cryomamba.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
NAME = re.compile(r"\b(cryomamba_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(cryomamba_[a-z0-9_]+)\{([^}]*)\}")
BY = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")
ADDED_BY_PROMETHEUS = {"instance", "job", "le"}  # target labels, and le of histogram buckets


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def expressions() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs + [rule["expr"] for rule in rules()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Iterator[dict[str, set[str]]]:
    """Series name -> its label names, from a real server's /metrics after some traffic."""
    server = LiveServer(tmp_path_factory.mktemp("deploy") / "data").start()
    try:
        token = server.token("alice", "read,upload")
        with server.client(token) as client:
            assert client.get("/v1/server/info").status_code == 200
            init = {"filename": "x.mrc", "size": 1024, "part_size": 8 << 20}
            upload = client.post("/v1/uploads/init", json=init).json()["upload_id"]
            put = client.put(f"/v1/uploads/{upload}/part/0", content=b"\0" * 1024)
            assert put.status_code == 200, put.text
        with server.client() as anonymous:
            denied = anonymous.get("/v1/jobs")
            assert denied.status_code == 401
            assert "x-cryomamba-error-code" not in denied.headers  # counted, never sent
            text = anonymous.get("/metrics").text
    finally:
        server.stop()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
        if family.type == "histogram":
            series.setdefault(family.name, set())
    yield series


def test_the_dashboard_has_what_grafana_needs():
    dash = dashboard()
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and ids
    for panel in dash["panels"]:
        assert panel["title"] and panel["type"] and panel["targets"], panel
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel["targets"]:
            assert target["refId"] and target["expr"].strip(), panel["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for subject in ("queue", "jobs by state", "tiles", "latency", "upload", "errors by code"):
        assert subject in titles


def test_the_alert_rules_have_what_prometheus_needs():
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["groups"] and all(g["name"] and g["rules"] for g in doc["groups"])
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["expr"].strip() and re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
    assert {"CryoMambaQueueStalled", "CryoMambaJobOverdue", "CryoMambaDataDirNearlyFull"} <= set(
        names
    )


def test_every_metric_the_dashboard_and_rules_use_is_exported(exported):
    used = {name for expr in expressions() for name in NAME.findall(expr)}
    assert len(used) >= 10
    missing = sorted(name for name in used if name not in exported)
    assert not missing, f"not in /metrics: {missing}; exported: {sorted(exported)}"


def test_every_label_they_select_or_group_by_exists(exported):
    for expr in expressions():
        names = set(NAME.findall(expr))
        labels_of_all = set().union(*(exported.get(n, set()) for n in names))
        for name, inside in SELECTOR.findall(expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", inside):
                assert label in exported[name] | ADDED_BY_PROMETHEUS, (name, label)
        for group in BY.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in labels_of_all | ADDED_BY_PROMETHEUS, (expr, label)


def test_errors_are_counted_by_their_code(exported):
    assert {"code", "status"} <= exported["cryomamba_http_errors_total"]


def scrape(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_oldest_running_job_and_its_expected_duration():
    rows = [
        {"started_at": 1e18, "progress": None},  # started "later": not the oldest
        {"started_at": 100.0, "progress": {"fraction": 0.25, "eta_s": 30.0}},
    ]
    values = scrape(Metrics(dict, running_jobs=lambda: rows))
    assert values["cryomamba_oldest_running_job_expected_seconds"] == 40.0
    assert values["cryomamba_oldest_running_job_age_seconds"] > 1e9
    idle = scrape(Metrics(dict, running_jobs=list))
    assert idle["cryomamba_oldest_running_job_age_seconds"] == 0.0
    assert idle["cryomamba_oldest_running_job_expected_seconds"] == 0.0


@pytest.mark.parametrize(
    "progress",
    [None, {"fraction": 0.0, "eta_s": 5.0}, {"fraction": 1.0, "eta_s": 0.0}, {"fraction": 0.5}],
)
def test_no_expected_duration_without_a_usable_eta(progress):
    assert expected_seconds(progress) == 0.0


def test_the_data_dir_disk_gauges(tmp_path):
    values = scrape(Metrics(dict, data_dir=tmp_path))
    assert 0 < values["cryomamba_data_dir_free_bytes"] <= values["cryomamba_data_dir_size_bytes"]
    assert "cryomamba_data_dir_free_bytes" not in scrape(Metrics(dict, data_dir=tmp_path / "gone"))
