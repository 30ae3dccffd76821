"""Two replicas of labeling, registry and serving, each replica its own process on its own node, sharing their
PostgreSQL databases and consumer groups; one replica's node is killed under load.

Nodes (network namespaces, deploy/cluster/): 1 runs PostgreSQL (trusting the cluster's subnet), a Kafka broker
and the S3 server; 2 the admin service (API keys, usage); 3 and 4 one replica each of labeling, registry and
serving (six processes). The test shows:

a. events handled once across replicas: training's ``JobStateChanged`` (SUCCEEDED) events, published straight to
   Kafka, are consumed by the two registry replicas in one group: each job becomes exactly one model version in
   the shared database, and the replicas' logs say which replica registered which (none twice);
b. each serving replica hot-swaps when the deployment's alias moves (each asked directly at its own address);
c. load through ONE round-robin SDK channel over both serving replicas, node 3 killed mid-load (its labeling,
   registry and serving at once): failed requests counted against those in flight at the kill; labeling calls
   through a round-robin channel keep working after the kill;
d. the admin's usage for the load's API key equals the predictions the client saw answered.

It prints what it measured on lines starting ``REPLICAS:``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from gristmill.api.admin.v1 import admin_pb2
from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.labeling.v1 import labeling_pb2
from gristmill.api.registry.v1 import registry_pb2
from gristmill.api.serving.v1 import serving_pb2
from gristmill.api.training.v1 import training_pb2
from gristmill.cli.processes import wait_serving
from gristmill.client import ClientOptions, Endpoints, Gristmill
from gristmill.core.errors import GristmillError
from gristmill.core.events import Event, KafkaEventBus
from gristmill.core.events.topics import platform_catalog
from gristmill.core.ports import ADMIN_PORT, LABELING_PORT, REGISTRY_PORT, SERVING_PORT
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.core.storage.s3 import S3ObjectStore
from tests.support.cluster import LOCAL, NodeCluster, start_s3, wait_port
from tests.support.job_output import upload_job_output
from tests.support.tiny_model import make_tiny_bert

pytestmark = pytest.mark.cluster

ACCESS_KEY, SECRET_KEY, BUCKET = "gristmill", "gristmill-secret", "gristmill"
POSTGRES_PORT = 5433
REPLICA_NODES = (3, 4)
REPLICATED = ("labeling", "registry", "serving")
JOBS = 12  # JobStateChanged events for the registry replicas
LOAD_S = 24.0
KILL_AT_S = 10.0
CLIENTS = 6
LABELS = ["negative", "positive"]
TEXTS = [
    "the food was great and the staff were lovely",
    "terrible service and cold food",
    "not bad at all",
    "boring and far too long",
]
SIGNATURE = common_pb2.ModelSignature(
    inputs=[common_pb2.TensorSpec(name="text", datatype="BYTES", shape=[-1])],
    outputs=[
        common_pb2.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
        common_pb2.TensorSpec(name="label", datatype="BYTES", shape=[-1]),
        common_pb2.TensorSpec(name="label_index", datatype="INT64", shape=[-1]),
    ],
)


def report(line: str) -> None:
    print(f"REPLICAS: {line}", flush=True)


def _pg(cluster: NodeCluster, database: str) -> str:
    return f"postgresql+psycopg://gristmill@{cluster.ip(1)}:{POSTGRES_PORT}/{database}"


def _start_infrastructure(cluster: NodeCluster) -> tuple[str, str]:
    """PostgreSQL (trusting the subnet), a Kafka broker and S3 on node 1, together; (kafka, s3)."""
    with ThreadPoolExecutor(3) as pool:
        postgres = pool.submit(
            cluster.run,
            1,
            [str(LOCAL / "postgres.sh"), "start"],
            {"GRISTMILL_POSTGRES_TRUST_CIDR": f"{cluster.subnet}.0/24"},
            240,
        )
        kafka = pool.submit(cluster.run, 1, [str(LOCAL / "kafka.sh"), "start"], None, 240)
        s3 = pool.submit(start_s3, cluster, 1)
        postgres.result()
        kafka.result()
        s3_endpoint = s3.result()
    engine = create_engine(_pg(cluster, "postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for service in REPLICATED:
            conn.execute(text(f'CREATE DATABASE "gristmill_{service}"'))
    engine.dispose()
    return f"{cluster.ip(1)}:9092", s3_endpoint


def _base_env(cluster: NodeCluster, kafka: str, s3: str) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "GRISTMILL_S3_ENDPOINT": s3,
        "GRISTMILL_S3_ACCESS_KEY": ACCESS_KEY,
        "GRISTMILL_S3_SECRET_KEY": SECRET_KEY,
        "GRISTMILL_AUTH_ADMIN_ADDRESS": f"{cluster.ip(2)}:{ADMIN_PORT}",
    }


def _replica_env(cluster: NodeCluster, node: int, tmp_path: Path) -> dict[str, str]:
    """One node's replicas: bound to the node's address, the shared databases, the node's own registry replica
    (serving loads models through it; labeling asks it about models), serving's replica id."""
    ip = cluster.ip(node)
    env = {
        "GRISTMILL_SERVING_REPLICA": f"n{node}",
        "GRISTMILL_SERVING_REGISTRY_ADDRESS": f"{ip}:{REGISTRY_PORT}",
        "GRISTMILL_LABELING_REGISTRY_ADDRESS": f"{ip}:{REGISTRY_PORT}",
        # Torch's threads: two serving replicas and everything else share 2 cores.
        "GRISTMILL_SERVING_BATCH_WORKERS": "1",
    }
    for service in REPLICATED:
        prefix = f"GRISTMILL_{service.upper()}"
        env[f"{prefix}_HOST"] = ip
        env[f"{prefix}_DATA_DIR"] = str(tmp_path / "services" / f"n{node}" / service)
        env[f"{prefix}_DATABASE_URL"] = _pg(cluster, f"gristmill_{service}")
    return env


