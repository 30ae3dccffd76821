"""Training on a Ray cluster of several nodes: the training service connects to it by address, a two-worker
data-parallel job runs one worker per node, checkpoints to the S3 server, and resumes on the surviving nodes when
a worker's node dies mid-run.

Nodes (network namespaces, deploy/cluster/): 1 runs the Ray head, the admin and the training service (the Ray
driver); 2 and 3 are Ray worker nodes; 4 runs the S3 server and a Kafka broker. Each Ray node offers one CPU, so
the job's two workers (one CPU each) land on two nodes, and after one of them dies the group can only restart on
the other two.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.cli.processes import wait_serving
from gristmill.cli.tiny_model import make_tiny_llama
from gristmill.core.ports import ADMIN_PORT, TRAINING_PORT
from gristmill.core.settings import S3Settings
from gristmill.core.storage.s3 import S3ObjectStore
from gristmill.training.devtools import chat_rows, chat_vocabulary_text, write_chat_version
from tests.support.cluster import LOCAL, NodeCluster, start_s3, wait_port

pytestmark = pytest.mark.cluster

RAY_PORT = 6379
CHECKPOINT_SETTLE_S = 5.0
VENV_BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY, BUCKET = "gristmill", "gristmill-secret", "gristmill"

# Asks the cluster (from node 1, as a second driver) where the live Ray Train workers are: the GCS's actor table,
# which needs no dashboard.
WORKER_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
actors = ray._private.state.actors().values()
print(json.dumps(sorted(a["Address"]["IPAddress"] for a in actors
                        if "RayTrainWorker" in a["ActorClassName"] and a["State"] == "ALIVE")))
"""


def _ray_env(tmp_path: Path) -> dict[str, str]:
    """Token authentication across the cluster (Ray 2.60 turns it on for a head node; every node and driver then
    needs the same token)."""
    token = tmp_path / "ray-token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def _start_ray(cluster: NodeCluster, tmp_path: Path, run_id: str) -> str:
    head = f"{cluster.ip(1)}:{RAY_PORT}"
    # Short temp dirs: Ray's socket paths must fit in 107 bytes.
    common = ["--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats"]
    cluster.run(
        1,
        [str(VENV_BIN / "ray"), "start", "--head", f"--node-ip-address={cluster.ip(1)}", f"--port={RAY_PORT}",
         "--include-dashboard=false", f"--temp-dir=/tmp/ray-{run_id}-n1", *common],
        env=_ray_env(tmp_path),
    )  # fmt: skip
    for node in (2, 3):
        cluster.run(
            node,
            [str(VENV_BIN / "ray"), "start", f"--address={head}", f"--node-ip-address={cluster.ip(node)}",
             f"--temp-dir=/tmp/ray-{run_id}-n{node}", *common],
            env=_ray_env(tmp_path),
        )  # fmt: skip
    return head


def _worker_nodes(cluster: NodeCluster, tmp_path: Path, head: str) -> list[str]:
    out = cluster.run(1, [sys.executable, "-c", WORKER_NODES, head], env=_ray_env(tmp_path), timeout=120)
    return list(json.loads(out.strip().splitlines()[-1]))


def _service_env(cluster: NodeCluster, tmp_path: Path, kafka: str, s3: str) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
        "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "GRISTMILL_S3_ENDPOINT": s3,
        "GRISTMILL_S3_ACCESS_KEY": ACCESS_KEY,
        "GRISTMILL_S3_SECRET_KEY": SECRET_KEY,
        "GRISTMILL_AUTH_ADMIN_ADDRESS": f"{cluster.ip(1)}:{ADMIN_PORT}",
        "GRISTMILL_ADMIN_HOST": cluster.ip(1),
        "GRISTMILL_ADMIN_DATA_DIR": str(tmp_path / "services" / "admin"),
        "GRISTMILL_TRAINING_HOST": cluster.ip(1),
        "GRISTMILL_TRAINING_DATA_DIR": str(tmp_path / "services" / "training"),
        "GRISTMILL_TRAINING_REGISTRY_ADDRESS": f"{cluster.ip(1)}:1",
        **_ray_env(tmp_path),
    }


