"""One table of default ports and one of consumer groups: every service's settings, the embedded platform and
the CLI read them instead of repeating the numbers and names."""

from __future__ import annotations

from pathlib import Path

import pytest

from gristmill.admin.settings import AdminSettings
from gristmill.cli.platforms import LocalStack, service_ports
from gristmill.client import Endpoints
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
    assert Endpoints().admin == f"127.0.0.1:{SERVICE_PORTS['admin']}"


def test_the_cli_numbers_ports_from_the_table_and_renames_every_group(tmp_path: Path) -> None:
    assert service_ports() == dict(SERVICE_PORTS)
    assert service_ports(7000) == {"labeling": 7000, "training": 7001, "registry": 7002, "serving": 7003, "admin": 7004}
    stack = LocalStack(tmp_path, group_suffix="ci-1")
    groups = stack.consumer_groups()
    assert groups == {f"{g.default}-ci-1": g.topics for g in CONSUMER_GROUPS}
    assert len(groups) == len(CONSUMER_GROUPS) == 6
