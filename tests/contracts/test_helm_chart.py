"""The Helm chart deploy/helm/gristmill, rendered by the real helm that deploy/helm-check.sh builds (once, cached).

What a cluster would get: every service's workload, Service and PodDisruptionBudget, health probes on the ports of
gristmill.core.ports; every field of every settings class the services read documented in values.yaml and reaching
the pods as its environment variable; and the offline schema validator of helm-check.sh rejecting a misspelled field.
The PrometheusRule and the Grafana dashboard are deploy/monitoring's files. A missing helm (no Go to build it) fails
these tests, never skips them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from gristmill.admin.settings import AdminSettings
from gristmill.console.settings import ConsoleSettings
from gristmill.core.auth import AuthSettings
from gristmill.core.ports import CONSOLE_PORT, SERVICE_PORTS, SERVING_OPENAI_PORT
from gristmill.core.settings import KafkaSettings, LicenseSettings, S3Settings, TelemetrySettings
from gristmill.core.tls import TlsSettings
from gristmill.labeling.settings import LabelingSettings
from gristmill.registry.settings import RegistrySettings
from gristmill.serving.settings import ServingSettings
from gristmill.training.settings import TrainingSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "gristmill"
CHECK = ROOT / "deploy" / "helm-check.sh"
VALIDATOR = ROOT / "deploy" / "helm" / "validate_manifests.py"
EVERYTHING = CHART / "ci" / "everything-values.yaml"
PYTHON = ROOT / ".venv" / "bin" / "python"

SERVICES: dict[str, type[BaseSettings]] = {
    "admin": AdminSettings,
    "labeling": LabelingSettings,
    "training": TrainingSettings,
    "registry": RegistrySettings,
    "serving": ServingSettings,
    "console": ConsoleSettings,
}
# The shared settings classes, where values.yaml has them, and which services read each (their __main__ or
# run_service: Infrastructure.from_environment, load_security). Admin keeps no objects: like docker-compose.yml the
# chart gives it no S3 settings (its S3Settings stay empty: a local-disk store it never writes to).
GRPC_SERVICES = ("admin", "labeling", "training", "registry", "serving")
SHARED: dict[str, tuple[type[BaseSettings], tuple[str, ...]]] = {
    "kafka": (KafkaSettings, GRPC_SERVICES),
    "s3": (S3Settings, ("labeling", "training", "registry", "serving")),
    "telemetry": (TelemetrySettings, (*GRPC_SERVICES, "console")),
    "auth": (AuthSettings, GRPC_SERVICES),
    "license": (LicenseSettings, GRPC_SERVICES),
    "tls": (TlsSettings, (*GRPC_SERVICES, "console")),
}


def env_name(cls: type[BaseSettings], field: str) -> str:
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def helm() -> Path:
    result = run(CHECK, "--helm-path")
    if result.returncode != 0:
        pytest.fail(
            f"deploy/helm-check.sh --helm-path failed (helm is built from the Go module proxy):\n{result.stderr}"
        )
    return Path(result.stdout.strip().splitlines()[-1])


Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="module")
def render(helm: Path) -> Render:
    def _render(*values: Path) -> list[dict[str, Any]]:
        args: list[str | Path] = [helm, "template", "gristmill", CHART, "--namespace", "gristmill"]
        for path in values:
            args += ["-f", path]
        result = run(*args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def workload(docs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    # Serving is a StatefulSet: its replicas keep their ids (GRISTMILL_SERVING_REPLICA) across restarts.
    return find(docs, "StatefulSet" if service == "serving" else "Deployment", f"gristmill-{service}")


def container(docs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    (only,) = workload(docs, service)["spec"]["template"]["spec"]["containers"]
    return only


def env_of(docs: list[dict[str, Any]], service: str) -> dict[str, dict[str, Any]]:
    env = container(docs, service)["env"]
    names = [item["name"] for item in env]
    assert len(names) == len(set(names)), f"{service}: duplicate variables {sorted(names)}"
    return {item["name"]: item for item in env}


def test_every_service_has_a_workload_a_service_a_pdb_and_probes_on_its_real_port(render: Render) -> None:
    docs = render()
    ports = {**SERVICE_PORTS, "console": CONSOLE_PORT}
    for service, port in ports.items():
        pod = workload(docs, service)["spec"]["template"]
        labels = pod["metadata"]["labels"]
        box = container(docs, service)
        port_name = "http" if service == "console" else "grpc"
        assert {"name": port_name, "containerPort": port} in box["ports"], service

        svc = find(docs, "Service", f"gristmill-{service}")
        assert svc["spec"]["selector"].items() <= labels.items(), service
        assert any(p["name"] == port_name and p["port"] == port for p in svc["spec"]["ports"]), service

        pdb = find(docs, "PodDisruptionBudget", f"gristmill-{service}")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), service
        assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"], service

        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if service == "console":
                assert box[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, service
            else:
                # The kubelet's own grpc.health.v1 check, on the port the service listens on.
                assert box[probe]["grpc"] == {"port": port}, (service, probe)
        assert box["resources"]["requests"], service

    serving = container(docs, "serving")
    assert {"name": "openai", "containerPort": SERVING_OPENAI_PORT} in serving["ports"]
    assert env_of(docs, "serving")["GRISTMILL_SERVING_OPENAI_PORT"]["value"] == str(SERVING_OPENAI_PORT)


def test_with_tls_the_probes_call_over_mtls_with_the_services_certificate(render: Render) -> None:
    docs = render(EVERYTHING)
    for service, port in SERVICE_PORTS.items():
        box = container(docs, service)
        command = box["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["python", "/usr/local/bin/grpc-health-probe"], service
        assert f"127.0.0.1:{port}" in command, service
        env = env_of(docs, service)
        assert env["GRISTMILL_TLS_CERT_FILE"]["value"] == f"/etc/gristmill/certs/{service}.pem"
        # Each pod mounts its own key only.
        (tls,) = [v for v in workload(docs, service)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
        assert {item["key"] for item in tls["secret"]["items"]} == {"ca.pem", f"{service}.pem", f"{service}.key"}


def values_settings(values: dict[str, Any], service: str | None, block: str | None) -> dict[str, Any]:
    return values["services"][service]["settings"] if service else values[str(block)]["settings"]


def test_values_yaml_documents_every_setting_of_every_settings_class() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    classes = [(cls, values_settings(values, name, None)) for name, cls in SERVICES.items()]
    classes += [(cls, values_settings(values, None, block)) for block, (cls, _) in SHARED.items()]
    for cls, settings in classes:
        # The map holds exactly the class's fields: none missing, none stale.
        assert set(settings) == set(cls.model_fields), cls.__name__
        for field in cls.model_fields:
            assert env_name(cls, field) in comments, f"values.yaml has no comment naming {env_name(cls, field)}"


def test_every_setting_reaches_the_pods_as_its_environment_variable(render: Render, tmp_path: Path) -> None:
    """Everything on, and every setting the chart leaves to the service's default set to "1": each field's variable is
    in the container's environment (from a Secret where the chart keeps it in one)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    overrides: dict[str, Any] = {"services": {}}
    for name in SERVICES:
        settings = values_settings(values, name, None)
        overrides["services"][name] = {"settings": {k: "1" for k, v in settings.items() if v is None}}
    for block in SHARED:
        settings = values_settings(values, None, block)
        overrides[block] = {"settings": {k: "1" for k, v in settings.items() if v is None}}
    # Values the templates compute with stay numbers; the secrets come from Secrets.
    overrides["services"]["serving"]["settings"]["openai_port"] = SERVING_OPENAI_PORT
    for name in SERVICES:
        for secret in ("database_url", "session_secret"):
            overrides["services"][name]["settings"].pop(secret, None)
    for block, field in (("s3", "access_key"), ("s3", "secret_key"), ("auth", "service_key")):
        overrides[block]["settings"].pop(field)
    extra = tmp_path / "every-setting.yaml"
    extra.write_text(yaml.safe_dump(overrides))
    docs = render(EVERYTHING, extra)
    extra_env = {name: svc.get("env", {}) for name, svc in yaml.safe_load(EVERYTHING.read_text())["services"].items()}

    for name, cls in SERVICES.items():
        env = env_of(docs, name)
        expected = [(cls, field) for field in cls.model_fields]
        expected += [(c, f) for c, readers in SHARED.values() if name in readers for f in c.model_fields]
        for settings_cls, field in expected:
            variable = env_name(settings_cls, field)
            assert variable in env, f"{name}: {variable} ({settings_cls.__name__}.{field}) is not in its environment"
            item = env[variable]
            assert "value" in item or "secretKeyRef" in item.get("valueFrom", {}), (name, variable)
            set_here = overrides["services"][name]["settings"].get(field) == "1" and settings_cls is cls
            if set_here and variable not in extra_env.get(name, {}):  # a service's env: map wins
                assert item["value"] == "1", (name, variable)


