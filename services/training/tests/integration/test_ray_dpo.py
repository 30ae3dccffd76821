"""DPO on the real stack: a preference version trained with LoRA on a tiny Llama by Ray Train workers, checkpoints in
the S3 server, the adapter published and the registry's event on Kafka. The service, cluster and listener are
``test_ray_training``'s."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.core.chat_templates import chat_template_sha256
from gristmill.core.manifests import ModelManifest
from gristmill.core.settings import S3Settings
from gristmill.core.storage.s3 import S3ObjectStore
from gristmill.training.runner.ray_runner import RayCluster
from services.training.tests.integration.test_ray_training import (  # noqa: F401  # fixtures: ray_cluster, s3
    _chat_spec,
    _checkpoint_names,
    _kafka_listener,
    _service,
    _state_changes,
    ray_cluster,
    s3,
)
from tests.support.tiny_model import CHATML_TEMPLATE

pytestmark = pytest.mark.integration

REWARD_METRICS = {"loss", "reward_accuracy", "reward_margin"}


async def test_dpo_with_lora_on_a_preference_version_publishes_the_adapter_and_reward_metrics(
    tmp_path: Path,
    s3: S3Settings,  # noqa: F811
    kafka_bootstrap: str,
    ray_cluster: RayCluster,  # noqa: F811
    preference_version: Any,
    tiny_llama: Path,
) -> None:
    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, preference_version) as service:
        # 96 pairs, batches of 8: 12 steps in one epoch; an evaluation and a checkpoint every 4 steps.
        spec = _chat_spec(service.project, tiny_llama, epochs=1, eval_every_steps=4, log_every_steps=4)
        spec.registered_model_name = "it-dpo"
        spec.hyper_parameters.learning_rate = 1e-2
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert job.spec.objective == pb.OBJECTIVE_DPO and job.spec.task == common_pb2.TASK_TYPE_PREFERENCE
        # The effective spec shows the beta the job trains with (0 means 0.1).
        assert job.spec.HasField("dpo") and job.spec.dpo.beta == pytest.approx(0.1)
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
            assert [set(v) for v in validation] == [REWARD_METRICS] * 3, validation
            assert validation[-1]["reward_accuracy"] >= 0.9 and validation[-1]["loss"] < validation[0]["loss"], (
                validation
            )
            names = _checkpoint_names(s3, tmp_path, job.job_id)
            assert "model" in names and any(name.startswith("checkpoint_") for name in names), names

            done = await service.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
            assert done.spec.dpo.beta == pytest.approx(0.1)
            result = done.result
            metrics = {(m.name, m.split): m.value for m in result.metrics}
            # The test split's metrics, and the best validation loss (the early-stopping metric).
            assert {name for name, split in metrics if split == common_pb2.DATASET_SPLIT_TEST} >= REWARD_METRICS
            assert ("loss", common_pb2.DATASET_SPLIT_VALIDATION) in metrics
            assert metrics[("reward_accuracy", common_pb2.DATASET_SPLIT_TEST)] >= 0.9
            assert result.trainable_parameter_count == 4096  # r=8 on q, k, v, o of 2 layers, hidden 32

            # The artifact is the adapter with the tokenizer and its chat template: a chat model.
            objects = S3ObjectStore(s3)
            manifest = ModelManifest.from_json(
                objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256)
            )
            assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja"} <= set(manifest.files)
            assert "model.safetensors" not in manifest.files and manifest.task_type == "TASK_TYPE_CHAT"
            local = manifest.download(objects, tmp_path / "adapter")
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            assert AutoTokenizer.from_pretrained(str(local)).chat_template == CHATML_TEMPLATE
            tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(local))
            assert {n for n, _ in tuned.named_parameters() if "lora_A" in n}

            # The registry's input on Kafka: a chat model, the chat signature, objective, beta and template hash.
            assert await asyncio.to_thread(succeeded.wait, 60), "no SUCCEEDED JobStateChanged on Kafka"
            success = received[-1]
            assert success.task == common_pb2.TASK_TYPE_CHAT and success.manifest == result.manifest
            assert [t.name for t in success.signature.inputs] == ["messages"]
            hyper = success.lineage.hyper_parameters
            assert hyper["objective"] == "dpo" and hyper["dpo.beta"] == "0.1"
            assert hyper["chat_template.sha256"] == chat_template_sha256(CHATML_TEMPLATE)
            assert hyper == result.lineage.hyper_parameters == manifest.lineage["hyper_parameters"]
            reported = {(m.name, m.split) for m in success.metrics}
            assert ("reward_margin", common_pb2.DATASET_SPLIT_TEST) in reported
        finally:
            consumer.stop()
            bus.close()
