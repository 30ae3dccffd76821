"""Running a platform for the CLI: the embedded one as a child process, or the local stack of processes.

``EmbeddedProcess`` starts ``python -m gristmill.standalone`` (every service in one process, in-process bus,
SQLite and local files) on free ports and reads its ``READY`` line. ``LocalStack`` starts PostgreSQL, Kafka and
the S3 server (deploy/local/stack.sh) and each service as its own process with ``GRISTMILL_*`` settings (its
store in a PostgreSQL database of its own), pid files and logs under a run directory (``gristmill up``/``down``).
``serving_replicas`` > 1 adds serving processes ``serving-r1``, ... that share the serving database. ``tls``
runs every service with mTLS, each with its own certificate from ``<run dir>/certs`` (deploy/local/certs.sh).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gristmill.cli.context import parse_endpoints, parse_http_address
from gristmill.cli.processes import SERVICES, ServiceProcess, wait_http, wait_serving
from gristmill.client import Endpoints
from gristmill.core.errors import InvalidArgumentError, UnavailableError
from gristmill.core.ports import (
    CONSOLE_ENDPOINT,
    CONSOLE_PORT,
    KAFKA_PORT,
    LABELING_PORT,
    MAX_SERVING_REPLICAS,
    POSTGRES_PORT,
    S3_PORT,
    serving_replica_port,
)
from gristmill.core.ports import service_ports as default_service_ports
from gristmill.core.tls import TlsSettings, tls_files

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
    # Serving's OpenAI-compatible HTTP API (HOST:PORT), from the READY line once started.
    openai_address: str = field(default="", init=False)
    console_address: str = field(default="", init=False)
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
                    self.openai_address = parse_http_address(line)
                    self.console_address = parse_http_address(line, CONSOLE_ENDPOINT)
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


_REPLICA_PREFIX = "serving-r"


def serving_replica_addresses(serving: str, replicas: int) -> dict[str, str]:
    """Where the serving replicas 1 .. ``replicas`` - 1 listen, next to the first at ``serving`` (host:port), by
    process name: ``{"serving-r1": host:port, ...}`` (``gristmill up --serving-replicas``)."""
    host, _, port = serving.rpartition(":")
    if not port.isdigit():
        return {}
    return {f"{_REPLICA_PREFIX}{k}": f"{host}:{serving_replica_port(int(port), k)}" for k in range(1, replicas)}


def service_ports(base_port: int = 0) -> dict[str, int]:
    """Each service's port: the defaults, or ``base_port``, ``base_port + 1``, ... in the default order."""
    return default_service_ports(base_port or None)