def _job_succeeded(job_id: str, model: str, prefix: str, manifest: common_pb2.ObjectRef) -> events_pb2.JobStateChanged:
    return events_pb2.JobStateChanged(
        job_id=job_id,
        state=training_pb2.JOB_STATE_SUCCEEDED,
        previous_state=training_pb2.JOB_STATE_RUNNING,
        registered_model_name=model,
        artifact_prefix=prefix,
        manifest=manifest,
        signature=SIGNATURE,
        task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
        label_map=common_pb2.LabelMap(labels=LABELS),
        lineage=common_pb2.Lineage(
            training_job_id=job_id,
            dataset_version=common_pb2.DatasetVersionRef(project_id="reviews", dataset_version_id="dv-1"),
        ),
    )


def _eventually(what: str, check: Callable[[], bool], timeout_s: float, every_s: float = 0.5) -> float:
    """Seconds until ``check()`` held (exceptions count as not yet), else AssertionError naming ``what``."""
    began = time.monotonic()
    last: object = None
    while time.monotonic() - began < timeout_s:
        try:
            if check():
                return time.monotonic() - began
        except Exception as exc:  # a replica still loading, a row not yet written
            last = exc
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last error: {last})")


def _predicted_version(client: Gristmill, deployment: str) -> int:
    response = client.serving.Predict(serving_pb2.PredictRequest(model=deployment, texts=[TEXTS[0]]), timeout=10)
    return int(response.model_version)


