"""deploy/prometheus and deploy/grafana against the real thing: promtool checks and unit-tests
the rules, and a real Prometheus scraping a real gateway under a short load returns data
for every query of the dashboard and every recording rule.

Prometheus is Debian's package, installed by ``make system-deps`` (which ``make test``
runs) when missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from model_store.store import ModelStore
from tests.helpers.inprocess import digits_body
from tests.helpers.servers import REPO_ROOT, RunningServer, free_port, start_server, stop_server

pytestmark = pytest.mark.e2e

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "fermion-dashboard.json"
SCRAPE_S = 1
#: What Grafana's variables stand for in the queries sent here.
VARIABLES = {"$model": ".*", "$__rate_interval": "20s"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make system-deps installs Debian's prometheus)")
    return path


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = _tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"],
        capture_output=True,
        text=True,
        cwd=PROMETHEUS_DIR,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "rules_test.yaml"],
        capture_output=True,
        text=True,
        cwd=PROMETHEUS_DIR,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # Every alert of the rules has a unit test.
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules_test.yaml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", [])}
    assert alerts == tested


def _dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def test_the_dashboard_covers_what_operations_watch() -> None:
    titles = " | ".join(title for title, _ in _dashboard_queries()).lower()
    for needed in (
        "request rate",
        "error ratio",
        "p99",
        "queue wait vs compute",
        "rows per batch",
        "a/b split",
        "shadow",
        "canary step",
        "rollbacks",
        "rejections by reason",
        "replicas",
    ):
        assert needed in titles, needed


@pytest.fixture
def gateway(demo_store: ModelStore, tmp_path: Path) -> Iterator[RunningServer]:
    config = """
routes:
  digits:
    split: {1: 50, 2: 50}
    shadow: {version: 2, percent: 100}
"""
    server = start_server(demo_store.root, tmp_path, config)
    yield server
    stop_server(server)


@pytest.fixture
def prometheus(gateway: RunningServer, tmp_path: Path) -> Iterator[str]:
    binary = _tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": "1s"},
                "rule_files": [str(PROMETHEUS_DIR / "rules.yaml")],
                "scrape_configs": [
                    {
                        "job_name": "fermion",
                        "static_configs": [{"targets": [f"127.0.0.1:{gateway.port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _load(url: str, seconds: float) -> dict[int, int]:
    """Inference requests for ``seconds``: good ones, and some refused (400, 404)."""
    statuses: dict[int, int] = {}
    bad = digits_body()
    bad["inputs"][0]["datatype"] = "INT8"
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=10) as client:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            if i % 10 == 0:
                r = client.post("/v2/models/digits/infer", json=bad)
            elif i % 10 == 5:
                r = client.post(f"/v2/models/nosuch-{i}/infer", json={})
            else:
                r = client.post("/v2/models/digits/infer", json=digits_body(rows=1 + i % 3))
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    return statuses


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, (expr, r.text)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_every_dashboard_query_returns_data_after_a_short_load(
    gateway: RunningServer, prometheus: str
) -> None:
    results: dict[int, int] = {}

    def load() -> None:
        results.update(_load(gateway.url, 12.0))

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(3)
    # A canary that an operator stops: a step, then a rollback.
    with httpx.Client(base_url=gateway.url, timeout=10) as admin:
        spec = {"from": 1, "to": 2, "steps": [10, 100], "interval_s": 60}
        assert admin.post("/admin/rollouts/digits", json=spec).status_code == 201
        time.sleep(3)
        assert admin.post("/admin/rollouts/digits/stop").status_code == 200
    worker.join()
    assert results.get(200, 0) > 50 and results.get(400) and results.get(404), results
    time.sleep(3 * SCRAPE_S)
    empty = [(title, expr) for title, expr in _dashboard_queries() if not _query(prometheus, expr)]
    assert not empty, empty
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                expr = rule["expr"].replace("[5m]", "[20s]")
                assert _query(prometheus, expr), rule["record"]
    # The gateway is ready and up: neither alert fires.
    firing = _query(prometheus, 'ALERTS{alertstate="firing"}')
    assert not [a for a in firing if a["metric"]["alertname"] in ("FermionNotReady", "FermionDown")]
    assert _query(prometheus, "fermion_ready")[0]["value"][1] == "1"
