"""Jobs as Ray Train ``TorchTrainer`` runs, driven from a thread of the service.

Progress: rank 0 pushes records to a long-lived ``ProgressHub`` actor (0 CPUs), keyed by job, which the run's
driver thread drains as they arrive (a long poll); ``trainer.fit()`` in a thread of its own; checkpoints in the
object store through ``RunConfig(storage_path, storage_filesystem)``; ``FailureConfig(max_failures)`` restarts the
worker group from the latest checkpoint. Cancelling aborts the run's controller (its handle is registered on the
hub by a controller callback as soon as the controller starts)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.fs  # type: ignore[import-untyped]
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig

from gristmill.core.errors import UnavailableError
from gristmill.core.settings import S3Settings
from gristmill.training.domain.resolve import ClusterCapacity
from gristmill.training.domain.runs import (
    LOOP_REPORT_FILE,
    RunCancelledError,
    RunFailedError,
    RunListener,
    RunOutcome,
    RunRequest,
    RunUnavailableError,
)
from gristmill.training.domain.spec import Resources
from gristmill.training.ml.loop import FaultInjection, LoopConfig, train_loop
from gristmill.training.runner.failures import describe_failure, storage_unreachable
from gristmill.training.runner.local_ray import (
    SessionWatchdog,
    owner_record,
    read_record,
    remove_record,
    session_processes,
    stop_predecessor,
    write_record,
)
from gristmill.training.runner.progress import ProgressHub, RegisterController, RunChannel
from gristmill.training.runner.torch_backend import SealedConfig
from gristmill.training.runner.trainer import GristmillTorchTrainer, scaling_config
from gristmill.training.runner.warm import WarmPool, worker_runtime_env, worker_threads

log = logging.getLogger(__name__)

# Environment of every Ray worker: no model hub (none is reachable or needed), and no tokenizer thread pool
# competing with torch's threads for the worker's CPUs.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}

# The local cluster is a few processes beside the service on one machine, where every idle process's timers
# take CPU from training (each Ray worker process wakes ~150 times a second). So, for it only: no pooled
# worker processes started ahead of tasks (jobs run in actors, and an actor takes an idle process only if its
# runtime environment is the actor's: ``warm.WarmPool`` starts the one a run's worker takes), no Ray metrics
# (nothing scrapes them without Ray's dashboard), and no watcher for preempted cloud nodes.
LOCAL_SYSTEM_CONFIG = {
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
    "enable_metrics_collection": False,
}
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# How often a driving run looks for placement groups a dead controller left (``release_orphaned_placement_groups``).
ORPHAN_CHECK_S = 5.0
# The longest a driver's long poll of the progress hub waits for a record.
HUB_WAIT_S = 5.0


def batch_scheduling() -> None:
    """Put the calling thread, and every process it starts from now on, under Linux's SCHED_BATCH policy.

    A local cluster is a dozen Ray processes, each waking on timers (every Ray worker's main thread checks for
    signals every 10 ms, hard-coded in Ray's core worker). Under the default policy each wakeup preempts a
    training thread at once, and with torch's threads meeting at a barrier every operation, one preempted thread
    stalls them all: the training worker was preempted ~500 times a second, a plain loop ~26. SCHED_BATCH
    keeps the same fair share of CPU (same weights, same nice values) but a waking batch thread never preempts
    a running one; it waits for the next tick or an idle core. Children inherit the policy, so the GCS, the
    raylet and every worker, training ones included, run under it. A cluster of several machines (by address)
    is left as it is: its processes are not ours to schedule. Where the policy does not exist (not Linux) or
    is refused, the cluster runs with the default.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:
        log.info("local Ray cluster keeps the default scheduling policy: %s", exc)


def release_orphaned_placement_groups() -> list[str]:
    """Remove the placement groups whose creating actor has died, and return their ids.

    A Ray Train run reserves its workers' CPUs in a placement group its controller actor creates. A controller that
    dies without shutting down (its Ray Tune trial stopped early by ASHA: the trial's actors die with it) leaves
    that group behind, holding its CPUs until the driver ends, because a group outlives a non-detached creator
    while the creator's job runs. Ray Train starts a ``PlacementGroupCleaner`` for exactly this, but it asks Ray's
    state API whether the controller lives, which needs the dashboard a local cluster here does not run: it
    never decides, and the next two-worker run waited for CPUs forever (``GristmillTorchTrainer`` no longer starts
    it). The GCS itself knows whether a group's creator is dead; a group whose creator is dead has nobody left to
    use it. Groups a driver creates (Ray Tune's own, per trial) have no creating actor and are never touched, nor
    are detached ones.
    """
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table_data: Any = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]  # generated, untyped
    released: list[str] = []
    accessor = ray._private.state.state._connect_and_get_accessor()
    for raw in accessor.get_placement_group_table():
        group = table_data.FromString(raw)
        if group.state == table_data.REMOVED or group.is_detached:
            continue
        if not group.creator_actor_dead or ray.ActorID(group.creator_actor_id).is_nil():
            continue
        group_id = ray.PlacementGroupID(group.placement_group_id)
        try:
            remove_placement_group(PlacementGroup(group_id))
        except Exception:  # removed meanwhile by its own controller's shutdown
            log.debug("removing orphaned placement group %s failed", group_id.hex(), exc_info=True)
            continue
        released.append(group_id.hex())
    if released:
        log.warning("released %d placement group(s) left by a dead Ray Train controller: %s", len(released), released)
    return released