class _Retries(logging.Handler):
    """Counts the SDK's UNAVAILABLE retries (its INFO line per retry)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "unavailable (attempt" in record.getMessage():
            self.count += 1


def test_two_replicas_per_service_survive_one_node_killed_under_load(
    node_cluster: Callable[..., NodeCluster], tmp_path: Path
) -> None:
    began = time.monotonic()
    # PostgreSQL runs as an unprivileged user: it must reach node 1's run dir, under pytest's mode-0700 dirs.
    for directory in (tmp_path, *tmp_path.parents):
        if directory == Path("/tmp") or directory == directory.parent:
            break
        directory.chmod(directory.stat().st_mode | 0o005)
    cluster = node_cluster(4, name="rp", subnet="10.233.0")
    run = uuid.uuid4().hex[:6]
    kafka, s3 = _start_infrastructure(cluster)
    base = _base_env(cluster, kafka, s3)
    logs = tmp_path / "logs"
    cluster.spawn(
        2,
        [sys.executable, "-m", "gristmill.admin"],
        logs / "admin.log",
        base | {"GRISTMILL_ADMIN_HOST": cluster.ip(2), "GRISTMILL_ADMIN_DATA_DIR": str(tmp_path / "services/admin")},
    )
    admin_address = f"{cluster.ip(2)}:{ADMIN_PORT}"
    wait_port(admin_address, 120, "the admin service")
    wait_serving(admin_address, 120)
    root_key = (tmp_path / "services" / "admin" / "root-admin.key").read_text().strip()
    base["GRISTMILL_AUTH_SERVICE_KEY"] = root_key
    ports = {"labeling": LABELING_PORT, "registry": REGISTRY_PORT, "serving": SERVING_PORT}
    for node in REPLICA_NODES:
        env = base | _replica_env(cluster, node, tmp_path)
        for service in REPLICATED:
            cluster.spawn(node, [sys.executable, "-m", f"gristmill.{service}"], logs / f"{service}-n{node}.log", env)
    for node in REPLICA_NODES:
        for service in REPLICATED:
            address = f"{cluster.ip(node)}:{ports[service]}"
            wait_port(address, 240, f"{service} on node {node}")
            wait_serving(address, 240)
    report(
        f"4 nodes, PostgreSQL/Kafka/S3, admin and 2 x (labeling, registry, serving) up in "
        f"{time.monotonic() - began:.0f} s"
    )

    def addresses(service: str, nodes: tuple[int, ...] = REPLICA_NODES) -> str:
        return ",".join(f"{cluster.ip(k)}:{ports[service]}" for k in nodes)

    options = ClientOptions(api_key=root_key, timeout_s=30, tls=None)
    every = Endpoints(
        labeling=addresses("labeling"),
        registry=addresses("registry"),
        serving=addresses("serving"),
        admin=admin_address,
    )
    direct = {
        node: Gristmill(Endpoints(serving=addresses("serving", (node,)), admin=admin_address), options)
        for node in REPLICA_NODES
    }

    # a. JobStateChanged events, one registry consumer group of two replicas: one version per job.
    objects = S3ObjectStore(
        S3Settings(endpoint=s3, access_key=ACCESS_KEY, secret_key=SecretStr(SECRET_KEY), bucket=BUCKET)
    )
    model_dir = make_tiny_bert(tmp_path / "tiny", TEXTS, LABELS)
    model = f"rp-{run}"
    jobs = [f"{run}-job-{i:02d}" for i in range(JOBS)]
    catalog = platform_catalog()
    published = time.monotonic()
    with KafkaEventBus(KafkaSettings(bootstrap_servers=kafka)) as bus:
        for job in jobs:
            manifest = upload_job_output(objects, model_dir, f"jobs/{job}")
            event = Event.create(
                _job_succeeded(job, model, f"jobs/{job}", manifest), key=job, source="training", catalog=catalog
            )
            bus.publish(event)
        bus.flush(30)
    registry_db = create_engine(_pg(cluster, "gristmill_registry"))

    def versions() -> list[tuple[str, str, int]]:
        with registry_db.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT v.training_job_id, v.status, v.version FROM registry_versions v "
                    "JOIN registry_models m ON m.id = v.model_id WHERE m.name = :name ORDER BY v.version"
                ),
                {"name": model},
            ).all()
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    _eventually(
        "every job registered", lambda: len(versions()) >= JOBS and all(s == "READY" for _, s, _ in versions()), 180
    )
    registered_s = time.monotonic() - published
    rows = versions()
    per_job = Counter(job for job, _, _ in rows)
    handled_by = {
        node: len(re.findall(rf"job {run}-job-\d+ registered as", (logs / f"registry-n{node}.log").read_text()))
        for node in REPLICA_NODES
    }
    again = {
        node: len(re.findall(rf"job {run}-job-\d+ is already registered", (logs / f"registry-n{node}.log").read_text()))
        for node in REPLICA_NODES
    }
    report(
        f"a. {JOBS} JobStateChanged events -> {len(rows)} versions in the shared registry database "
        f"({len(per_job)} distinct jobs, max {max(per_job.values())} per job) in {registered_s:.1f} s; "
        f"registered by replica n3: {handled_by[3]}, n4: {handled_by[4]}; redelivered (already registered) n3: "
        f"{again[3]}, n4: {again[4]}"
    )
    assert sorted(per_job) == sorted(jobs) and set(per_job.values()) == {1}
    assert sum(handled_by.values()) == JOBS, handled_by

    # b. A deployment following "production" (v1), then the alias moves to v2: each serving replica swaps.
    v1, v2 = rows[0][2], rows[1][2]
    deployment = f"rp-{run}"
    with Gristmill(every, options) as gm:
        gm.registry.SetAlias(registry_pb2.SetAliasRequest(registered_model_name=model, alias="production", version=v1))
        created = direct[3].serving.CreateDeployment(
            serving_pb2.CreateDeploymentRequest(
                deployment=serving_pb2.Deployment(name=deployment, registered_model_name=model),
                wait_until_ready=True,
            ),
            timeout=180,
        )
        assert created.status.state == serving_pb2.DEPLOYMENT_STATE_READY, created.status.message
        for node in REPLICA_NODES:
            _eventually(
                f"node {node} serves v{v1}", lambda n=node: _predicted_version(direct[n], deployment) == v1, 180
            )
        moved_at = time.monotonic()
        gm.registry.SetAlias(registry_pb2.SetAliasRequest(registered_model_name=model, alias="production", version=v2))
        swapped = {}
        for node in REPLICA_NODES:
            _eventually(
                f"node {node} swaps to v{v2}", lambda n=node: _predicted_version(direct[n], deployment) == v2, 120, 0.1
            )
            swapped[node] = time.monotonic() - moved_at
        report(
            f"b. alias production v{v1} -> v{v2}: replica n3 answered v{v2} after {swapped[3]:.1f} s, n4 after "
            f"{swapped[4]:.1f} s (each asked at its own address)"
        )

        # The load's own key, so that its usage is counted apart.
        made = gm.admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(display_name=f"load-{run}", scopes=["serving:predict", "labeling:write"])
        )
        project = gm.labeling.CreateProject(
            labeling_pb2.CreateProjectRequest(
                display_name=f"rp {run}",
                task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
                labels=[labeling_pb2.LabelDefinition(name=label) for label in LABELS],
            )
        )

    # c. Load through one round-robin channel over both serving replicas; node 3 dies mid-load.
    retries = _Retries()
    channel_log = logging.getLogger("gristmill.client.channel")
    channel_log.addHandler(retries)
    channel_log.setLevel(logging.INFO)
    load = Gristmill(every, ClientOptions(api_key=made.secret, timeout_s=10, tls=None))
    lock = threading.Lock()
    in_flight = 0
    ok_before: list[int] = []
    ok_after: list[int] = []
    failures: list[str] = []
    stop = threading.Event()
    killed = threading.Event()

    def client(index: int) -> None:
        nonlocal in_flight
        while not stop.is_set():
            with lock:
                in_flight += 1
                after = killed.is_set()
            try:
                response = load.serving.Predict(
                    serving_pb2.PredictRequest(model=deployment, texts=[TEXTS[index % len(TEXTS)]])
                )
                (ok_after if after else ok_before).append(response.model_version)
            except GristmillError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                with lock:
                    in_flight -= 1

    def served(node: int) -> int:
        """Requests replica ``node`` answered for the deployment so far (its own, in-memory counters)."""
        got = direct[node].serving.GetDeployment(serving_pb2.GetDeploymentRequest(name=deployment), timeout=5)
        return sum(v.request_count for v in got.status.versions)

    served_at_start = {node: served(node) for node in REPLICA_NODES}
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    load_began = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(KILL_AT_S)
    spread = {node: served(node) - served_at_start[node] for node in REPLICA_NODES}
    with lock:
        in_flight_at_kill = in_flight
        killed.set()
    retries_before_kill = retries.count
    cluster.kill(3)
    time.sleep(max(0.0, LOAD_S - (time.monotonic() - load_began)))
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    load.close()
    channel_log.removeHandler(retries)
    report(
        f"c. {CLIENTS} clients, {LOAD_S:.0f} s through one round_robin channel over 2 serving replicas; node 3 "
        f"killed at {KILL_AT_S:.0f} s with {in_flight_at_kill} calls in flight: {len(ok_before)} answered before "
        f"the kill (replica n3 had served {spread[3]}, n4 {spread[4]} just before it), {len(ok_after)} after (all "
        f"by n4), {len(failures)} failed; the SDK retried "
        f"{retries.count - retries_before_kill} UNAVAILABLE calls after the kill"
    )
    assert len(failures) <= in_flight_at_kill, failures[:5]
    assert ok_before and ok_after and set(ok_after) == {v2}
    assert spread[3] > 0 and spread[4] > 0, spread

    # Labeling through its round-robin channel after the kill: the project (made before, in the shared
    # database) is found, and writes work.
    labeling_ok = labeling_failed = 0
    with Gristmill(every, ClientOptions(api_key=made.secret, timeout_s=10, tls=None)) as gm:
        for i in range(10):
            try:
                found = gm.labeling.GetProject(labeling_pb2.GetProjectRequest(project_id=project.project_id))
                assert found.project_id == project.project_id
                gm.labeling.CreateProject(
                    labeling_pb2.CreateProjectRequest(
                        display_name=f"rp {run} after {i}",
                        task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
                        labels=[labeling_pb2.LabelDefinition(name=label) for label in LABELS],
                    )
                )
                labeling_ok += 1
            except GristmillError:
                labeling_failed += 1
    report(
        f"c. labeling after the kill, through round_robin over both replicas: {labeling_ok} of 10 "
        f"(GetProject + CreateProject) succeeded, {labeling_failed} failed"
    )
    assert labeling_failed == 0

    # d. The admin's usage for the load's key: one prediction per answered call.
    answered = len(ok_before) + len(ok_after)
    usage: list[float] = [0.0]

    def counted() -> bool:
        got = direct[4].metering.GetUsage(
            admin_pb2.GetUsageRequest(api_key_id=made.api_key.api_key_id, kinds=[admin_pb2.USAGE_KIND_PREDICTIONS])
        )
        usage[0] = sum(t.quantity for t in got.totals)
        return usage[0] >= answered

    with contextlib.suppress(AssertionError):  # reported (and asserted) below
        _eventually("usage counted", counted, 60, 1.0)
    time.sleep(3)  # anything counted twice would arrive too
    counted()
    report(
        f"d. usage for the load's key: {usage[0]:.0f} predictions counted, {answered} answered to the client "
        f"({max(0.0, answered - usage[0]):.0f} lost, {max(0.0, usage[0] - answered):.0f} counted beyond the answers)"
    )
    assert usage[0] >= answered
    assert usage[0] - answered <= in_flight_at_kill
    for client_ in direct.values():
        client_.close()
    registry_db.dispose()
