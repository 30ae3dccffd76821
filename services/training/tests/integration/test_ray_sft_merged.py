"""publish_merged and evaluation by generation on the real stack: a LoRA SFT job on the tiny Llama run by Ray Train,
checkpointed to the S3 server, its result on Kafka. The artifact keeps the adapter at its top level and holds the
merged model under merged/ (listed with checksums, loadable with AutoModelForCausalLM), the merged model's test loss
is within 1% of the adapter's, and the generation metrics and sample generations reach the result, Kafka and the
model card.

The service helpers and fixtures are test_ray_training's (one local Ray cluster of 2 CPUs for this module)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.core.manifests import ModelManifest
from gristmill.core.storage import ObjectStore
from gristmill.core.storage.s3 import S3ObjectStore
from gristmill.training.domain.runs import LOOP_SAMPLES_FILE, MERGED_MODEL_DIR
from gristmill.training.runner.ray_runner import RayCluster
from services.training.tests.integration import test_ray_training as ray_training
from services.training.tests.integration.test_ray_training import _chat_spec, _kafka_listener, _service, _state_changes
from tests.support.tiny_model import CHATML_TEMPLATE

pytestmark = pytest.mark.integration

# The fixtures of test_ray_training (a module-scoped local Ray cluster, the S3 settings), used here as they are.
ray_cluster = ray_training.ray_cluster
s3 = ray_training.s3

TEST = common_pb2.DATASET_SPLIT_TEST


async def test_sft_with_publish_merged_publishes_the_adapter_and_the_merged_model_with_generation_metrics(
    tmp_path: Path, s3: Any, kafka_bootstrap: str, ray_cluster: RayCluster, chat_version: Any, tiny_llama: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def small_chat_version(objects: ObjectStore, project: str, version: str, **_: Any) -> Any:
        # 32 conversations in batches of 8: 4 steps per epoch; 16 test conversations to evaluate and reply to.
        return chat_version(objects, project, version, train=32, held_out=16)

    async with _service(tmp_path, s3, kafka_bootstrap, ray_cluster, small_chat_version) as service:
        spec = _chat_spec(service.project, tiny_llama, epochs=2, log_every_steps=2)
        spec.publish_merged = True
        job = await service.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert job.spec.publish_merged and job.spec.method == pb.TRAINING_METHOD_LORA
        bus, consumer, received, succeeded = _kafka_listener(kafka_bootstrap, job.job_id, tmp_path)
        try:
            events = await service.events(job.job_id)
            changes = _state_changes(events)
            assert [c.state for c in changes][-1] == pb.JOB_STATE_SUCCEEDED, [c.reason for c in changes]
            # The test evaluation is one metrics event: the adapter's, its replies' and the merged model's.
            test_events = [
                {m.name for m in e.metrics.metrics}
                for e in events
                if e.WhichOneof("event") == "metrics" and e.metrics.metrics[0].split == TEST
            ]
            assert test_events == [{"loss", "perplexity", "exact_match", "rouge_l", "merged_loss", "merged_perplexity"}]

            result = (await service.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))).result
            finals = {(m.name, m.split): m.value for m in result.metrics}
            assert finals[("merged_loss", TEST)] == pytest.approx(finals[("loss", TEST)], rel=0.01)
            assert 0.0 <= finals[("exact_match", TEST)] <= 1.0 and 0.0 <= finals[("rouge_l", TEST)] <= 1.0
            assert result.lineage.hyper_parameters["publish_merged"] == "true"

            # The manifest lists the adapter at the top and merged/ beside it, every file verified from S3.
            objects = S3ObjectStore(s3)
            manifest = ModelManifest.from_json(
                objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256)
            )
            assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja"} <= set(manifest.files)
            assert "model.safetensors" not in manifest.files and LOOP_SAMPLES_FILE not in manifest.files
            merged_files = {n.split("/", 1)[1] for n in manifest.files if n.startswith(f"{MERGED_MODEL_DIR}/")}
            assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= merged_files
            local = manifest.download(objects, tmp_path / "artifact")  # verifies each file's sha256

            merged = AutoModelForCausalLM.from_pretrained(str(local / MERGED_MODEL_DIR))
            tokenizer = AutoTokenizer.from_pretrained(str(local / MERGED_MODEL_DIR))
            assert merged.config.model_type == "llama" and tokenizer.chat_template == CHATML_TEMPLATE
            # The adapter still loads over the base, and both compute the same replies' logits.
            tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(local))
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": "repeat good bad"}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                assert torch.allclose(merged(ids).logits, tuned.eval()(ids).logits, atol=1e-4)

            card = objects.get_bytes(manifest.files["model-card.md"].key).decode()
            samples = card.split("## Sample generations", 1)[1].split("## Use", 1)[0]
            assert [line[:4] for line in samples.splitlines() if line[:3] in {"| 1", "| 5", "| 6"}] == ["| 1 ", "| 5 "]
            assert "| exact_match | test |" in card and "| merged_loss | test |" in card

            # The registry's input on Kafka carries the same metrics.
            assert await asyncio.to_thread(succeeded.wait, 60), "no SUCCEEDED JobStateChanged on Kafka"
            on_kafka = {(m.name, m.split) for m in received[-1].metrics}
            assert {("exact_match", TEST), ("rouge_l", TEST), ("merged_loss", TEST), ("loss", TEST)} <= on_kafka
            assert received[-1].lineage.hyper_parameters["publish_merged"] == "true"
        finally:
            consumer.stop()
            bus.close()
