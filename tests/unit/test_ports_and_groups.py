"""One table of default ports and one of consumer groups: every service's settings, the embedded platform and
the CLI read them instead of repeating the numbers and names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gristmill.admin.settings import AdminSettings
from gristmill.cli.platforms import LocalStack, service_ports
from gristmill.client import Endpoints
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.events.topics import CONSUMER_GROUPS
from gristmill.core.ports import SERVICE_PORTS
from gristmill.core.settings import ServiceSettings
from gristmill.labeling.settings import LabelingSettings
from gristmill.registry.settings import RegistrySettings
from gristmill.serving.settings import ServingSettings
from gristmill.training.settings import TrainingSettings

SETTINGS: dict[str, type[ServiceSettings]] = {
    "labeling": LabelingSettings,
    "training": TrainingSettings,
    "registry": RegistrySettings,
    "serving": ServingSettings,
    "admin": AdminSettings,
}


@pytest.fixture(autouse=True)
def no_service_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GRISTMILL_") and name.split("_")[1].lower() in SETTINGS:
            monkeypatch.delenv(name)


def test_every_service_defaults_to_its_port_and_its_consumer_groups() -> None:
    for service, port in SERVICE_PORTS.items():
        assert SETTINGS[service]().grpc_port == port
    for group in CONSUMER_GROUPS:
        assert getattr(SETTINGS[group.service](), group.setting) == group.default
    assert ServingSettings().registry_address == f"127.0.0.1:{SERVICE_PORTS['registry']}"
    assert LabelingSettings().registry_address == f"127.0.0.1:{SERVICE_PORTS['registry']}"
    assert TrainingSettings().registry_address == f"127.0.0.1:{SERVICE_PORTS['registry']}"
    assert Endpoints().admin == f"127.0.0.1:{SERVICE_PORTS['admin']}"


def test_the_cli_numbers_ports_from_the_table_and_renames_every_group(tmp_path: Path) -> None:
    assert service_ports() == dict(SERVICE_PORTS)
    assert service_ports(7000) == {"labeling": 7000, "training": 7001, "registry": 7002, "serving": 7003, "admin": 7004}
    stack = LocalStack(tmp_path, group_suffix="ci-1")
    env = stack.env()
    registry = f"127.0.0.1:{stack.ports['registry']}"
    assert env["GRISTMILL_LABELING_REGISTRY_ADDRESS"] == env["GRISTMILL_SERVING_REGISTRY_ADDRESS"] == registry
    assert env["GRISTMILL_TRAINING_REGISTRY_ADDRESS"] == registry
    groups = stack.consumer_groups()
    assert groups == {f"{g.default}-ci-1": g.topics for g in CONSUMER_GROUPS}
    assert len(groups) == len(CONSUMER_GROUPS) == 8


def test_serving_replicas_get_ports_data_dirs_and_consumer_groups_of_their_own(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, group_suffix="ci-1", serving_replicas=3)
    replicas = stack.processes()[-2:]
    assert [(p.name, p.module) for p in replicas] == [
        ("serving-r1", "gristmill.serving"),
        ("serving-r2", "gristmill.serving"),
    ]
    assert len({p.pid_file for p in stack.processes()}) == len({p.log_file for p in stack.processes()}) == 7
    assert stack.replica_endpoints() == {"serving-r1": "127.0.0.1:50154", "serving-r2": "127.0.0.1:50254"}
    env = stack.env() | stack.process_env(replicas[1])
    assert env["GRISTMILL_SERVING_REPLICA"] == "r2"
    assert env["GRISTMILL_SERVING_GRPC_PORT"] == "50254"
    assert env["GRISTMILL_SERVING_DATA_DIR"] == str(tmp_path / "services" / "serving-r2")
    # The one serving database, and each replica's group is the serving group with its id (ServingSettings).
    assert env["GRISTMILL_SERVING_DATABASE_URL"] == stack.env()["GRISTMILL_SERVING_DATABASE_URL"]
    settings = ServingSettings(
        consumer_group=env["GRISTMILL_SERVING_CONSUMER_GROUP"], replica=env["GRISTMILL_SERVING_REPLICA"]
    )
    assert settings.resolved_consumer_group() == "serving-ci-1.r2"
    assert stack.consumer_groups()["serving-ci-1.r2"] == stack.consumer_groups()["serving-ci-1"]
    assert len(stack.consumer_groups()) == len(CONSUMER_GROUPS) + 2
    # Replica ports never land on a service's port, whatever the base port.
    for base_port in (0, 7000, 50050, 60000):
        ports = LocalStack(tmp_path, base_port=base_port, serving_replicas=10)
        replica_ports = {address.rsplit(":", 1)[1] for address in ports.replica_endpoints().values()}
        assert len(replica_ports) == 9
        assert not replica_ports & {str(p) for p in ports.ports.values()}
    with pytest.raises(InvalidArgumentError, match="choose 1 to 10"):
        LocalStack(tmp_path, serving_replicas=0)
    with pytest.raises(InvalidArgumentError, match="beyond port 65535"):
        LocalStack(tmp_path, base_port=65450, serving_replicas=2)
    # `down` (which does not know how many were asked) stops every replica a pid file names.
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "serving-r4.pid").write_text("1\n")
    assert [p.name for p in LocalStack(tmp_path).replica_processes(with_pid_files=True)] == ["serving-r4"]
    assert LocalStack(tmp_path).replica_processes() == []


def test_status_shows_the_serving_replicas() -> None:
    from typer.testing import CliRunner

    from gristmill.cli.main import app

    closed = "127.0.0.1:1"  # nothing listens: every row DOWN, quickly
    result = CliRunner().invoke(
        app, ["--host", "127.0.0.1", "--serving", closed, "status", "--json", "--serving-replicas", "3"]
    )
    rows = json.loads(result.stdout)
    assert result.exit_code == 1
    assert [(r["service"], r["address"]) for r in rows if r["service"].startswith("serving")] == [
        ("serving", closed),
        ("serving-r1", "127.0.0.1:101"),
        ("serving-r2", "127.0.0.1:201"),
    ]


def test_the_console_gets_its_port_the_services_addresses_and_a_session_secret_kept_per_run_dir(tmp_path: Path) -> None:
    from gristmill.console.settings import ConsoleSettings

    stack = LocalStack(tmp_path, base_port=7000)
    env = stack.console_env(stack.console_session_secret())
    assert stack.console_port == 7006 and stack.console_url == "http://127.0.0.1:7006"
    assert LocalStack(tmp_path).console_port == 50057  # the default ports: the embedded platform's too
    settings = ConsoleSettings(
        **{
            k.removeprefix("GRISTMILL_CONSOLE_").lower(): v
            for k, v in env.items()
            if k.startswith("GRISTMILL_CONSOLE_")
        }
    )
    assert (settings.http_port, settings.labeling_address, settings.admin_address, settings.serving_address) == (
        7006,
        "127.0.0.1:7000",
        "127.0.0.1:7004",
        "127.0.0.1:7003",
    )
    secret = tmp_path / "services" / "console" / "session.secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(settings.session_secret.get_secret_value()) >= 32
    # The same secret on the next start (sessions survive a restart); none of the services' certificates.
    assert stack.console_env(stack.console_session_secret()) == env
    assert not any(k.startswith("GRISTMILL_TLS_") for k in env)
    tls = LocalStack(tmp_path, base_port=7000, tls=True).console_env("s")
    assert tls["GRISTMILL_TLS_CERT_FILE"].endswith("console.pem")
    assert [p.name for p in stack.processes()] == ["admin", "registry", "labeling", "training", "serving"]
    assert stack.console_process().module == "gristmill.console"


def test_what_a_start_would_start_includes_the_console_and_leaves_out_what_runs(tmp_path: Path) -> None:
    """``gristmill demo --stack local`` stops what it started: the services and the console (it once left the
    console running), never a process that ran before it."""
    import subprocess
    import sys
    import time

    stack = LocalStack(tmp_path / "run", base_port=23000)
    assert [p.name for p in stack.not_running()] == [*(p.name for p in stack.processes()), "console"]
    console = stack.console_process()
    # Any process whose command line names the console's module counts as it (as ``pid()`` checks).
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", console.module])
    try:
        console.pid_file.parent.mkdir(parents=True, exist_ok=True)
        console.pid_file.write_text(str(running.pid))
        # Right after exec the kernel can still show an empty command line for a moment.
        deadline = time.monotonic() + 10
        while console.pid() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.name for p in stack.not_running()] == [p.name for p in stack.processes()]
    finally:
        running.kill()
        running.wait()
