"""Chaos: the whole loop on the real stack while one fault at a time hits it, and a ledger that proves nothing
was lost or done twice.

The stack is the suite's own (PostgreSQL, a Kafka broker and a SeaweedFS server on ports of their own, and a process per
service, as ``gristmill up`` runs them), because faults stop the brokers. Each round runs the demo's loop
(a new project: import, two annotators, publish; then events train, register, promote, serve and send
uncertain predictions back to labeling) and, at a chosen moment of it, one fault:

- ``kafka``: the broker is stopped for 20 s just after the dataset version is published;
- ``s3``: the S3 server is stopped for 20 s while the training job starts;
- ``kill-<service>``: SIGKILL of that service mid-operation, then a restart;
- ``ray-worker``: SIGKILL of the Ray Train worker of the running job;
- ``burst``: 1,000 prediction-logged events for the round's project at once, each published twice (a
  redelivery, same event id), while the loop runs.

After each round the ledger is read through the services' APIs: the published version was trained exactly
once, the job registered exactly once, production moved once per version, serving serves it, the burst made
exactly one item per prediction, every model file matches its checksum in S3, and nothing is left half-way
(no job queued or running, no version PENDING). Recovery is the round's time beyond a fault-free round's.

Run by hand (``make chaos``, ~20 minutes on two cores); it is not part of ``make test``. Results are printed
as a table and written to ``$GRISTMILL_CHAOS_REPORT`` (default ``.run/chaos-report.json``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from opentelemetry import trace

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli.demo import Demo, DemoOptions, Prepared, prepare
from gristmill.cli.platforms import LocalStack
from gristmill.cli.processes import wait_serving
from gristmill.client import ClientOptions, Gristmill
from gristmill.core.events import Event
from gristmill.core.events.kafka import KafkaEventBus
from gristmill.core.events.topics import platform_catalog
from gristmill.core.settings import KafkaSettings
from tests.conftest import REPO_ROOT
from tests.support.services import free_port_block, restart_service

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(5400)]

KAFKA_PORT = int(os.environ.get("GRISTMILL_CHAOS_KAFKA_PORT", "9292"))
S3_PORT = int(os.environ.get("GRISTMILL_CHAOS_S3_PORT", "8533"))
POSTGRES_PORT = int(os.environ.get("GRISTMILL_CHAOS_POSTGRES_PORT", "5633"))
OUTAGE_S = 20.0
BURST = 1000
ROUND_TIMEOUT_S = 900.0
STEP_AUTO_TRAIN = "auto-train"
STEP_ANNOTATE = "two simulated annotators"
STEP_IMPORT = "import with cleaning"
STEP_PROMOTE = "promotion policy moves production"
STEP_PREDICT = "predictions: typed Predict"


@dataclass
class Chaos:
    """The suite's stack: its brokers' environment, the services, a client, and the prepared data."""

    env: dict[str, str]
    local: LocalStack
    gm: Gristmill
    options: DemoOptions
    prepared: Prepared
    work: Path

    def broker(self, component: str, verb: str) -> None:
        subprocess.run(
            [str(REPO_ROOT / "deploy" / "local" / f"{component}.sh"), verb],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=180,
        )

    def pid(self, service: str) -> int:
        return int((self.local.run_dir / "pids" / f"{service}.pid").read_text())


@dataclass
class Ledger:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    half_done: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    fault: str
    completed: bool
    seconds: float
    fault_window: tuple[float, float] | None
    finished_after_fault_s: float | None
    error: str
    ledger: Ledger
    recovery_s: float | None = None


class Steps(io.TextIOBase):
    """The demo's progress output: remembers when each step began (and keeps the text for the report)."""

    def __init__(self, log: Path) -> None:
        self.started: dict[str, float] = {}
        self.loop_ended = False
        self._log = log.open("a", encoding="utf-8")
        self._changed = threading.Condition()

    def write(self, text: str) -> int:
        self._log.write(text)
        self._log.flush()
        for line in text.splitlines():
            if line.startswith("==> "):
                with self._changed:
                    self.started[line[4:].strip()] = time.monotonic()
                    self._changed.notify_all()
        return len(text)

    def end(self) -> None:
        with self._changed:
            self.loop_ended = True
            self._changed.notify_all()

    def wait_for(self, prefix: str, timeout_s: float = ROUND_TIMEOUT_S) -> None:
        def reached() -> bool:
            return any(s.startswith(prefix) for s in self.started)

        with self._changed:
            self._changed.wait_for(lambda: reached() or self.loop_ended, timeout_s)
            assert reached(), f"the loop never reached the step {prefix!r}"


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    given = os.environ.get("GRISTMILL_CHAOS_DIR")
    root = Path(given or tmp_path_factory.mktemp("chaos"))
    # As root, PostgreSQL runs as an unprivileged user that must reach its data directory: pytest's temporary
    # directories (mode 0700) are out of its reach, so the stack's own data goes under the checkout's .run.
    stack_dir = root / "stack" if given else REPO_ROOT / ".run" / "chaos-stack"
    ports = {
        "GRISTMILL_KAFKA_PORT": str(KAFKA_PORT),
        "GRISTMILL_S3_PORT": str(S3_PORT),
        "GRISTMILL_POSTGRES_PORT": str(POSTGRES_PORT),
    }
    env = os.environ | ports | {"GRISTMILL_RUN_DIR": str(stack_dir), "HF_HUB_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in ports}
    # LocalStack reads the servers' ports from the environment.
    os.environ.update(ports)
    local = LocalStack(root / "run", base_port=free_port_block(7))
    stack = REPO_ROOT / "deploy" / "local" / "stack.sh"
    subprocess.run([str(stack), "clean"], env=env, check=True, stdout=subprocess.DEVNULL, timeout=120)
    subprocess.run([str(stack), "up"], env=env, check=True, stdout=subprocess.DEVNULL, timeout=900)
    try:
        local.create_topics()
        local.start()
        gm = Gristmill(
            local.endpoints,
            # Long retries on UNAVAILABLE: a killed service takes seconds to come back.
            ClientOptions(api_key=local.root_key(), timeout_s=60, max_attempts=60, backoff_s=0.5, max_backoff_s=2),
        )
        work = root / "work"
        options = DemoOptions(work_dir=work, items=120, epochs=3, predictions=24, timeout_s=ROUND_TIMEOUT_S)
        prepared = prepare(options)
        # Every round trains the same tiny BERT (built once), at the tiny model's learning rate.
        options = replace(options, base_model=prepared.base_model, learning_rate=3e-3)
        yield Chaos(env, local, gm, options, prepared, work)
        gm.close()
    finally:
        local.stop()
        subprocess.run([str(stack), "down"], env=env, check=False, stdout=subprocess.DEVNULL, timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- faults ---------------------------------------------------------------------------------------------------

Fault = Callable[[Chaos, Steps, Demo], tuple[float, float]]


def no_fault(_c: Chaos, _steps: Steps, _demo: Demo) -> tuple[float, float]:
    now = time.monotonic()
    return now, now


def broker_outage(component: str, step: str, delay_s: float) -> Fault:
    def inject(c: Chaos, steps: Steps, _demo: Demo) -> tuple[float, float]:
        steps.wait_for(step)
        time.sleep(delay_s)
        began = time.monotonic()
        c.broker(component, "stop")
        time.sleep(OUTAGE_S)
        c.broker(component, "start")
        return began, time.monotonic()

    return inject


def job_running(c: Chaos, demo: Demo, timeout_s: float = ROUND_TIMEOUT_S) -> tr.Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in c.gm.training.ListJobs(tr.ListJobsRequest(project_id=demo.project_id)).jobs:
            if job.state == tr.JOB_STATE_RUNNING and job.progress.step > 0:
                return job
        time.sleep(0.2)
    raise AssertionError("no training job of the round started running")


def kill_service(service: str) -> Fault:
    def inject(c: Chaos, steps: Steps, demo: Demo) -> tuple[float, float]:
        if service in ("training", "registry"):
            job_running(c, demo)  # mid-training: the job's state, progress and result events are in flight
        elif service == "labeling":
            steps.wait_for(STEP_ANNOTATE)
            time.sleep(1.0)  # mid-annotation: two annotators submitting
        elif service == "serving":
            steps.wait_for(STEP_PROMOTE)  # the alias change is on its way: serving loads the version
        else:  # admin: keys are verified there (the services cache a verified key for 30 s)
            steps.wait_for(STEP_IMPORT)
        began = time.monotonic()
        restart_service(c.local.run_dir, service)
        wait_serving(f"127.0.0.1:{c.local.ports[service]}", 120)
        return began, time.monotonic()

    return inject


def kill_ray_worker(c: Chaos, _steps: Steps, demo: Demo) -> tuple[float, float]:
    job_running(c, demo)
    time.sleep(2.0)  # past the first checkpoint's chance
    training = psutil.Process(c.pid("training"))
    workers = [
        p
        for p in training.children(recursive=True)
        if any("RayTrainWorker" in part for part in (p.cmdline() or [""])[:1])
    ]
    assert workers, "no Ray Train worker process under the training service"
    began = time.monotonic()
    for worker in workers:
        worker.kill()
    return began, time.monotonic()


def burst(c: Chaos, steps: Steps, demo: Demo) -> tuple[float, float]:
    steps.wait_for(STEP_AUTO_TRAIN)  # the project exists and takes uncertain predictions
    project = c.gm.labeling.GetProject(lb.GetProjectRequest(project_id=demo.project_id))
    catalog = platform_catalog()
    events = []
    for i in range(BURST):
        words = " ".join(uuid.uuid4().hex[j : j + 6] for j in range(0, 30, 6))
        message = events_pb2.PredictionLogged(
            registered_model_name=f"burst-{demo.options.suffix}",
            organization_id=project.organization_id,
            model_version=1,
            deployment_name="burst",
            request_id=f"burst-{i}",
            index_in_request=0,
            masked_text=f"burst review {i}: {words}",
            predicted_label=demo.labels[0],
            predicted_labels=[demo.labels[0]],
            probabilities={label: 1.0 / len(demo.labels) for label in demo.labels},
            uncertain=True,
            labeling_project_id=demo.project_id,
        )
        events.append(Event.create(message, key=demo.options.suffix, source="chaos", catalog=catalog))
    bus = KafkaEventBus(KafkaSettings(bootstrap_servers=f"127.0.0.1:{KAFKA_PORT}"))
    began = time.monotonic()
    try:
        for event in events + events:  # the second time: a redelivery of the same events
            bus.publish(event)
    finally:
        bus.close()
    return began, time.monotonic()


FAULTS: dict[str, Fault] = {
    "none": no_fault,
    "kafka": broker_outage("kafka", STEP_AUTO_TRAIN, 0.0),
    "s3": broker_outage("seaweedfs", STEP_AUTO_TRAIN, 2.0),
    **{f"kill-{s}": kill_service(s) for s in ("labeling", "training", "registry", "serving", "admin")},
    "ray-worker": kill_ray_worker,
    "burst": burst,
}


# -- the ledger -----------------------------------------------------------------------------------------------


def read_ledger(c: Chaos, demo: Demo, fault: str) -> Ledger:
    ledger = Ledger()
    gm = c.gm
    published = demo.summary.get("dataset_version", {}).get("id")
    jobs = list(gm.training.ListJobs(tr.ListJobsRequest(project_id=demo.project_id)).jobs)
    stuck = [j.job_id for j in jobs if j.state in (tr.JOB_STATE_QUEUED, tr.JOB_STATE_RUNNING)]
    ledger.half_done += [f"job {j} still queued or running" for j in stuck]
    if published:
        trained = [j for j in jobs if j.trigger.auto_train_dataset_version_id == published]
        ledger.checked.append(f"dataset version {published}: {len(trained)} auto-train job(s)")
        if not trained:
            ledger.lost.append(f"dataset version {published} never trained")
        ledger.duplicated += [f"dataset version {published} trained again by job {j.job_id}" for j in trained[1:]]
    succeeded = [j.job_id for j in jobs if j.state == tr.JOB_STATE_SUCCEEDED]
    versions = list(
        gm.registry.ListModelVersions(rg.ListModelVersionsRequest(registered_model_name=demo.model)).model_versions
    )
    ledger.half_done += [
        f"model version v{v.version} is {rg.ModelVersionStatus.Name(v.status)}"
        for v in versions
        if v.status == rg.MODEL_VERSION_STATUS_PENDING
    ]
    for job_id in succeeded:
        registered = [v.version for v in versions if v.lineage.training_job_id == job_id]
        ledger.checked.append(f"job {job_id}: registered as {registered}")
        if not registered:
            ledger.lost.append(f"job {job_id} succeeded but was never registered")
        ledger.duplicated += [f"job {job_id} registered again as v{v}" for v in registered[1:]]
    history = list(
        gm.registry.GetAliasHistory(
            rg.GetAliasHistoryRequest(registered_model_name=demo.model, alias="production")
        ).changes
    )
    moved_to = [h.to_version for h in history if h.HasField("to_version")]
    ledger.checked.append(f"production moved to {moved_to}")
    ledger.duplicated += [
        f"production moved to v{v} {moved_to.count(v)} times" for v in set(moved_to) if moved_to.count(v) > 1
    ]
    for v in versions:
        if v.status == rg.MODEL_VERSION_STATUS_READY and v.version not in moved_to:
            ledger.lost.append(f"v{v.version} is READY but production never moved to it")
    ledger.checked += verify_model_files(
        c, demo.model, [v.version for v in versions if v.status == rg.MODEL_VERSION_STATUS_READY], ledger
    )
    if fault == "burst":
        items = prediction_items(c, demo.project_id)
        ids = [i.external_id for i in items if f":burst-{demo.options.suffix}:" in i.external_id]
        ledger.checked.append(f"burst: {len(ids)} items from {BURST} predictions sent twice")
        if len(ids) < BURST:
            ledger.lost.append(f"burst: {BURST - len(ids)} of {BURST} predictions became no item")
        if len(ids) != len(set(ids)) or len(ids) > BURST:
            ledger.duplicated.append(f"burst: {len(ids)} items ({len(set(ids))} distinct) from {BURST} predictions")
    return ledger


def prediction_items(c: Chaos, project_id: str) -> list[lb.Item]:
    items: list[lb.Item] = []
    token = ""
    while True:
        page = c.gm.labeling.ListItems(
            lb.ListItemsRequest(
                project_id=project_id,
                source=lb.ITEM_SOURCE_PREDICTION_LOG,
                page=common_pb2.PageRequest(page_size=500, page_token=token),
            )
        )
        items += page.items
        token = page.next_page_token
        if not token:
            return items


def verify_model_files(c: Chaos, model: str, versions: list[int], ledger: Ledger) -> list[str]:
    """Each file of each READY version, read back from S3, matches the sha256 in its download manifest."""
    from minio import Minio

    s3 = Minio(f"127.0.0.1:{S3_PORT}", access_key="gristmill", secret_key="gristmill-secret", secure=False)
    checked = []
    for version in versions:
        manifest = c.gm.registry.GetDownloadManifest(
            rg.GetDownloadManifestRequest(
                registered_model_name=model, selector=common_pb2.ModelVersionSelector(version=version)
            )
        )
        for f in manifest.files:
            response = s3.get_object("gristmill", f.key)
            try:
                digest = hashlib.sha256(response.read()).hexdigest()
            finally:
                response.close()
                response.release_conn()
            if digest != f.sha256:
                ledger.half_done.append(f"{f.key}: sha256 {digest[:12]} != manifest {f.sha256[:12]}")
        checked.append(f"v{version}: {len(manifest.files)} files match their checksums")
    return checked


# -- the suite ------------------------------------------------------------------------------------------------

RESULTS: dict[str, Outcome] = {}


def run_round(c: Chaos, fault: str) -> Outcome:
    suffix = f"{fault.replace('-', '')[:8]}{uuid.uuid4().hex[:4]}"
    steps = Steps(c.work / f"round-{fault}.log")
    demo = Demo(c.gm, replace(c.options, suffix=suffix), trace.get_tracer("chaos"), steps, c.prepared)
    result: dict[str, Any] = {}

    def loop() -> None:
        try:
            result["summary"] = demo.run()
        except BaseException as exc:  # the round's outcome, reported below
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            steps.end()

    began = time.monotonic()
    thread = threading.Thread(target=loop, name=f"chaos-{fault}", daemon=True)
    thread.start()
    try:
        window = FAULTS[fault](c, steps, demo)
    except AssertionError as exc:  # the fault found no moment to strike: the loop failed before it
        result.setdefault("error", str(exc))
        window = (time.monotonic(), time.monotonic())
    thread.join(ROUND_TIMEOUT_S)
    finished = time.monotonic()
    completed = "summary" in result
    ledger = read_ledger(c, demo, fault)
    # The community edition serves at most two models: each round frees its deployment for the next.
    c.gm.serving.DeleteDeployment(sv.DeleteDeploymentRequest(name=demo.deployment))
    outcome = Outcome(
        fault=fault,
        completed=completed,
        seconds=round(finished - began, 1),
        fault_window=(round(window[0] - began, 1), round(window[1] - began, 1)),
        finished_after_fault_s=round(finished - window[1], 1),
        error=result.get("error", "" if completed else "the loop did not finish in time"),
        ledger=ledger,
    )
    if "none" in RESULTS and fault != "none":
        outcome.recovery_s = round(max(0.0, outcome.seconds - RESULTS["none"].seconds), 1)
    RESULTS[fault] = outcome
    report()
    return outcome


def report() -> None:
    path = Path(os.environ.get("GRISTMILL_CHAOS_REPORT") or REPO_ROOT / ".run" / "chaos-report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: asdict(v) for k, v in RESULTS.items()}, indent=2))
    print("\n| fault | loop completed | round s | fault window s | recovery s | lost | duplicated | half-done |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in RESULTS.values():
        print(
            f"| {o.fault} | {'yes' if o.completed else 'NO'} | {o.seconds} | {o.fault_window} | "
            f"{'' if o.recovery_s is None else o.recovery_s} | {len(o.ledger.lost)} | {len(o.ledger.duplicated)} "
            f"| {len(o.ledger.half_done)} |"
        )


@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_loop_survives_the_fault_with_nothing_lost_or_doubled(chaos: Chaos, fault: str) -> None:
    outcome = run_round(chaos, fault)
    ledger = outcome.ledger
    assert outcome.completed, f"{fault}: {outcome.error}"
    assert not ledger.lost, f"{fault}: lost {ledger.lost}"
    assert not ledger.duplicated, f"{fault}: duplicated {ledger.duplicated}"
    assert not ledger.half_done, f"{fault}: half-done {ledger.half_done}"