class RayCluster:
    """The Ray cluster jobs run on: a local one started with bounded CPUs, or an existing one by address.

    ``ray.init`` is process-wide: a cluster already initialised in this process (a test's) is used as is
    and left running by ``stop``. A local cluster this process starts is watched (``local_ray``): its processes
    are stopped when this process ends, however it ends, and, with a ``state_dir``, by the next service on that
    directory should they outlive the watchdog too.
    """

    def __init__(
        self,
        *,
        address: str = "",
        num_cpus: int = 2,
        num_gpus: int | None = None,
        log_to_driver: bool = False,
        object_store_mb: int = 512,
        start_wait_s: float = 20.0,
        retry_backoff_s: float = 5.0,
        max_backoff_s: float = 60.0,
        state_dir: Path | None = None,
        warm_workers: int = 1,
    ) -> None:
        self.address = address
        # Warm train-worker processes kept in an idle local cluster (``warm.WarmPool``); 0: none.
        self.warm_workers = warm_workers
        self.warm_pool: WarmPool | None = None
        # Where a local cluster is recorded while it runs (``local_ray.RECORD_FILE``), so that the next service on
        # this data directory stops what it left if this process dies with its watchdog; None: not recorded.
        self.state_dir = state_dir
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.log_to_driver = log_to_driver
        self.object_store_mb = object_store_mb
        # How long a caller (a job, a capacity check) waits for a start in progress before it is UNAVAILABLE:
        # shorter than a client's deadline, so that the client gets a status it retries.
        self.start_wait_s = start_wait_s
        self.retry_backoff_s = retry_backoff_s
        self.max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._owned = False
        self._started = False
        self._release = threading.Event()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._starter: threading.Thread | None = None
        self._watchdog: SessionWatchdog | None = None
        self.session_dir = ""
        self.last_failure = ""
        self.attempts = 0

    def start(self) -> None:
        """Start or connect (idempotent, thread-safe); ``UnavailableError`` with the reason when Ray is not up.

        While a background start (``start_in_background``) is trying, this waits for it (at most
        ``start_wait_s``) instead of starting a second time; otherwise it makes one attempt itself.
        """
        if self._started:
            return
        starter = self._starter
        if starter is not None and starter.is_alive():
            if self._ready.wait(self.start_wait_s) and self._started:
                return
            raise UnavailableError(
                f"the Ray cluster ({self._where()}) is not up yet: {self.last_failure or 'still starting'}; the "
                "training service keeps trying in the background, so try again shortly"
            )
        self._start_once()

    def _where(self) -> str:
        return self.address or f"local, {self.num_cpus} CPUs"

    def _start_once(self) -> None:
        """One attempt. ``ray.init`` runs on a thread of its own that lives until ``stop``: a local cluster's GCS
        and raylet are started with PR_SET_PDEATHSIG, which kills them when the *thread* that started them ends
        (not the process), so starting Ray on a short-lived thread (a background start, a worker thread) would
        leave the cluster dead a moment later ("Failed to connect to GCS within 60 seconds")."""
        with self._lock:
            if self._started:
                return
            if ray.is_initialized():
                self._started = True
                self._ready.set()
                return
            began = time.monotonic()
            self.attempts += 1
            log.info("starting Ray: %s", self._where())
            ready = threading.Event()
            failure: list[BaseException] = []

            def own() -> None:
                try:
                    self._init()
                except BaseException as exc:
                    failure.append(exc)
                    return
                finally:
                    ready.set()
                self._release.wait()

            self._release.clear()
            threading.Thread(target=own, name="ray-owner", daemon=True).start()
            ready.wait()
            if failure:
                self.last_failure = f"{type(failure[0]).__name__}: {' '.join(str(failure[0]).split())}"[:500]
                # Whatever the failed attempt started (a GCS without its port file, a raylet) goes before the next.
                try:
                    ray.shutdown()
                except Exception:
                    log.debug("cleaning up after a failed Ray start failed", exc_info=True)
                self._release_local()
                raise UnavailableError(f"the Ray cluster ({self._where()}) could not start: {self.last_failure}")
            self._started = True
            self.last_failure = ""
            self._ready.set()
            log.info("Ray ready in %.1fs: %s", time.monotonic() - began, ray.cluster_resources())  # type: ignore[no-untyped-call]

    def _init(self) -> None:
        if self.address:
            ray.init(address=self.address, log_to_driver=self.log_to_driver, runtime_env={"env_vars": WORKER_ENV})
            return
        # Ray waits 30 s for its new GCS to write its port file; on two cores busy starting the other services
        # that was sometimes too short (the start failed with "Timed out waiting for file .../gcs_server_port").
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        if self.state_dir is not None:
            # A predecessor killed with its watchdog (SIGKILL to every process, an OOM kill) left its cluster.
            stop_predecessor(self.state_dir)
        batch_scheduling()  # before the cluster's processes start: they inherit it from this thread
        ray.init(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            include_dashboard=False,
            log_to_driver=self.log_to_driver,
            object_store_memory=self.object_store_mb * 1024 * 1024,
            runtime_env={"env_vars": WORKER_ENV | LOCAL_ENV},
            _system_config=LOCAL_SYSTEM_CONFIG,
        )
        self._owned = True
        self._watch_local()
        if self.session_dir and self.warm_workers > 0:
            session_dir = self.session_dir
            self.warm_pool = WarmPool(
                size=self.warm_workers,
                # A job's default worker until a run says otherwise (then: the last run's).
                threads=worker_threads(Resources().cpus_per_worker),
                job_env_vars=WORKER_ENV | LOCAL_ENV,
                session_processes=lambda: session_processes(session_dir),
            )
            self.warm_pool.schedule()
        if not self.log_to_driver:
            # The log monitor tails every worker's log files ten times a second to stream them to drivers. With
            # log_to_driver off nobody reads that stream, and it was the costliest of the cluster's own processes
            # while a job trains (~1 % of a core). ray.init has no switch for it; the node can stop it.
            node = ray._private.worker._global_node
            if node is not None:
                node.kill_log_monitor(check_alive=False)

    def _watch_local(self) -> None:
        """Tie the new local cluster's processes to this one (``local_ray``): a watchdog stops them when this
        process ends, and the record lets the next service stop them when the watchdog died too."""
        node = ray._private.worker._global_node
        session_dir = node.get_session_dir_path() if node is not None else ""
        if not session_dir:
            log.warning("the local Ray cluster has no session directory: its processes are not watched")
            return
        self.session_dir = session_dir
        self._watchdog = SessionWatchdog.start(session_dir)
        if self.state_dir is not None:
            write_record(self.state_dir, owner_record(session_dir, self._watchdog.pid))
        log.info("local Ray session %s, watched by process %d", session_dir, self._watchdog.pid)

    def _release_local(self) -> None:
        """After ``ray.shutdown``: the watchdog stops whatever the shutdown left of the session, and the record
        goes."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.close()
        if self.state_dir is not None and self.session_dir:
            record = read_record(self.state_dir)
            if record is not None and record.owner_pid == os.getpid():
                remove_record(self.state_dir)
        self.session_dir = ""

    def start_in_background(self) -> threading.Thread:
        """Start on a thread that retries with backoff until Ray is up or ``stop`` is called."""
        with self._lock:
            if self._starter is not None and self._starter.is_alive():
                return self._starter
            self._stopping.clear()
            self._starter = threading.Thread(target=self._keep_starting, name="ray-start", daemon=True)
            self._starter.start()
            return self._starter

    def _keep_starting(self) -> None:
        backoff = self.retry_backoff_s
        while not self._stopping.is_set():
            try:
                self._start_once()
                return
            except Exception as exc:
                log.warning("could not start Ray (attempt %d): %s; retrying in %.0fs", self.attempts, exc, backoff)
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)

    def capacity(self) -> ClusterCapacity:
        self.start()
        cpus, gpus, node_cpus, node_gpus = 0.0, 0.0, 0.0, 0.0
        for node in ray.nodes():  # type: ignore[no-untyped-call]
            if not node.get("Alive"):
                continue
            resources = node.get("Resources", {})
            cpu, gpu = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
            cpus, gpus = cpus + cpu, gpus + gpu
            node_cpus, node_gpus = max(node_cpus, cpu), max(node_gpus, gpu)
        return ClusterCapacity(cpus=cpus, gpus=gpus, max_node_cpus=node_cpus, max_node_gpus=node_gpus)

    def stop(self) -> None:
        self._stopping.set()
        pool, self.warm_pool = self.warm_pool, None
        if pool is not None:
            pool.close()
        with self._lock:
            if self._owned and ray.is_initialized():
                ray.shutdown()
            self._release_local()
            self._owned = self._started = False
            self._ready.clear()
            self._release.set()


@dataclass(frozen=True)
class CheckpointStorage:
    """Where Ray Train writes checkpoints: ``<bucket>/checkpoints`` on S3, or a local directory."""

    path: str
    filesystem: pyarrow.fs.FileSystem | None = None

    @classmethod
    def for_object_store(cls, s3: S3Settings, data_dir: Path, prefix: str = "checkpoints") -> CheckpointStorage:
        if not s3.endpoint:
            return cls(path=str(Path(data_dir).resolve() / prefix))
        # pyarrow ignores AWS_ENDPOINT_URL; the endpoint, scheme and keys must be explicit.
        filesystem = pyarrow.fs.S3FileSystem(
            endpoint_override=s3.endpoint,
            scheme="https" if s3.secure else "http",
            access_key=s3.access_key,
            secret_key=s3.secret_key.get_secret_value(),
            region=s3.region,
        )
        return cls(path=f"{s3.bucket}/{prefix}", filesystem=filesystem)


class RayJobRunner:
    """``JobRunner`` on a Ray cluster."""

    supports_search = True

    def __init__(
        self,
        cluster: RayCluster,
        storage: CheckpointStorage,
        *,
        work_dir: Path,
        keep_checkpoints: int = 1,
        poll_interval_s: float = 0.5,
        fault: FaultInjection | None = None,
        model_store: S3Settings | None = None,
    ) -> None:
        self.cluster = cluster
        # Where workers on other nodes fetch a base model from (the service's object store); None in the embedded
        # mode, whose workers share the service's host.
        self.model_store = model_store
        self.storage = storage
        self.work_dir = Path(work_dir)
        self.keep_checkpoints = keep_checkpoints
        self.poll_interval_s = poll_interval_s
        # Test hook (a worker exits once mid-run); never set by the service's own wiring.
        self.fault = fault
        self._hub_lock = threading.Lock()
        self._hub_handle: Any = None

    def capacity(self) -> ClusterCapacity:
        return self.cluster.capacity()

    def _loop_config(self, request: RunRequest, channel: RunChannel) -> LoopConfig:
        spec = request.spec
        res = spec.resources
        return LoopConfig(
            job_id=request.job_id,
            model_dir=str(request.model_dir),
            label_map=request.data.label_map,
            examples=request.data.examples,
            method=spec.method,
            lora=spec.lora,
            hyper=spec.hyper_parameters,
            cpus_per_worker=res.cpus_per_worker,
            use_gpu=res.use_gpu,
            sink=channel,
            fault=self.fault,
            task=spec.task.value,
            chat_template=spec.chat_template,
            dpo=spec.dpo,
            publish_merged=spec.publish_merged,
            json_match_keys=spec.json_match_keys,
            generation_examples=request.generation_examples,
            pruning=spec.pruning,
            distillation=spec.distillation,
            side_models=dict(request.side_models),
            model_files=dict(request.model_files),
            model_store=self.model_store,
            fsdp=res.fsdp,
        )

    def _trainer(self, request: RunRequest, channel: RunChannel) -> GristmillTorchTrainer:
        res = request.spec.resources
        loop = self._loop_config(request, channel)
        worker_env = worker_runtime_env(worker_threads(res.cpus_per_worker))
        return GristmillTorchTrainer(
            train_loop,
            autoscaling=bool(self.cluster.address),
            train_loop_config={"loop": SealedConfig.seal(loop)},
            scaling_config=scaling_config(res),
            run_config=RunConfig(
                name=request.run_name,
                storage_path=self.storage.path,
                storage_filesystem=self.storage.filesystem,
                failure_config=FailureConfig(max_failures=res.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=self.keep_checkpoints),
                callbacks=[RegisterController(channel)],  # type: ignore[list-item]  # a controller callback
                worker_runtime_env=worker_env,  # type: ignore[call-arg]  # Ray Train v2's; the stubs are v1's
            ),
        )

    def run(self, request: RunRequest, listener: RunListener, cancel: threading.Event) -> RunOutcome:
        self.cluster.start()
        self._release_orphans()  # an earlier run's leftovers would hold the CPUs this one asks for
        pool = self.cluster.warm_pool
        res = request.spec.resources
        watch = _WorkerStartWatch(listener, time.time())
        if pool is not None:
            pool.run_began(worker_threads(res.cpus_per_worker))
        try:
            channel = RunChannel(self._hub(), request.job_id)
            try:
                if request.spec.search is not None:
                    return self._search(request, channel, listener, cancel)
                trainer = self._trainer(request, channel)
                result = self._drive(trainer.fit, request, channel, watch, cancel, abort=True)
            finally:
                channel.close()
        finally:
            if pool is not None:
                # Only rank 0 reports its start: with several workers, another may have taken the warm process.
                known = request.spec.search is None and res.num_workers == 1
                pool.run_ended(warm_worker=watch.warm if known else None)
        return self._outcome(request, result)

    def _drive(
        self,
        work: Callable[[], Any],
        request: RunRequest,
        channel: RunChannel,
        listener: RunListener,
        cancel: threading.Event,
        *,
        abort: bool,
    ) -> Any:
        """Run ``work`` (a blocking fit) in a thread; meanwhile drain progress and pass on a cancel."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = work()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=target, name=f"ray-fit-{request.job_id}", daemon=True)
        thread.start()
        aborted = not abort
        next_release = time.monotonic() + ORPHAN_CHECK_S
        # One long poll of the hub is always outstanding: its records arrive as soon as they are pushed, and an idle
        # run costs the hub one call per HUB_WAIT_S (every call wakes the hub's process and this one, beside a
        # training worker that wants every core). Cancels and the run's end are checked here every poll interval.
        pending = channel.drain_later(HUB_WAIT_S)
        while thread.is_alive():
            ready, _ = ray.wait([pending], timeout=self.poll_interval_s)
            if ready:
                self._deliver(ray.get(pending), listener)
                pending = channel.drain_later(HUB_WAIT_S)
            if cancel.is_set() and not aborted:
                aborted = self._abort(channel)
            if time.monotonic() >= next_release:
                # A search's trials stopped early leave their groups while the search goes on.
                self._release_orphans()
                next_release = time.monotonic() + ORPHAN_CHECK_S
        channel.wake()
        self._deliver(ray.get(pending, timeout=30), listener)
        self._drain(channel, listener)
        if cancel.is_set():
            raise RunCancelledError("the run was cancelled")
        if "error" in outcome:
            error = outcome["error"]
            if isinstance(error, RunFailedError):
                raise error
            if storage_unreachable(error):
                raise RunUnavailableError(f"the checkpoint storage could not be reached: {describe_failure(error)}")
            raise RunFailedError(describe_failure(error))
        return outcome["result"]

    def _search(
        self, request: RunRequest, channel: RunChannel, listener: RunListener, cancel: threading.Event
    ) -> RunOutcome:
        from gristmill.training.runner.search import run_search

        loop = self._loop_config(request, channel)
        capacity = self.cluster.capacity()

        def work() -> tuple[str, dict[str, Any], int, Any]:
            return run_search(
                request,
                loop,
                storage_path=self.storage.path,
                storage_filesystem=self.storage.filesystem,
                keep_checkpoints=self.keep_checkpoints,
                extra_callbacks=(),
                cancel=cancel,
                cluster_cpus=capacity.cpus,
                autoscaling=bool(self.cluster.address),
            )

        path, metrics, best_trial, spec = self._drive(work, request, channel, listener, cancel, abort=False)
        checkpoint = ray.train.Checkpoint(path, filesystem=self.storage.filesystem)
        outcome = self._download(request, checkpoint, metrics)
        return replace(outcome, best_trial=best_trial, spec=spec)

    def _release_orphans(self) -> None:
        try:
            release_orphaned_placement_groups()
        except Exception:  # a GCS hiccup: the next check tries again
            log.warning("could not check for orphaned placement groups", exc_info=True)

    def close(self) -> None:
        """Stop the progress hub (a later run starts a new one)."""
        with self._hub_lock:
            hub, self._hub_handle = self._hub_handle, None
        if hub is not None and ray.is_initialized():
            ray.kill(hub)

    def _hub(self) -> Any:
        with self._hub_lock:
            if self._hub_handle is None:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                # On the driver's node, as Ray Train places its controller: on a cluster, a hub on a worker node
                # died with that node and took every job it was tracking with it (ActorUnavailableError), even
                # though Ray Train restarted their worker groups on the other nodes.
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self._hub_handle = ProgressHub.options(scheduling_strategy=here).remote()  # type: ignore[attr-defined]
            return self._hub_handle

    def _drain(self, channel: RunChannel, listener: RunListener) -> None:
        self._deliver(channel.drain(), listener)

    @staticmethod
    def _deliver(records: list[dict[str, Any]], listener: RunListener) -> None:
        if records:
            listener.on_records(records)

    def _abort(self, channel: RunChannel) -> bool:
        controller = channel.controller()
        if controller is None:
            return False  # not started yet: try again at the next poll
        # The controller aborts its worker group and exits; fit() then returns with an error.
        controller.abort.remote()
        return True

    def _outcome(self, request: RunRequest, result: Any) -> RunOutcome:
        metrics = dict(result.metrics or {})
        if result.checkpoint is None or not metrics.get("finished"):
            raise RunFailedError("the run ended without reporting a final model")
        return self._download(request, result.checkpoint, metrics)

    def _download(self, request: RunRequest, checkpoint: Any, metrics: dict[str, Any]) -> RunOutcome:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(dir=self.work_dir, prefix=f"{request.job_id}-"))
        try:
            checkpoint.to_directory(str(dest))
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        report = dest / LOOP_REPORT_FILE
        if report.is_file():
            # The loop's own final report: Ray's copy of it carries Ray's bookkeeping too (a Tune trial's pid,
            # timestamp, training_iteration, ...). A final checkpoint written before the loop kept its report has
            # only Ray's copy.
            metrics = json.loads(report.read_text())
        return RunOutcome(
            metrics=metrics,
            model_dir=dest,
            trainable_parameters=int(metrics.get("trainable_parameters", 0)),
            total_parameters=int(metrics.get("total_parameters", 0)),
        )

    def cleanup(self, outcome: RunOutcome) -> None:
        if outcome.model_dir.is_relative_to(self.work_dir):
            shutil.rmtree(outcome.model_dir, ignore_errors=True)


class _WorkerStartWatch:
    """A run's listener that also notes whether its (first) worker process was already running when the run
    began: a warm process (``warm.WarmPool``)."""

    def __init__(self, listener: RunListener, began: float) -> None:
        self._listener = listener
        self._began = began
        self.warm: bool | None = None

    def on_records(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            started = (record.get("timings") or {}).get("process_started") if record.get("type") == "started" else None
            if started and self.warm is None:
                self.warm = float(started) < self._began
        self._listener.on_records(records)


def default_work_dir(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / "runs"
