"""The chat task (objective sft) on a tiny Llama, in-process: SFT rows, the chat template with assistant-only
labels, padding-free packing that keeps conversations apart, the checks SubmitJob makes before any Ray work,
LoRA training with a published adapter, and a job through the gRPC API."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.chat import ROW_FORMAT_DPO
from gristmill.core.chat_templates import chat_template_sha256
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.manifests import DatasetManifest, ModelManifest, dataset_manifest_key
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.app import TrainingApp
from gristmill.training.devtools import chat_rows, write_chat_version
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import BaseModelRef, DatasetRef
from gristmill.training.domain.resolve import (
    BaseModelCatalog,
    ClusterCapacity,
    DatasetCatalog,
    SpecResolver,
    with_objective_metrics,
)
from gristmill.training.ml import chat, modeling
from gristmill.training.ml.inspect import HfModelInspector
from gristmill.training.ml.loop import FINAL_CHECKPOINT_NAME, DirectorySession, ListSink, LoopConfig, LoopRunner
from gristmill.training.tasks import training_task
from gristmill.training.tasks.chat import CHAT_SIGNATURE, ChatSft
from services.training.tests.service_support import job_events
from tests.support.tiny_model import CHATML_TEMPLATE

# ChatML with transformers' {% generation %} markers around assistant replies (and their end-of-turn token).
CHATML_WITH_MARKERS = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Drops earlier assistant replies once a later turn follows (as reasoning templates drop earlier thoughts).
NOT_PREFIX_PRESERVING = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Refuses system turns, as Gemma's template does.
NO_SYSTEM_TURNS = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
)

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You repeat words."},
    {"role": "user", "content": "repeat good bad"},
    {"role": "assistant", "content": "good bad"},
    {"role": "user", "content": "repeat nice"},
    {"role": "assistant", "content": "nice"},
]


class FixedCapacity:
    def capacity(self) -> ClusterCapacity:
        return ClusterCapacity(cpus=2, gpus=0, max_node_cpus=2, max_node_gpus=0)


def _resolver(objects: ObjectStore, tmp_path: Path, *, search_enabled: bool = False) -> SpecResolver:
    models = BaseModelCatalog(objects, tmp_path / "cache", allow_local_paths=True)
    return SpecResolver(
        DatasetCatalog(objects), models, HfModelInspector(), FixedCapacity(), search_enabled=search_enabled
    )


def _spec(model: Path, dataset: DatasetRef, *, method: d.Method = d.Method.LORA, **changes: Any) -> d.JobSpec:
    hyper = changes.pop("hyper", {})
    spec = d.build_spec(
        display_name="chat",
        base_model=BaseModelRef(local_path=str(model)),
        dataset=DatasetRef(dataset.project_id, dataset.dataset_version_id),
        task=d.TaskType.UNSPECIFIED,
        method=method,
        lora=d.build_lora(method=method, given=False),
        hyper_parameters=d.build_hyper_parameters(method=method, **hyper),
        resources=d.build_resources(),
        search=None,
        registered_model_name="",
        tags={},
    )
    return replace(spec, **changes)


def _tokenizer(model: Path, template: str = "") -> Any:
    return modeling.load_tokenizer(model, chat_template=template)


def _assistant_text(tokenizer: Any, example: dict[str, list[int]]) -> str:
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    return str(tokenizer.decode([token for token, label in pairs if label >= 0]))


# --------------------------------------------------------------------------- rows


def test_a_chat_version_is_read_as_checked_conversations(objects: ObjectStore, chat_version: Any) -> None:
    ref = chat_version(objects, train=12, held_out=4)
    resolved = DatasetCatalog(objects).resolve(ref)
    assert resolved.task is d.TaskType.CHAT and resolved.counts == {"train": 12, "validation": 4, "test": 4}
    first = resolved.splits.examples["train"][0]
    assert first == chat_rows(12, 1)[0]  # OpenAI-shaped message dicts, as apply_chat_template takes them
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    # The generic reader hands every row format over as JSON objects, naming each line.
    manifest = DatasetManifest.from_json(objects.get_bytes(dataset_manifest_key("chats", "v1")))
    records = list(manifest.read_records(objects, "test"))
    assert records[1].where == "datasets/chats/v1/test.jsonl line 2" and records[1].data["id"] == "test-1"


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "user", "content": "hi"}], "has no assistant turn to learn from"),
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "comes before any user turn"),
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ],
)
def test_a_bad_sft_row_is_refused_naming_the_line(
    objects: ObjectStore, messages: list[dict[str, str]], problem: str
) -> None:
    ref = write_chat_version(
        objects, project_id="chats", dataset_version_id="bad", splits={"train": [*chat_rows(2, 1), messages]}
    )
    with pytest.raises(FailedPreconditionError, match=f"datasets/chats/bad/train.jsonl line 3.*{problem}"):
        DatasetCatalog(objects).resolve(ref)


def test_rows_of_another_format_are_refused(objects: ObjectStore) -> None:
    ref = write_chat_version(
        objects,
        project_id="chats",
        dataset_version_id="dpo",
        splits={"train": chat_rows(2, 1)},
        row_format=ROW_FORMAT_DPO,
    )
    with pytest.raises(FailedPreconditionError, match="has 'dpo-conversational' rows, but objective sft reads"):
        DatasetCatalog(objects).resolve(ref)


# --------------------------------------------------------------------------- templating and masks


def test_the_loss_covers_assistant_turns_only(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    example = chat.sft_example(tokenizer, CONVERSATION, 512)
    assert example is not None
    # The tokens are exactly the template's rendering, as serving's apply_chat_template produces them.
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert example["input_ids"] == list(rendered)
    # Labelled: each reply with its end-of-turn token (the model learns to stop), never a header or another turn.
    assert _assistant_text(tokenizer, example) == "good bad<|im_end|>\nnice<|im_end|>\n"
    unlabelled = tokenizer.decode([t for t, y in zip(example["input_ids"], example["labels"], strict=True) if y < 0])
    assert "repeat" in unlabelled and "You repeat words." in unlabelled and "<|im_start|>assistant\n" in unlabelled
    assert all(y in (t, chat.IGNORE_INDEX) for t, y in zip(example["input_ids"], example["labels"], strict=True))


def test_generation_markers_give_the_same_mask(tiny_llama: Path) -> None:
    # The markers take transformers' path (return_assistant_tokens_mask, what TRL's assistant_only_loss uses).
    assert chat.has_generation_markers(CHATML_WITH_MARKERS) and not chat.has_generation_markers(CHATML_TEMPLATE)
    plain = chat.sft_example(_tokenizer(tiny_llama), CONVERSATION, 512)
    marked = chat.sft_example(_tokenizer(tiny_llama, CHATML_WITH_MARKERS), CONVERSATION, 512)
    assert plain == marked


def test_templates_that_cannot_be_masked_or_rendered_are_refused(tiny_llama: Path) -> None:
    with pytest.raises(chat.ChatTemplateError, match="assistant turn 3 differently once later turns follow"):
        chat.sft_example(_tokenizer(tiny_llama, NOT_PREFIX_PRESERVING), CONVERSATION, 512)
    with pytest.raises(chat.ChatTemplateError, match="System role not supported"):
        chat.sft_example(_tokenizer(tiny_llama, NO_SYSTEM_TURNS), CONVERSATION, 512)


def test_long_conversations_are_cut_and_those_left_without_a_reply_dropped(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    full = chat.sft_example(tokenizer, CONVERSATION, 512)
    assert full is not None
    first_reply = full["labels"].index(next(y for y in full["labels"] if y >= 0))
    cut = chat.sft_example(tokenizer, CONVERSATION, first_reply + 3)
    assert cut is not None and cut["input_ids"] == full["input_ids"][: first_reply + 3]
    assert sum(y >= 0 for y in cut["labels"]) == 3
    assert chat.sft_example(tokenizer, CONVERSATION, first_reply) is None
    split = chat.encode(tokenizer, [CONVERSATION, CONVERSATION[:3]], first_reply + 1)
    assert len(split) == 2 and split.dropped == 0
    with pytest.raises(chat.NothingToLearnError, match="none of the 2 conversations keeps an assistant token"):
        chat.encode(tokenizer, [CONVERSATION, CONVERSATION[:3]], first_reply)


# --------------------------------------------------------------------------- packing


def test_packed_conversations_restart_positions_and_never_attend_to_each_other(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    split = chat.encode(tokenizer, chat_rows(3, 7), 512)
    lengths = [len(e["input_ids"]) for e in split.examples]
    packed = chat.collate(split, [0, 1, 2], tokenizer.pad_token_id)
    inputs = packed.inputs
    # One row, no padding; positions restart at every conversation (TRL's padding-free collator).
    assert inputs["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in inputs
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert [int(i) for i in (inputs["position_ids"][0] == 0).nonzero().flatten()] == starts
    # A conversation's first token is never predicted from the one before it.
    assert all(int(inputs["labels"][0, s]) == chat.IGNORE_INDEX for s in starts)
    assert packed.size == 3 and packed.label_tokens == sum(sum(y >= 0 for y in e["labels"]) for e in split.examples)
    assert packed.tokens == sum(lengths) == int((inputs["input_ids"] != tokenizer.pad_token_id).sum())

    model = modeling.load_causal_lm(tiny_llama)
    model.train()  # train mode (dropout is 0 in Llama): the mode the loss runs in, and the one that builds a cache
    with torch.no_grad():
        together = chat.forward(model, packed).logits[0]
        for index, start in enumerate(starts):
            alone = chat.forward(model, chat.collate(split, [index], tokenizer.pad_token_id)).logits[0]
            assert torch.allclose(together[start : start + lengths[index]], alone, atol=1e-5), index
        # Why the forward passes use_cache=False: with a cache, transformers builds one causal mask for the whole
        # row, and the second conversation attends to the first.
        cached = model(**inputs).logits[0]
        second = chat.forward(model, chat.collate(split, [1], tokenizer.pad_token_id)).logits[0]
        assert not torch.allclose(cached[starts[1] : starts[2]], second, atol=1e-3)


def test_the_packed_loss_is_the_mean_over_assistant_tokens(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    split = chat.encode(tokenizer, chat_rows(4, 3), 512)
    model = modeling.load_causal_lm(tiny_llama).eval()
    evaluation = chat.CausalLMEvaluation(torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    sums, count = 0.0, 0
    with torch.no_grad():
        for index in range(len(split)):
            example = split.examples[index]
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            sums += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets >= 0).sum())
        evaluation.add(model, chat.collate(split, [0, 1], tokenizer.pad_token_id))
        evaluation.add(model, chat.collate(split, [2, 3], tokenizer.pad_token_id))
    scores = evaluation.scores(evaluation.totals())
    assert scores["loss"] == pytest.approx(sums / count, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(torch.exp(torch.tensor(sums / count)).item(), rel=1e-5)


# --------------------------------------------------------------------------- checks before any Ray work


def test_a_chat_job_resolves_with_the_objective_template_and_llama_lora_targets(
    objects: ObjectStore, chat_version: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    resolved = _resolver(objects, tmp_path).resolve(_spec(tiny_llama, chat_version(objects)))
    spec = resolved.spec
    assert spec.task is d.TaskType.CHAT and spec.objective is d.Objective.SFT
    assert spec.lora is not None and spec.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    # The template the job trains with is pinned in the effective spec and hashed into the lineage.
    assert spec.chat_template == CHATML_TEMPLATE
    flat = d.flatten_hyper_parameters(spec)
    assert flat["objective"] == "sft" and flat["chat_template.sha256"] == chat_template_sha256(CHATML_TEMPLATE)
    # SFT reports loss and perplexity: the default validation metric is its loss, minimised.
    assert spec.hyper_parameters.early_stopping.metric == "loss"
    assert spec.hyper_parameters.early_stopping.goal is d.Goal.MINIMIZE
    assert resolved.model_info.max_positions == 512


def test_a_base_model_without_a_chat_template_needs_one_in_the_spec(
    objects: ObjectStore, chat_version: Any, templateless_llama: Path, tmp_path: Path
) -> None:
    resolver = _resolver(objects, tmp_path)
    ref = chat_version(objects)
    with pytest.raises(InvalidArgumentError, match="has no chat template, and objective sft") as caught:
        resolver.resolve(_spec(templateless_llama, ref))
    assert caught.value.details["field"] == "spec.chat_template"
    resolved = resolver.resolve(_spec(templateless_llama, ref, chat_template=CHATML_WITH_MARKERS))
    assert resolved.spec.chat_template == CHATML_WITH_MARKERS


@pytest.mark.parametrize(
    ("template", "problem"),
    [(NO_SYSTEM_TURNS, "System role not supported"), (NOT_PREFIX_PRESERVING, "not prefix-preserving")],
)
def test_a_template_that_cannot_train_the_rows_is_refused_naming_the_field(
    objects: ObjectStore, chat_version: Any, tiny_llama: Path, tmp_path: Path, template: str, problem: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=problem) as caught:
        _resolver(objects, tmp_path).resolve(_spec(tiny_llama, chat_version(objects), chat_template=template))
    assert caught.value.details["field"] == "spec.chat_template"


def test_objectives_must_match_the_dataset_versions_task(
    objects: ObjectStore,
    chat_version: Any,
    sentiment_version: Callable[..., DatasetRef],
    tiny_llama: Path,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    resolver = _resolver(objects, tmp_path)
    chats, reviews = chat_version(objects), sentiment_version(objects)
    with pytest.raises(InvalidArgumentError, match="spec.objective is sft but dataset version reviews/v1 is a") as a:
        resolver.resolve(_spec(tiny_llama, reviews, objective=d.Objective.SFT))
    with pytest.raises(InvalidArgumentError, match="spec.objective is classify but dataset version chats/v1") as b:
        resolver.resolve(_spec(tiny_model, chats, method=d.Method.FULL, objective=d.Objective.CLASSIFY))
    assert a.value.details["field"] == b.value.details["field"] == "spec.objective"
    with pytest.raises(InvalidArgumentError, match="spec.chat_template is only used by chat objectives"):
        resolver.resolve(_spec(tiny_model, reviews, method=d.Method.FULL, chat_template=CHATML_TEMPLATE))
    # Classification is unchanged: its objective is filled in, and it has no template.
    resolved = resolver.resolve(_spec(tiny_model, reviews, method=d.Method.FULL))
    assert resolved.spec.objective is d.Objective.CLASSIFY and resolved.spec.chat_template == ""
    assert resolved.spec.hyper_parameters.early_stopping.metric == "f1"


def _build_arguments(**changes: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "display_name": "t",
        "base_model": BaseModelRef(local_path="/m"),
        "dataset": DatasetRef("p", "v"),
        "task": d.TaskType.UNSPECIFIED,
        "method": d.Method.FULL,
        "lora": None,
        "hyper_parameters": d.build_hyper_parameters(method=d.Method.FULL),
        "resources": d.build_resources(),
        "search": None,
        "registered_model_name": "",
        "tags": {},
    }
    return arguments | changes


def test_the_spec_refuses_a_template_for_classification_and_a_mismatched_task() -> None:
    with pytest.raises(InvalidArgumentError, match="spec.objective sft does not train TASK_TYPE_TEXT_CLASSIFICATION"):
        d.build_spec(**_build_arguments(task=d.TaskType.TEXT_CLASSIFICATION, objective=d.Objective.SFT))
    with pytest.raises(InvalidArgumentError, match="spec.chat_template is only used by chat objectives"):
        d.build_spec(**_build_arguments(objective=d.Objective.CLASSIFY, chat_template="x"))
    with pytest.raises(InvalidArgumentError, match="spec.chat_template is 65537 characters long"):
        d.build_spec(**_build_arguments(chat_template="x" * 65537))


def test_lengths_targets_and_metrics_are_checked_against_the_model_and_objective(
    objects: ObjectStore, chat_version: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    resolver = _resolver(objects, tmp_path)
    ref = chat_version(objects)
    with pytest.raises(InvalidArgumentError, match="max_sequence_length is 1024 but the base model") as caught:
        resolver.resolve(_spec(tiny_llama, ref, hyper={"max_sequence_length": 1024}))
    assert caught.value.details["field"] == "spec.hyper_parameters.max_sequence_length"
    bert_names = replace(_spec(tiny_llama, ref), lora=d.LoraSettings(8, 16.0, 0.1, ("query", "value")))
    with pytest.raises(InvalidArgumentError, match=r"\['query', 'value'\] are not linear layers of this llama") as c:
        resolver.resolve(bert_names)
    assert c.value.details["field"] == "spec.lora.target_modules"
    mlp = replace(_spec(tiny_llama, ref), lora=d.LoraSettings(8, 16.0, 0.1, ("q_proj", "v_proj", "gate_proj")))
    assert resolver.resolve(mlp).spec.lora == d.LoraSettings(8, 16.0, 0.1, ("q_proj", "v_proj", "gate_proj"))
    accuracy = _spec(tiny_llama, ref, hyper={"early_stopping": d.build_early_stopping(metric="accuracy")})
    with pytest.raises(InvalidArgumentError, match="'accuracy' is not reported by objective sft"):
        with_objective_metrics(accuracy, ChatSft())
    # Conversations cut before any reply leave nothing to learn: refused naming the length.
    with pytest.raises(InvalidArgumentError, match="keeps an assistant token") as short:
        resolver.resolve(_spec(tiny_llama, ref, hyper={"max_sequence_length": 8}))
    assert short.value.details["field"] == "spec.hyper_parameters.max_sequence_length"


def chat_spec_proto(**fields: Any) -> pb.JobSpec:
    """A JobSpec proto of a Llama at a local path training version chats/v1, with ``fields`` set."""
    source = pb.JobSpec(**fields)
    source.base_model.local_path = "/models/llama"
    source.dataset_version.project_id, source.dataset_version.dataset_version_id = "chats", "v1"
    return source


def test_objective_and_template_round_trip_through_proto() -> None:
    source = chat_spec_proto(display_name="c", objective=pb.OBJECTIVE_SFT, chat_template=CHATML_TEMPLATE)
    spec = convert.spec_from_proto(source)
    assert spec.objective is d.Objective.SFT and spec.chat_template == CHATML_TEMPLATE
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    unset = convert.spec_from_proto(replace_proto(source, objective=pb.OBJECTIVE_UNSPECIFIED))
    assert unset.objective is None
    # DPO is available (its tests are in test_dpo.py).
    assert convert.spec_from_proto(replace_proto(source, objective=pb.OBJECTIVE_DPO)).objective is d.Objective.DPO


def replace_proto(message: pb.JobSpec, **fields: Any) -> pb.JobSpec:
    copy = pb.JobSpec()
    copy.CopyFrom(message)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


# --------------------------------------------------------------------------- the loop


def _loop_config(model: Path, sink: ListSink, **hyper: Any) -> LoopConfig:
    settings: dict[str, Any] = {
        "learning_rate": 2e-2,
        "epochs": 3,
        "per_worker_batch_size": 8,
        "eval_every_steps": 8,
        "log_every_steps": 4,
        "early_stopping": d.build_early_stopping(metric="loss"),
    } | hyper
    method = d.Method.LORA
    return LoopConfig(
        job_id="job",
        model_dir=str(model),
        label_map=(),
        examples={"train": chat_rows(64, 1), "validation": chat_rows(16, 2), "test": chat_rows(16, 3)},
        method=method,
        lora=d.build_lora(method=method, given=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        hyper=d.build_hyper_parameters(method=method, **settings),
        sink=sink,
        task="TASK_TYPE_CHAT",
        chat_template=CHATML_TEMPLATE,
    )


def test_sft_with_lora_learns_and_publishes_an_adapter_with_the_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sink = ListSink()
    session = DirectorySession(tmp_path)
    LoopRunner(_loop_config(tiny_llama, sink), 0, 1, 0, session).run()
    started = next(r for r in sink.records if r["type"] == "started")
    # LoRA r=8 on q, k, v, o of 2 layers (hidden 32, 2 kv heads of 16): A (8 x 32) and B (out x 8) each.
    assert started["trainable_parameters"] == 2 * 4 * (8 * 32 + 32 * 8) == 4096
    validation = [r["metrics"] for r in sink.records if r["type"] == "eval" and r["split"] == "validation"]
    assert [set(m) for m in validation] == [{"loss", "perplexity"}] * 3
    losses = [m["loss"] for m in validation]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.5, losses
    final = session.reports[-1]
    assert final["finished"] and {"test_loss", "test_perplexity", "validation_loss"} <= set(final)

    model_dir = session.checkpoints[-1]
    assert model_dir.name == FINAL_CHECKPOINT_NAME
    files = {p.name for p in model_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert "model.safetensors" not in files and "README.md" not in files
    adapter = load_file(str(model_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == ""
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # The tokenizer carries the template trained with; base + adapter reproduce the test loss.
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert tokenizer.chat_template == CHATML_TEMPLATE
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(model_dir)).eval()
    split = chat.encode(tokenizer, chat_rows(16, 3), 128)
    evaluation = chat.CausalLMEvaluation(torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        evaluation.add(tuned, chat.collate(split, list(range(16)), tokenizer.pad_token_id))
    assert evaluation.scores(evaluation.totals())["loss"] == pytest.approx(final["test_loss"], rel=1e-4)


def test_a_full_sft_fine_tune_publishes_a_causal_lm(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = replace(_loop_config(tiny_llama, ListSink(), max_steps=4), method=d.Method.FULL, lora=None)
    session = DirectorySession(tmp_path)
    LoopRunner(config, 0, 1, 0, session).run()
    model_dir = session.checkpoints[-1]
    files = {p.name for p in model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "chat_template.jinja"} <= files and "adapter_config.json" not in files
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.config.model_type == "llama"


def test_a_restarted_sft_run_resumes_from_its_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    class FailingSink(ListSink):
        failed = False

        def push(self, record: dict[str, Any]) -> None:
            super().push(record)
            if not self.failed and record["type"] == "train" and record["step"] >= 12:
                self.failed = True
                raise RuntimeError("worker lost")

    sink = FailingSink()
    session = DirectorySession(tmp_path)
    with pytest.raises(RuntimeError, match="worker lost"):
        LoopRunner(_loop_config(tiny_llama, sink), 0, 1, 0, session).run()
    assert [r["step"] for r in session.reports] == [8]
    LoopRunner(_loop_config(tiny_llama, sink), 0, 1, 0, session).run()
    restarted = [r for r in sink.records if r["type"] == "started"]
    assert [r["step"] for r in restarted] == [0, 8]
    assert session.reports[-1]["finished"] and session.reports[-1]["step"] == 24


# --------------------------------------------------------------------------- through the API


async def test_an_sft_job_reports_loss_and_perplexity_and_publishes_the_adapter(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_llama: Path, chat_version: Any
) -> None:
    app, stub = service
    objects = app.host.platform.objects
    chat_version(objects, "chats", "v1")
    spec = pb.JobSpec(display_name="chat", registered_model_name="chat", method=pb.TRAINING_METHOD_LORA)
    spec.base_model.local_path = str(tiny_llama)
    spec.dataset_version.project_id, spec.dataset_version.dataset_version_id = "chats", "v1"
    hp = spec.hyper_parameters
    hp.learning_rate, hp.per_worker_batch_size, hp.epochs, hp.eval_every_steps = 2e-2, 8, 2, 8
    spec.json_match_keys.append("sentiment")
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    assert job.spec.objective == pb.OBJECTIVE_SFT and job.spec.task == common_pb2.TASK_TYPE_CHAT
    assert job.spec.chat_template == CHATML_TEMPLATE and job.spec.hyper_parameters.early_stopping.metric == "loss"

    events = await job_events(stub, job.job_id, after_sequence=0)
    states = [e.state_change.state for e in events if e.WhichOneof("event") == "state_change"]
    assert states == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED], events[-1]
    reported = {(m.name, m.split) for e in events if e.WhichOneof("event") == "metrics" for m in e.metrics.metrics}
    assert {("loss", common_pb2.DATASET_SPLIT_VALIDATION), ("perplexity", common_pb2.DATASET_SPLIT_TEST)} <= reported

    done = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert list(done.spec.json_match_keys) == ["sentiment"]  # kept by the store
    result = done.result
    assert list(result.label_map.labels) == []  # a generator has no classes (the version's are review labels)
    finals = {(m.name, m.split) for m in result.metrics}
    assert {("loss", common_pb2.DATASET_SPLIT_TEST), ("perplexity", common_pb2.DATASET_SPLIT_TEST)} <= finals
    assert result.signature == convert.signature_to_proto(CHAT_SIGNATURE)
    template_sha = chat_template_sha256(CHATML_TEMPLATE)
    assert result.lineage.hyper_parameters["chat_template.sha256"] == template_sha
    assert result.lineage.base_model.local_path == str(tiny_llama) and result.lineage.base_model.content_sha256
    manifest = ModelManifest.from_json(objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256))
    assert manifest.task_type == "TASK_TYPE_CHAT"
    assert manifest.base_model == f"base model at local path {str(tiny_llama)!r}"
    assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "model-card.md"} <= set(
        manifest.files
    )
    assert manifest.lineage["hyper_parameters"]["chat_template.sha256"] == template_sha
    card = objects.get_bytes(manifest.files["model-card.md"].key).decode()
    assert "Chat model" in card and "published as a PEFT adapter of the base model" in card
    assert training_task("chat").objective is d.Objective.SFT
