"""publish_merged on the tiny Llama, in-process: the spec's rules, the merge (float32, tied embeddings, the base's
dtype), a LoRA SFT run whose artifact holds the adapter and merged/ with the merged model's test loss within 1% of
the adapter's, and a job through the gRPC API whose manifest lists merged/ with checksums."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.hf_loading import model_loading
from gristmill.core.manifests import ModelManifest
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.app import TrainingApp
from gristmill.training.devtools import chat_rows
from gristmill.training.domain import spec as d
from gristmill.training.domain.runs import LOOP_SAMPLES_FILE, MERGED_MODEL_DIR
from gristmill.training.ml import chat, modeling
from gristmill.training.ml.loop import DirectorySession, ListSink, LoopRunner
from services.training.tests.service_support import job_events
from services.training.tests.unit.test_chat_sft import (
    _build_arguments,
    _loop_config,
    _resolver,
    _spec,
    chat_spec_proto,
)
from tests.support.tiny_model import CHATML_TEMPLATE

CAUSAL_LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _test_loss(model: torch.nn.Module, tokenizer: Any, conversations: list[Any]) -> float:
    split = chat.encode(tokenizer, conversations, 128)
    evaluation = chat.CausalLMEvaluation(torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        evaluation.add(model.eval(), chat.collate(split, list(range(len(split))), tokenizer.pad_token_id))
    return evaluation.scores(evaluation.totals())["loss"]


def _randomised_adapter(model_dir: Path, targets: list[str], seed: int = 0) -> torch.nn.Module:
    """A LoRA model whose B matrices are random (an adapter that changes the model, without training)."""
    lora = d.build_lora(method=d.Method.LORA, given=True, rank=4, target_modules=targets)
    assert lora is not None
    model = modeling.causal_lm_for_training(model_dir, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


# --------------------------------------------------------------------------- the spec


def test_publish_merged_needs_lora_and_a_generative_objective() -> None:
    lora = d.build_lora(method=d.Method.LORA, given=False)
    ok = d.build_spec(**_build_arguments(method=d.Method.LORA, lora=lora, publish_merged=True))
    assert ok.publish_merged and d.flatten_hyper_parameters(ok)["publish_merged"] == "true"
    assert "publish_merged" not in d.flatten_hyper_parameters(replace(ok, publish_merged=False))
    with pytest.raises(InvalidArgumentError, match="spec.publish_merged needs method TRAINING_METHOD_LORA") as full:
        d.build_spec(**_build_arguments(publish_merged=True))
    with pytest.raises(InvalidArgumentError, match="spec.publish_merged is only for generative objectives") as task:
        d.build_spec(
            **_build_arguments(method=d.Method.LORA, lora=lora, objective=d.Objective.CLASSIFY, publish_merged=True)
        )
    assert full.value.details["field"] == task.value.details["field"] == "spec.publish_merged"


def test_publish_merged_round_trips_through_proto_and_is_refused_for_a_classification_version(
    objects: ObjectStore, sentiment_version: Any, tiny_model: Path, tmp_path: Path
) -> None:
    source = chat_spec_proto(display_name="c", method=pb.TRAINING_METHOD_LORA, publish_merged=True)
    spec = convert.spec_from_proto(source)
    assert spec.publish_merged and convert.spec_to_proto(spec).publish_merged
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    # The objective is the dataset version's: the resolver refuses once it knows it is classification.
    reviews = sentiment_version(objects)
    with pytest.raises(InvalidArgumentError, match="publish_merged is only for generative objectives") as caught:
        _resolver(objects, tmp_path).resolve(_spec(tiny_model, reviews, publish_merged=True))
    assert caught.value.details["field"] == "spec.publish_merged"


# --------------------------------------------------------------------------- the merge


def test_the_merged_model_computes_what_the_adapter_does(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = modeling.load_tokenizer(tiny_llama)
    conversations = chat_rows(8, 3)
    adapted = _randomised_adapter(tiny_llama, CAUSAL_LM_TARGETS)
    base_loss = _test_loss(modeling.load_causal_lm(tiny_llama), tokenizer, conversations)
    adapter_loss = _test_loss(adapted, tokenizer, conversations)
    assert abs(adapter_loss - base_loss) > 0.01  # the adapter does change the model
    merged = modeling.merge_adapter(adapted)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert _test_loss(merged, tokenizer, conversations) == pytest.approx(adapter_loss, rel=1e-5)
    modeling.save_merged(merged, tokenizer, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert _test_loss(reloaded, tokenizer, conversations) == pytest.approx(adapter_loss, rel=1e-5)


def _tied_llama(source: Path, dest: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source), tie_word_embeddings=True)
    torch.manual_seed(1)
    with model_loading():
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(str(dest), safe_serialization=True)
    modeling.load_tokenizer(source).save_pretrained(str(dest))
    return dest


def test_tied_embeddings_are_untied_when_the_adapter_changes_the_output_layer(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tied = _tied_llama(tiny_llama, tmp_path / "tied")
    base = modeling.load_causal_lm(tied)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # type: ignore[operator]
    tokenizer = modeling.load_tokenizer(tied)
    conversations = chat_rows(8, 3)
    # The adapter changes lm_head only; folding it into the shared matrix would change the embeddings too.
    adapted = _randomised_adapter(tied, ["q_proj", "v_proj", "lm_head"])
    adapter_loss = _test_loss(adapted, tokenizer, conversations)
    merged = modeling.merge_adapter(adapted)
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight  # type: ignore[operator]
    assert _test_loss(merged, tokenizer, conversations) == pytest.approx(adapter_loss, rel=1e-5)
    modeling.save_merged(merged, tokenizer, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert reloaded.config.tie_word_embeddings is False
    assert _test_loss(reloaded, tokenizer, conversations) == pytest.approx(adapter_loss, rel=1e-5)
    # Adapting other layers only leaves the weights tied (nothing of the adapter touches them).
    kept = modeling.merge_adapter(_randomised_adapter(tied, ["q_proj", "v_proj"]))
    assert kept.get_output_embeddings().weight is kept.get_input_embeddings().weight  # type: ignore[operator]


def test_a_bf16_base_is_merged_in_float32_and_published_in_bf16(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.bfloat16).save_pretrained(str(bf16))
    modeling.load_tokenizer(tiny_llama).save_pretrained(str(bf16))
    assert modeling.checkpoint_dtype(bf16) is torch.bfloat16 and modeling.checkpoint_dtype(tiny_llama) is torch.float32
    tokenizer = modeling.load_tokenizer(bf16)
    conversations = chat_rows(8, 3)
    adapted = _randomised_adapter(bf16, CAUSAL_LM_TARGETS)
    assert {p.dtype for p in adapted.parameters()} == {torch.float32}  # trained over the base in float32
    adapter_loss = _test_loss(adapted, tokenizer, conversations)
    merged = modeling.merge_adapter(adapted, modeling.checkpoint_dtype(bf16))
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    # Rounding W + BA to bf16 once costs far less than 1% of the loss.
    assert _test_loss(merged, tokenizer, conversations) == pytest.approx(adapter_loss, rel=0.01)


def test_only_a_lora_model_over_an_unquantised_base_merges(tiny_llama: Path) -> None:
    with pytest.raises(TypeError, match="merging needs a PEFT LoRA model"):
        modeling.merge_adapter(modeling.load_causal_lm(tiny_llama))


# --------------------------------------------------------------------------- the loop


def test_a_lora_sft_run_publishes_the_adapter_and_the_merged_model_with_its_test_loss(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sink = ListSink()
    session = DirectorySession(tmp_path / "run")
    config = replace(_loop_config(tiny_llama, sink, epochs=2), publish_merged=True)
    LoopRunner(config, 0, 1, 0, session).run()
    final = session.reports[-1]
    # The merged model's test loss is the adapter's (well within 1%), reported beside it.
    assert final["test_merged_loss"] == pytest.approx(final["test_loss"], rel=0.01)
    assert final["test_merged_perplexity"] == pytest.approx(final["test_perplexity"], rel=0.01)
    assert 0.0 <= final["test_exact_match"] <= 1.0 and 0.0 <= final["test_rouge_l"] <= 1.0
    test_events = [r["metrics"] for r in sink.records if r["type"] == "eval" and r["split"] == "test"]
    assert [set(m) for m in test_events] == [
        {"loss", "perplexity", "exact_match", "rouge_l", "merged_loss", "merged_perplexity"}
    ]

    model_dir = session.checkpoints[-1]
    top = {p.name for p in model_dir.iterdir() if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"} <= top
    assert "model.safetensors" not in top  # the adapter stays the top-level artifact
    merged_dir = model_dir / MERGED_MODEL_DIR
    merged_files = {p.name for p in merged_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= merged_files
    assert not any(name.startswith("adapter_") for name in merged_files)
    # Both load as published: the merged model alone, the adapter over the base; they agree on the test loss.
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tokenizer.chat_template == CHATML_TEMPLATE
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(model_dir))
    test = chat_rows(16, 3)
    assert _test_loss(merged, tokenizer, test) == pytest.approx(final["test_merged_loss"], rel=1e-4)
    assert _test_loss(tuned, tokenizer, test) == pytest.approx(final["test_loss"], rel=1e-4)
    # Five sample generations for the card, each prompt the conversation before its last reply.
    samples = json.loads((model_dir / LOOP_SAMPLES_FILE).read_text())
    assert len(samples) == 5 and samples[0]["prompt"] == test[0][:-1]
    assert samples[0]["reference"] == test[0][-1]["content"]


def test_without_publish_merged_nothing_is_merged(tiny_llama: Path, tmp_path: Path) -> None:
    session = DirectorySession(tmp_path)
    LoopRunner(_loop_config(tiny_llama, ListSink(), max_steps=2), 0, 1, 0, session).run()
    assert not (session.checkpoints[-1] / MERGED_MODEL_DIR).exists()
    assert not any(key.startswith("test_merged_") for key in session.reports[-1])


# --------------------------------------------------------------------------- through the API


async def test_an_sft_job_with_publish_merged_lists_merged_files_with_checksums(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_llama: Path, chat_version: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    app, stub = service
    objects = app.host.platform.objects
    chat_version(objects, "chats", "v1", train=32, held_out=8)
    spec = pb.JobSpec(display_name="chat", method=pb.TRAINING_METHOD_LORA, publish_merged=True)
    spec.base_model.local_path = str(tiny_llama)
    spec.dataset_version.project_id, spec.dataset_version.dataset_version_id = "chats", "v1"
    spec.hyper_parameters.learning_rate, spec.hyper_parameters.per_worker_batch_size = 2e-2, 8
    spec.hyper_parameters.epochs = 1
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    assert job.spec.publish_merged
    events = await job_events(stub, job.job_id, after_sequence=0)
    assert events[-1].state_change.state == pb.JOB_STATE_SUCCEEDED, events[-1]

    result = (await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))).result
    finals = {(m.name, m.split): m.value for m in result.metrics}
    test = common_pb2.DATASET_SPLIT_TEST
    assert finals[("merged_loss", test)] == pytest.approx(finals[("loss", test)], rel=0.01)
    assert {("exact_match", test), ("rouge_l", test)} <= set(finals)
    assert result.lineage.hyper_parameters["publish_merged"] == "true"
    manifest = ModelManifest.from_json(objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256))
    merged = {name for name in manifest.files if name.startswith(f"{MERGED_MODEL_DIR}/")}
    assert {"merged/model.safetensors", "merged/config.json", "merged/tokenizer.json"} <= merged
    assert "adapter_model.safetensors" in manifest.files and LOOP_SAMPLES_FILE not in manifest.files
    assert manifest.metrics["test_merged_loss"] == finals[("merged_loss", test)]
    for name in merged:
        entry = manifest.files[name]
        assert hashlib.sha256(objects.get_bytes(entry.key)).hexdigest() == entry.sha256
    assert {f.key for f in result.files} >= {manifest.files[name].key for name in merged}
    local = manifest.download(objects, tmp_path / "artifact")
    assert AutoModelForCausalLM.from_pretrained(str(local / MERGED_MODEL_DIR)).config.model_type == "llama"
    card = objects.get_bytes(manifest.files["model-card.md"].key).decode()
    assert "- Merged model: `merged/`" in card
    section = card.split("## Sample generations", 1)[1].split("## Use", 1)[0]
    assert [line.split(" | ")[0] for line in section.splitlines() if line[:3] in {"| 1", "| 5"}] == ["| 1", "| 5"]
    shutil.rmtree(local)
