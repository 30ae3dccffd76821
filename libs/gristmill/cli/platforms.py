"""Running a platform for the CLI: the embedded one as a child process, or the local stack of processes.

``EmbeddedProcess`` starts ``python -m gristmill.standalone`` (every service in one process, in-process bus,
local files) on free ports and reads its ``READY`` line. ``LocalStack`` starts Kafka and the S3 server
(deploy/local/stack.sh) and each service as its own process with ``GRISTMILL_*`` settings, pid files and logs
under a run directory (``gristmill up``/``down``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gristmill.cli.context import parse_endpoints
from gristmill.cli.processes import DEFAULT_PORTS, SERVICES, ServiceProcess, wait_serving
from gristmill.client import Endpoints
from gristmill.core.errors import InvalidArgumentError, UnavailableError

# The training service runs Ray's core worker in its own process; Ray's C++ failure-signal handler would
# otherwise take SIGTERM and abort() the process in the middle of its graceful shutdown.
SERVICE_BASE_ENV = {"HF_HUB_OFFLINE": "1", "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}


@dataclass
class EmbeddedProcess:
    """``python -m gristmill.standalone`` as a child process (its own session: Ctrl-C reaches the CLI only)."""

    data_dir: Path
    base_port: int = 0
    ray_num_cpus: int = 2
    env: Mapping[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log_file(self) -> Path:
        return self.data_dir / "standalone.log"

    @property
    def out_file(self) -> Path:
        return self.data_dir / "standalone.out"

    def start(self, timeout_s: float = 180.0) -> Endpoints:
        """Start and wait for the READY line; returns where each service listens."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "gristmill.standalone",
            "--data-dir",
            str(self.data_dir),
            "--base-port",
            str(self.base_port),
            "--ray-num-cpus",
            str(self.ray_num_cpus),
        ]
        with self.out_file.open("wb") as out, self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env={**os.environ, **SERVICE_BASE_ENV, **self.env},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.out_file.read_text(errors="replace").splitlines():
                if line.startswith("READY "):
                    return parse_endpoints(line)
            if self._proc.poll() is not None:
                raise UnavailableError(
                    f"the embedded platform exited during start-up (status {self._proc.returncode}); "
                    f"see {self.log_file}"
                )
            time.sleep(0.2)
        self.stop()
        raise UnavailableError(f"the embedded platform did not start within {timeout_s:.0f} s; see {self.log_file}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (every service drains), SIGKILL after ``timeout_s``; returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        return proc.returncode


def service_ports(base_port: int = 0) -> dict[str, int]:
    """Each service's port: the defaults, or ``base_port``, ``base_port + 1``, ... in the default order."""
    if not base_port:
        return dict(DEFAULT_PORTS)
    return {name: base_port + i for i, name in enumerate(DEFAULT_PORTS)}


@dataclass
class LocalStack:
    """Each service as its own process on the real Kafka broker and S3 server, under ``run_dir``.

    ``group_suffix`` gives every consumer group of this installation a suffix: installations that share one
    Kafka cluster (a developer's stack and the end-to-end test) then never take each other's events.
    """

    run_dir: Path
    base_port: int = 0
    group_suffix: str = ""
    repo_root: Path | None = None

    def __post_init__(self) -> None:
        if self.group_suffix and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", self.group_suffix):
            raise InvalidArgumentError(
                f"group suffix {self.group_suffix!r}: use 1-64 lower-case letters, digits, '.', '_' or '-'"
            )

    @property
    def ports(self) -> dict[str, int]:
        return service_ports(self.base_port)

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(**{name: f"127.0.0.1:{port}" for name, port in self.ports.items()})

    def processes(self) -> list[ServiceProcess]:
        return [ServiceProcess(name, f"gristmill.{name}", self.run_dir) for name in SERVICES]

    def root_key_file(self) -> Path:
        return self.run_dir / "services" / "admin" / "root-admin.key"

    def root_key(self) -> str:
        """The admin service's first (root organisation, admin scope) key, written at its first start."""
        try:
            return self.root_key_file().read_text().strip()
        except OSError:
            return ""

    def env(self) -> dict[str, str]:
        """What every service process gets: the real Kafka and S3, its port and data dir, the admin address."""
        kafka_port = os.environ.get("GRISTMILL_KAFKA_PORT", "9092")
        s3_port = os.environ.get("GRISTMILL_S3_PORT", "8333")
        ports = self.ports
        env = {
            **SERVICE_BASE_ENV,
            "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS": os.environ.get(
                "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{kafka_port}"
            ),
            "GRISTMILL_S3_ENDPOINT": os.environ.get("GRISTMILL_S3_ENDPOINT", f"127.0.0.1:{s3_port}"),
            "GRISTMILL_S3_ACCESS_KEY": os.environ.get("GRISTMILL_S3_ACCESS_KEY", "gristmill"),
            "GRISTMILL_S3_SECRET_KEY": os.environ.get("GRISTMILL_S3_SECRET_KEY", "gristmill-secret"),
            "GRISTMILL_SERVING_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
            # Services verify API keys at the admin service (once they have auth wired).
            "GRISTMILL_AUTH_ADMIN_ADDRESS": f"127.0.0.1:{ports['admin']}",
        }
        for name in SERVICES:
            env[f"GRISTMILL_{name.upper()}_GRPC_PORT"] = str(ports[name])
            env[f"GRISTMILL_{name.upper()}_DATA_DIR"] = str(self.run_dir / "services" / name)
        if self.group_suffix:
            suffix = f"-{self.group_suffix}"
            env |= {
                "GRISTMILL_TRAINING_AUTO_TRAIN_GROUP": f"training-auto-train{suffix}",
                "GRISTMILL_REGISTRY_JOB_EVENTS_GROUP": f"registry-job-events{suffix}",
                "GRISTMILL_REGISTRY_PROMOTION_GROUP": f"registry-promotion{suffix}",
                "GRISTMILL_SERVING_CONSUMER_GROUP": f"serving{suffix}",
                "GRISTMILL_LABELING_ACTIVE_LEARNING_GROUP": f"labeling-active-learning{suffix}",
                "GRISTMILL_ADMIN_METERING_GROUP": f"admin-metering{suffix}",
            }
        return env

    def consumer_groups(self) -> dict[str, tuple[str, ...]]:
        """This installation's consumer groups and the topics each reads (to start them at the topics' end)."""
        from gristmill.core.events.topics import (
            ALIAS_CHANGED,
            DATASET_VERSION_PUBLISHED,
            JOB_STATE_CHANGED,
            MODEL_VERSION_REGISTERED,
            PREDICTION_LOGGED,
            USAGE_RECORDED,
        )

        env = self.env()
        return {
            env.get("GRISTMILL_TRAINING_AUTO_TRAIN_GROUP", "training-auto-train"): (DATASET_VERSION_PUBLISHED,),
            env.get("GRISTMILL_REGISTRY_JOB_EVENTS_GROUP", "registry-job-events"): (JOB_STATE_CHANGED,),
            env.get("GRISTMILL_REGISTRY_PROMOTION_GROUP", "registry-promotion"): (MODEL_VERSION_REGISTERED,),
            env.get("GRISTMILL_SERVING_CONSUMER_GROUP", "serving"): (ALIAS_CHANGED,),
            env.get("GRISTMILL_LABELING_ACTIVE_LEARNING_GROUP", "labeling-active-learning"): (PREDICTION_LOGGED,),
            env.get("GRISTMILL_ADMIN_METERING_GROUP", "admin-metering"): (USAGE_RECORDED,),
        }

    def create_topics(self) -> None:
        """Create the topics this installation's consumer groups read (and their dead-letter topics) before any
        service starts. A service creates what it subscribes to itself, but a group that forms around a topic
        created a moment earlier can be left with no partitions and never read it: the networked demo then
        waited out its timeout for an auto-train job whose event was published and never handled (seen on
        fresh Kafka brokers only, where every topic is new)."""
        from gristmill.core.events import dead_letter_topic
        from gristmill.core.events.kafka import KafkaEventBus
        from gristmill.core.settings import KafkaSettings

        topics = {t for group_topics in self.consumer_groups().values() for t in group_topics}
        bus = KafkaEventBus(KafkaSettings(bootstrap_servers=self.env()["GRISTMILL_KAFKA_BOOTSTRAP_SERVERS"]))
        try:
            bus.ensure_topics([*topics, *(dead_letter_topic(t) for t in topics)])
        finally:
            bus.close()

    def start_groups_at_end(self) -> list[str]:
        """Start this installation's new consumer groups at the topics' current end.

        Only with ``group_suffix`` (a new installation on a Kafka cluster that others use): without it, a new
        group would read every topic from the beginning and act on other installations' history (register
        their models, train their projects). Groups that already have committed offsets keep them. Returns the
        groups it positioned.
        """
        if not self.group_suffix:
            return []
        from kafka import KafkaConsumer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        bootstrap = self.env()["GRISTMILL_KAFKA_BOOTSTRAP_SERVERS"]
        positioned = []
        for group, topics in self.consumer_groups().items():
            consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
            try:
                partitions = [
                    TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())
                ]
                if not partitions or any(consumer.committed(tp) is not None for tp in partitions):
                    continue
                consumer.assign(partitions)
                ends = consumer.end_offsets(partitions)
                consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in ends.items()})
                positioned.append(group)
            finally:
                consumer.close(autocommit=False)
        return positioned

    def start_infrastructure(self) -> None:
        """Kafka and the S3 server (provisioned once, cached; a no-op when they already run)."""
        root = self.repo_root or Path(__file__).resolve().parents[3]
        script = root / "deploy" / "local" / "stack.sh"
        if not script.exists():
            raise UnavailableError("the local stack needs a source checkout of Gristmill (deploy/local/stack.sh)")
        subprocess.run([str(script), "up"], check=True, stdout=subprocess.DEVNULL)

    def start(
        self, timeout_s: float = 180.0, *, on_start: Callable[[ServiceProcess, int], None] | None = None
    ) -> Endpoints:
        """Start every service not running yet and wait until all serve.

        Admin comes first: the others verify API keys there, and they get its root key (written at its first
        start) as their own service key, which they use to read plans and usage for quotas.
        """
        env = self.env()
        deadline = time.monotonic() + timeout_s
        admin, *others = self.processes()
        pid = admin.start(env)
        if on_start is not None:
            on_start(admin, pid)
        wait_serving(f"127.0.0.1:{self.ports[admin.name]}", timeout_s, process=admin)
        if key := self.root_key():
            env["GRISTMILL_AUTH_SERVICE_KEY"] = key
        for proc in others:
            pid = proc.start(env)
            if on_start is not None:
                on_start(proc, pid)
        for proc in others:
            wait_serving(f"127.0.0.1:{self.ports[proc.name]}", max(1.0, deadline - time.monotonic()), process=proc)
        return self.endpoints

    def stop(self) -> list[tuple[str, bool]]:
        """Stop the services in reverse start order (each drains); returns (name, was running)."""
        return [(proc.name, proc.stop()) for proc in reversed(self.processes())]