def test_serving_replicas_get_stable_ids_and_training_drives_the_ray_cluster(render: Render) -> None:
    docs = render(EVERYTHING)
    serving = env_of(docs, "serving")
    assert (
        serving["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    assert serving["GRISTMILL_SERVING_REPLICA"]["value"] == "r$(POD_INDEX)"
    assert ServingSettings(replica="r12").resolved_consumer_group().endswith(".r12")  # a valid replica id
    assert workload(docs, "serving")["spec"]["replicas"] == 3

    ray = find(docs, "RayCluster", "gristmill-ray")
    assert ray["apiVersion"] == "ray.io/v1"
    assert env_of(docs, "training")["GRISTMILL_TRAINING_RAY_ADDRESS"]["value"] == "gristmill-ray-head-svc:6379"
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == container(docs, "training")["image"]

    monitor = find(docs, "ServiceMonitor", "gristmill")
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        d for d in docs if d["kind"] == "Service" and selector.items() <= d["metadata"].get("labels", {}).items()
    ]
    assert sorted(d["metadata"]["name"] for d in scraped) == sorted(f"gristmill-{s}" for s in SERVICE_PORTS)
    assert all(any(p["name"] == "metrics" for p in d["spec"]["ports"]) for d in scraped)


def test_the_collector_runs_deploy_otel_collector_yaml(render: Render) -> None:
    docs = render()
    config = find(docs, "ConfigMap", "gristmill-otel-collector")["data"]["config.yaml"]
    assert yaml.safe_load(config) == yaml.safe_load((ROOT / "deploy" / "otel" / "collector.yaml").read_text())
    assert env_of(docs, "labeling")["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://gristmill-otel-collector:4317"


def test_the_schema_validator_rejects_a_misspelled_field(render: Render, tmp_path: Path) -> None:
    args = run(CHECK, "--validator-args")
    assert args.returncode == 0, args.stderr
    validator_args = args.stdout.split()
    docs = render(EVERYTHING)

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump_all(docs))
    result = run(PYTHON, VALIDATOR, *validator_args, good)
    assert result.returncode == 0, result.stdout

    # A core kind (the kubelet would ignore the field: a probe silently missing) and a custom resource.
    labeling = workload(docs, "labeling")
    box = labeling["spec"]["template"]["spec"]["containers"][0]
    box["readinesProbe"] = box.pop("readinessProbe")
    ray = find(docs, "RayCluster", "gristmill-ray")
    ray["spec"]["workerGroupSpecs"][0]["rayStartParam"] = ray["spec"]["workerGroupSpecs"][0].pop("rayStartParams")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([labeling, ray]))
    result = run(PYTHON, VALIDATOR, *validator_args, bad)
    assert result.returncode == 1, result.stdout
    assert "'readinesProbe' was unexpected" in result.stdout
    assert "'rayStartParam' was unexpected" in result.stdout


def test_the_prometheus_rule_and_the_dashboard_are_deploy_monitorings_files(render: Render) -> None:
    """The PrometheusRule holds the groups of deploy/monitoring/alerts.yml (the rules promtool tests and Compose's
    Prometheus loads), the dashboard ConfigMap gristmill.json, labelled for Grafana's sidecar; both off by default."""
    assert not [d for d in render() if d["kind"] == "PrometheusRule" or d["metadata"]["name"].endswith("-dashboard")]

    docs = render(EVERYTHING)
    alerts = yaml.safe_load((ROOT / "deploy" / "monitoring" / "alerts.yml").read_text())
    rule = find(docs, "PrometheusRule", "gristmill")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == {"groups": alerts["groups"]}
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    groups = {group["name"] for group in rule["spec"]["groups"]}
    assert {f"gristmill-{g}" for g in ("drift", "errors", "latency", "quota", "consumers", "up")} <= groups

    dashboard = find(docs, "ConfigMap", "gristmill-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = json.loads((ROOT / "deploy" / "monitoring" / "grafana" / "gristmill.json").read_text())
    assert json.loads(dashboard["data"]["gristmill.json"]) == expected