def test_a_two_worker_job_spans_two_nodes_and_resumes_on_the_others_when_a_worker_node_dies(
    node_cluster: Callable[..., NodeCluster], tmp_path: Path
) -> None:
    began = time.monotonic()
    cluster = node_cluster(4, name="gr", subnet="10.232.0")
    run_id = uuid.uuid4().hex[:6]
    s3 = start_s3(cluster, 4)
    cluster.run(4, [str(LOCAL / "kafka.sh"), "start"], timeout=240)
    kafka = f"{cluster.ip(4)}:9092"
    head = _start_ray(cluster, tmp_path, run_id)
    env = _service_env(cluster, tmp_path, kafka, s3)
    logs = tmp_path / "logs"
    cluster.spawn(1, [sys.executable, "-m", "gristmill.admin"], logs / "admin.log", env)
    wait_serving(f"{cluster.ip(1)}:{ADMIN_PORT}", 120)
    key = (tmp_path / "services" / "admin" / "root-admin.key").read_text().strip()
    env["GRISTMILL_TRAINING_RAY_ADDRESS"] = head
    env["GRISTMILL_AUTH_SERVICE_KEY"] = key
    cluster.spawn(1, [sys.executable, "-m", "gristmill.training"], logs / "training.log", env)
    training = f"{cluster.ip(1)}:{TRAINING_PORT}"
    wait_port(training, 180, "the training service")
    wait_serving(training, 180)
    print(f"\n4 nodes, S3, Kafka, a 3-node Ray cluster, admin and training up in {time.monotonic() - began:.0f} s")

    objects = S3ObjectStore(
        S3Settings(endpoint=s3, access_key=ACCESS_KEY, secret_key=SecretStr(SECRET_KEY), bucket=BUCKET)
    )
    project = f"cl-{uuid.uuid4().hex[:8]}"
    write_chat_version(
        objects,
        project_id=project,
        dataset_version_id="v1",
        splits={"train": chat_rows(96, 1), "validation": chat_rows(16, 2), "test": chat_rows(16, 3)},
    )
    model = make_tiny_llama(tmp_path / "tiny-llama", [chat_vocabulary_text()], initializer_range=0.5)

    spec = pb.JobSpec(display_name="cluster", registered_model_name="cl-chat", method=pb.TRAINING_METHOD_LORA)
    spec.base_model.local_path = str(model)
    spec.dataset_version.project_id = project
    spec.dataset_version.dataset_version_id = "v1"
    spec.hyper_parameters.learning_rate = 2e-2
    spec.hyper_parameters.per_worker_batch_size = 8
    # 96 conversations over 2 workers in batches of 8: 6 steps an epoch, 48 in all; a checkpoint every 4 steps.
    spec.hyper_parameters.epochs = 8
    spec.hyper_parameters.eval_every_steps = 4
    spec.hyper_parameters.log_every_steps = 2
    spec.resources.num_workers = 2

    metadata = (("authorization", f"Bearer {key}"),)
    channel = grpc.insecure_channel(training)
    stub = pb_grpc.TrainingServiceStub(channel)
    job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec), metadata=metadata, timeout=60)
    killed_node = 0
    placements: list[list[str]] = []
    events: list[pb.JobEvent] = []
    kill_at = 0.0
    resumed_at = 0.0
    restarted = False
    checkpointed_at = 0.0
    try:
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=metadata, timeout=900):
            events.append(event)
            kind = event.WhichOneof("event")
            if kind == "metrics" and event.metrics.step >= 4 and not checkpointed_at:
                checkpointed_at = time.monotonic()
            if (
                kind == "metrics"
                and checkpointed_at
                and time.monotonic() - checkpointed_at >= CHECKPOINT_SETTLE_S
                and (not killed_node)
            ):
                # Past the checkpoint at step 4, which Ray Train's controller has registered by now (it collects the
                # workers' reports every 2 s; a checkpoint reported since its last poll dies with the worker).
                # Find the workers' nodes and kill the one that is not the driver's (node 1 runs the service; its
                # death would end the job, not test its recovery).
                placements.append(_worker_nodes(cluster, tmp_path, head))
                victims = [ip for ip in placements[0] if ip != cluster.ip(1)]
                assert victims, placements
                killed_node = int(victims[0].rsplit(".", 1)[1]) - 10
                kill_at = time.monotonic()
                cluster.kill(killed_node)
                print(f"killed node {killed_node} (workers were on {placements[0]}) at step {event.metrics.step}")
            elif kind == "state_change" and "resumed from the checkpoint" in event.state_change.reason:
                restarted = True
            elif kind == "metrics" and restarted and not resumed_at:
                # The restarted group's first report: its workers are the live ones now.
                resumed_at = time.monotonic()
                placements.append(_worker_nodes(cluster, tmp_path, head))
            if kind == "state_change" and event.state_change.state in (
                pb.JOB_STATE_SUCCEEDED,
                pb.JOB_STATE_FAILED,
                pb.JOB_STATE_CANCELLED,
            ):
                break
        done = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=metadata, timeout=30)
    finally:
        channel.close()

    changes = [e.state_change for e in events if e.WhichOneof("event") == "state_change"]
    print("states:", [(pb.JobState.Name(c.state), c.reason[:120]) for c in changes])
    print("worker nodes before / after the kill:", placements)
    if resumed_at:
        print(f"the restarted workers reported {resumed_at - kill_at:.0f} s after the kill")
    assert done.state == pb.JOB_STATE_SUCCEEDED, (done.state, [c.reason for c in changes], _log_tail(logs))
    assert killed_node in (2, 3)
    # One worker per node, before and after; after the kill, on the two nodes that are left.
    assert len(placements) == 2 and all(len(p) == 2 and len(set(p)) == 2 for p in placements), placements
    assert cluster.ip(killed_node) not in placements[1]
    assert set(placements[1]) == {cluster.ip(n) for n in (1, 2, 3) if n != killed_node}
    assert done.restart_count == 1 and done.progress.step == 48
    resumed = [c.reason for c in changes if "resumed from the checkpoint at step" in c.reason]
    assert resumed, [c.reason for c in changes]
    step = int(resumed[0].split("resumed from the checkpoint at step ")[1].split()[0].rstrip(",.;"))
    assert step >= 4 and step % 4 == 0, resumed[0]
    # The checkpoints and the result are in the S3 server on node 4, which the dead node never held.
    assert objects.exists(done.result.manifest.key)


def _log_tail(logs: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        for log in sorted(logs.glob("*.log"))
    )