@dataclass
class LocalStack:
    """Each service as its own process on the real Kafka broker, S3 server and PostgreSQL, under ``run_dir``.

    ``group_suffix`` gives every consumer group of this installation a suffix: installations that share one
    Kafka cluster (a developer's stack and the end-to-end test) then never take each other's events. The
    installation's databases are named after its run directory (``database_names``), so installations sharing
    one PostgreSQL server never share a store.

    ``serving_replicas`` serving processes serve the same deployments: replica k >= 1 is ``serving-r<k>``
    (replica id ``r<k>``, its own port ``serving_replica_port``, data dir, pid file and log) on the serving
    database, following the others' deployment writes and reading alias changes in a consumer group of its own.

    ``tls``: every service serves mTLS with a certificate of its own (``<run dir>/certs/<service>.pem``, the
    replicas serving's) and calls the others with it; ``start`` makes the certificates that are missing
    (``ensure_certificates``) and checks health with the ``client`` certificate (``client_tls``).
    """

    run_dir: Path
    base_port: int = 0
    group_suffix: str = ""
    repo_root: Path | None = None
    serving_replicas: int = 1
    tls: bool = False

    def __post_init__(self) -> None:
        if self.group_suffix and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", self.group_suffix):
            raise InvalidArgumentError(
                f"group suffix {self.group_suffix!r}: use 1-64 lower-case letters, digits, '.', '_' or '-'"
            )
        if not 1 <= self.serving_replicas <= MAX_SERVING_REPLICAS + 1:
            raise InvalidArgumentError(
                f"{self.serving_replicas} serving replicas: choose 1 to {MAX_SERVING_REPLICAS + 1}"
            )
        if serving_replica_port(self.ports["serving"], self.serving_replicas - 1) > 65535:
            raise InvalidArgumentError(
                f"serving replica {self.serving_replicas - 1} would listen beyond port 65535: choose a lower base port"
            )

    @property
    def ports(self) -> dict[str, int]:
        return service_ports(self.base_port)

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(**{name: f"127.0.0.1:{port}" for name, port in self.ports.items()})

    def replica_endpoints(self) -> dict[str, str]:
        """Where the serving replicas beyond the first listen, by process name (``serving-r1``: host:port)."""
        return serving_replica_addresses(self.endpoints.serving, self.serving_replicas)

    def processes(self) -> list[ServiceProcess]:
        """Every service process, in start order: the services, then the serving replicas beyond the first."""
        return self._service_processes() + self.replica_processes()

    def not_running(self) -> list[ServiceProcess]:
        """The processes ``start`` would start now (the services, then the console), in start order: what a
        command that starts the stack stops again afterwards, leaving alone what ran before it."""
        return [p for p in [*self.processes(), self.console_process()] if p.pid() is None]

    def _service_processes(self) -> list[ServiceProcess]:
        return [ServiceProcess(name, f"gristmill.{name}", self.run_dir) for name in SERVICES]

    def console_process(self) -> ServiceProcess:
        """The console's web pages: started after the services, stopped first."""
        return ServiceProcess(CONSOLE_ENDPOINT, "gristmill.console", self.run_dir)

    @property
    def console_port(self) -> int:
        # The same offset from the first service port as the embedded platform's.
        return self.ports["labeling"] + (CONSOLE_PORT - LABELING_PORT)

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}"

    def console_session_secret(self) -> str:
        """The secret that seals the console's sessions: made once per run directory (mode 0600), so a restart
        keeps everyone signed in."""
        secret_file = self.run_dir / "services" / CONSOLE_ENDPOINT / "session.secret"
        if not secret_file.exists():
            secret_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))
        return secret_file.read_text().strip()

    def console_env(self, session_secret: str) -> dict[str, str]:
        """The console's settings: where the services listen, its port, the secret that seals its sessions, and
        with ``tls`` its certificate for its calls to the services."""
        env = {
            "GRISTMILL_CONSOLE_HTTP_PORT": str(self.console_port),
            **{
                f"GRISTMILL_CONSOLE_{service.upper()}_ADDRESS": f"127.0.0.1:{self.ports[service]}"
                for service in ("labeling", "admin", "training", "registry", "serving")
            },
            "GRISTMILL_CONSOLE_SESSION_SECRET": session_secret,
        }
        if self.tls:
            env |= tls_files(self.certs_dir, CONSOLE_ENDPOINT)
        return env

    def replica_processes(self, *, with_pid_files: bool = False) -> list[ServiceProcess]:
        """Serving replicas 1 .. ``serving_replicas`` - 1; ``with_pid_files``: and any other that a pid file names
        (started by an earlier ``up`` with more replicas, which ``down`` stops too)."""
        numbers = set(range(1, self.serving_replicas))
        if with_pid_files:
            for pid_file in (self.run_dir / "pids").glob(f"{_REPLICA_PREFIX}*.pid"):
                suffix = pid_file.stem.removeprefix(_REPLICA_PREFIX)
                if suffix.isdigit() and 1 <= int(suffix) <= MAX_SERVING_REPLICAS:
                    numbers.add(int(suffix))
        return [ServiceProcess(f"{_REPLICA_PREFIX}{k}", "gristmill.serving", self.run_dir) for k in sorted(numbers)]

    def _replica_port(self, proc: ServiceProcess) -> int:
        return serving_replica_port(self.ports["serving"], int(proc.name.removeprefix(_REPLICA_PREFIX)))

    def address_of(self, proc: ServiceProcess) -> str:
        """Where ``proc`` (a service or a serving replica) listens."""
        if proc.name.startswith(_REPLICA_PREFIX):
            return f"127.0.0.1:{self._replica_port(proc)}"
        return f"127.0.0.1:{self.ports[proc.name]}"

    @property
    def certs_dir(self) -> Path:
        return self.run_dir / "certs"

    def _root(self) -> Path:
        return self.repo_root or Path(__file__).resolve().parents[3]

    def ensure_certificates(self) -> Path:
        """Make the CA and the certificates missing in ``certs_dir`` (deploy/local/certs.sh, which keeps what
        exists); returns ``certs_dir``."""
        script = self._root() / "deploy" / "local" / "certs.sh"
        if not script.exists():
            raise UnavailableError("--tls needs a source checkout of Gristmill (deploy/local/certs.sh)")
        subprocess.run([str(script), str(self.certs_dir)], check=True, stdout=subprocess.DEVNULL)
        return self.certs_dir

    def client_tls(self) -> TlsSettings | None:
        """The ``client`` certificate (for health checks, the CLI and tests) with ``tls``, else None."""
        if not self.tls:
            return None
        files = tls_files(self.certs_dir, "client")
        return TlsSettings(
            cert_file=Path(files["GRISTMILL_TLS_CERT_FILE"]),
            key_file=Path(files["GRISTMILL_TLS_KEY_FILE"]),
            ca_file=Path(files["GRISTMILL_TLS_CA_FILE"]),
        )

    def process_env(self, proc: ServiceProcess) -> dict[str, str]:
        """What one process gets on top of ``env()``: with ``tls``, its own certificate (``GRISTMILL_TLS_*``); a
        serving replica beyond the first, its id, port and data dir (the serving database, registry address and
        consumer group setting stay the first serving process's)."""
        env: dict[str, str] = {}
        if self.tls:
            certificate = "serving" if proc.name.startswith(_REPLICA_PREFIX) else proc.name
            env |= tls_files(self.certs_dir, certificate)
        if not proc.name.startswith(_REPLICA_PREFIX):
            return env
        return env | {
            "GRISTMILL_SERVING_REPLICA": proc.name.removeprefix("serving-"),
            "GRISTMILL_SERVING_GRPC_PORT": str(self._replica_port(proc)),
            "GRISTMILL_SERVING_DATA_DIR": str(self.run_dir / "services" / proc.name),
        }

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
        kafka_port = os.environ.get("GRISTMILL_KAFKA_PORT", str(KAFKA_PORT))
        s3_port = os.environ.get("GRISTMILL_S3_PORT", str(S3_PORT))
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
            "GRISTMILL_LABELING_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
            "GRISTMILL_TRAINING_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
            # The local stack runs on the user's own machine: base models import from its directories and files.
            "GRISTMILL_REGISTRY_ALLOW_LOCAL_PATHS": "true",
            # Services verify API keys at the admin service (once they have auth wired).
            "GRISTMILL_AUTH_ADMIN_ADDRESS": f"127.0.0.1:{ports['admin']}",
        }
        for name in SERVICES:
            env[f"GRISTMILL_{name.upper()}_GRPC_PORT"] = str(ports[name])
            env[f"GRISTMILL_{name.upper()}_DATA_DIR"] = str(self.run_dir / "services" / name)
        env |= self.database_urls()
        if self.group_suffix:
            from gristmill.core.events.topics import CONSUMER_GROUPS

            env |= {group.variable: f"{group.default}-{self.group_suffix}" for group in CONSUMER_GROUPS}
        return env

    def database_names(self) -> dict[str, str]:
        """Each service's database on the stack's PostgreSQL: ``gristmill_<service>_<run dir digest>``.

        The run directory is what makes an installation (its pid files, logs and the admin's root key live
        there; ``up`` again with other flags is the same installation), so it names the databases: the same
        run directory always finds its databases, and two never share one.
        """
        digest = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:8]
        return {service: f"gristmill_{service}_{digest}" for service in SERVICES}

    def postgres_url(self, database: str = "postgres") -> str:
        """The stack's PostgreSQL (deploy/local/postgres.sh): role gristmill, trust on loopback."""
        port = os.environ.get("GRISTMILL_POSTGRES_PORT", str(POSTGRES_PORT))
        return f"postgresql+psycopg://gristmill@127.0.0.1:{port}/{database}"

    def database_urls(self) -> dict[str, str]:
        """``GRISTMILL_<SERVICE>_DATABASE_URL`` of each service: one given in the environment is kept, else the
        service's own database on the stack's PostgreSQL."""
        urls = {}
        for service, database in self.database_names().items():
            variable = f"GRISTMILL_{service.upper()}_DATABASE_URL"
            urls[variable] = os.environ.get(variable) or self.postgres_url(database)
        return urls

    def create_databases(self) -> list[str]:
        """Create the services' databases that do not exist yet on the stack's PostgreSQL (each service's
        migrations then make its tables at start); returns the ones created.

        A new admin database makes a new root key at the admin's first start, which it writes only where no
        file is (it never overwrites a secret): a key file left from a database that is gone (the stack was
        cleaned) is removed first, as it opens nothing any more.
        """
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import OperationalError, ProgrammingError

        ours = self.postgres_url()
        wanted = {
            service: name
            for service, name in self.database_names().items()
            if os.environ.get(f"GRISTMILL_{service.upper()}_DATABASE_URL") is None
        }
        engine = create_engine(ours, isolation_level="AUTOCOMMIT")
        created = []
        try:
            with engine.connect() as conn:
                existing = set(conn.execute(text("SELECT datname FROM pg_database")).scalars())
                for service, name in wanted.items():
                    if name in existing:
                        continue
                    try:
                        conn.execute(text(f'CREATE DATABASE "{name}"'))
                    except ProgrammingError:  # made meanwhile by another `gristmill up`
                        continue
                    created.append(name)
                    if service == "admin":
                        self.root_key_file().unlink(missing_ok=True)
        except OperationalError as exc:
            raise UnavailableError(
                f"the stack's PostgreSQL is not reachable at {ours} ({str(exc.orig).strip().splitlines()[0]}): "
                "start it with deploy/local/stack.sh up"
            ) from None
        finally:
            engine.dispose()
        return created

    def drop_databases(self) -> list[str]:
        """Drop this installation's databases (a test's installation, when it is done); returns those dropped."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.postgres_url(), isolation_level="AUTOCOMMIT")
        dropped = []
        try:
            with engine.connect() as conn:
                existing = set(conn.execute(text("SELECT datname FROM pg_database")).scalars())
                for name in self.database_names().values():
                    if name in existing:
                        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
                        dropped.append(name)
        finally:
            engine.dispose()
        return dropped

    def consumer_groups(self) -> dict[str, tuple[str, ...]]:
        """This installation's consumer groups and the topics each reads (to start them at the topics' end)."""
        from gristmill.core.events.topics import CONSUMER_GROUPS, SERVING_ALIASES

        env = self.env()
        groups = {env.get(group.variable, group.default): group.topics for group in CONSUMER_GROUPS}
        # Each serving replica beyond the first reads alias changes in a group of its own (ServingSettings).
        serving = env.get(SERVING_ALIASES.variable, SERVING_ALIASES.default)
        for proc in self.replica_processes():
            groups[f"{serving}.{self.process_env(proc)['GRISTMILL_SERVING_REPLICA']}"] = SERVING_ALIASES.topics
        return groups

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
        """PostgreSQL, Kafka and the S3 server (provisioned once, cached; a no-op when they already run)."""
        script = self._root() / "deploy" / "local" / "stack.sh"
        if not script.exists():
            raise UnavailableError("the local stack needs a source checkout of Gristmill (deploy/local/stack.sh)")
        subprocess.run([str(script), "up"], check=True, stdout=subprocess.DEVNULL)

    def start(
        self, timeout_s: float = 180.0, *, on_start: Callable[[ServiceProcess, int], None] | None = None
    ) -> Endpoints:
        """Start every service not running yet and wait until all serve.

        Admin comes first: the others verify API keys there, and they get its root key (written at its first
        start) as their own service key, which they use to read plans and usage for quotas. The services'
        databases are created first (each service migrates its own to head as it starts), and with ``tls`` the
        certificates that are missing.
        """
        self.create_databases()
        if self.tls:
            self.ensure_certificates()
        tls = self.client_tls()
        env = self.env()
        deadline = time.monotonic() + timeout_s
        admin, *others = self.processes()
        pid = admin.start(env | self.process_env(admin))
        if on_start is not None:
            on_start(admin, pid)
        wait_serving(f"127.0.0.1:{self.ports[admin.name]}", timeout_s, process=admin, tls=tls)
        if key := self.root_key():
            env["GRISTMILL_AUTH_SERVICE_KEY"] = key
        for proc in others:
            pid = proc.start(env | self.process_env(proc))
            if on_start is not None:
                on_start(proc, pid)
        for proc in others:
            wait_serving(self.address_of(proc), max(1.0, deadline - time.monotonic()), process=proc, tls=tls)
        console = self.console_process()
        pid = console.start(env | self.console_env(self.console_session_secret()))
        if on_start is not None:
            on_start(console, pid)
        wait_http(f"{self.console_url}/healthz", max(1.0, deadline - time.monotonic()), process=console)
        return self.endpoints

    def stop(self) -> list[tuple[str, bool]]:
        """Stop the services in reverse start order (each drains), every serving replica a pid file names first;
        returns (name, was running)."""
        every = self._service_processes() + self.replica_processes(with_pid_files=True) + [self.console_process()]
        return [(proc.name, proc.stop()) for proc in reversed(every)]
