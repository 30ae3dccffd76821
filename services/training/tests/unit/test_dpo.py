"""The preference task (objective dpo) on a tiny Llama, in-process: the spec's DPO settings and refusals, preference
rows, their encoding (TRL's tokenisation), the loss and rewards against TRL's DPOTrainer, the reference model (the
base with the adapter disabled, or a frozen copy), a few training steps that raise the reward accuracy, and a job
through the gRPC API."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gristmill.api.common.v1 import common_pb2
from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.chat_templates import chat_template_sha256
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.manifests import ModelManifest
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.app import TrainingApp
from gristmill.training.devtools import chat_rows, preference_rows, write_chat_version, write_preference_version
from gristmill.training.domain import spec as d
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.model import Job, JobState
from gristmill.training.domain.objectives import model_task_type
from gristmill.training.domain.resolve import DatasetCatalog, with_objective_metrics
from gristmill.training.events.payloads import job_state_changed
from gristmill.training.ml import modeling
from gristmill.training.ml import preference as P
from gristmill.training.ml.loop import FINAL_CHECKPOINT_NAME, DirectorySession, ListSink, LoopConfig, LoopRunner
from gristmill.training.tasks import job_training_task, training_task
from gristmill.training.tasks.chat import CHAT_SIGNATURE
from gristmill.training.tasks.preference import PreferenceDpo, PreferencePair
from services.training.tests.service_support import job_events
from services.training.tests.unit.test_chat_sft import (
    CHATML_WITH_MARKERS,
    NOT_PREFIX_PRESERVING,
    _build_arguments,
    _resolver,
    _spec,
)
from tests.support.tiny_model import CHATML_TEMPLATE

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _tokenizer(model: Path, template: str = "") -> Any:
    return modeling.load_tokenizer(model, chat_template=template)


def _triples(rows: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def _lora(dropout: float = 0.1) -> LoraSettings:
    return LoraSettings(8, 16.0, dropout, LLAMA_ATTENTION)


# --------------------------------------------------------------------------- the spec


def _proto(**dpo: Any) -> pb.JobSpec:
    spec = pb.JobSpec(display_name="dpo", objective=pb.OBJECTIVE_DPO, method=pb.TRAINING_METHOD_LORA)
    spec.base_model.local_path = "/models/llama"
    spec.dataset_version.project_id, spec.dataset_version.dataset_version_id = "prefs", "v1"
    if dpo:
        spec.dpo.CopyFrom(pb.DpoConfig(**dpo))
    return spec


def test_beta_zero_means_a_tenth_and_is_kept_in_range() -> None:
    assert convert.spec_from_proto(_proto()).dpo is None  # unset: the defaults are filled in when resolved
    assert convert.spec_from_proto(_proto(beta=0.0)).dpo == d.DpoSettings(beta=0.1)
    spec = convert.spec_from_proto(_proto(beta=10.0))
    assert spec.dpo == d.DpoSettings(beta=10.0) and spec.objective is d.Objective.DPO
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert d.flatten_hyper_parameters(spec)["dpo.beta"] == "10.0"
    for beta in (-0.5, 10.5, math.nan, math.inf):
        with pytest.raises(InvalidArgumentError, match=r"spec.dpo.beta must") as caught:
            convert.spec_from_proto(_proto(beta=beta))
        assert caught.value.details["field"] == "spec.dpo.beta"


def test_the_loss_is_sigmoid_unless_named_and_an_unknown_one_is_refused() -> None:
    assert convert.spec_from_proto(_proto(beta=0.2)).dpo == d.DpoSettings(0.2, d.DpoLoss.SIGMOID)
    for loss, kind in ((pb.DPO_LOSS_IPO, d.DpoLoss.IPO), (pb.DPO_LOSS_HINGE, d.DpoLoss.HINGE)):
        spec = convert.spec_from_proto(_proto(beta=0.5, loss=loss))
        assert spec.dpo == d.DpoSettings(0.5, kind)
        assert (
            convert.spec_to_proto(spec).dpo.loss == loss
            and convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
        )
        assert d.flatten_hyper_parameters(spec)["dpo.loss"] == kind.value
    with pytest.raises(InvalidArgumentError, match="spec.dpo.loss has an unknown value 9") as caught:
        convert.spec_from_proto(_proto(loss=9))
    assert caught.value.details["field"] == "spec.dpo.loss"
    configured = job_training_task("preference", dpo=d.DpoSettings(0.5, d.DpoLoss.HINGE))
    assert isinstance(configured, PreferenceDpo) and configured.settings.loss is d.DpoLoss.HINGE


def test_beta_is_searched_for_dpo_jobs_only_within_its_range(
    objects: ObjectStore, preference_version: Any, chat_version: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    from gristmill.training.domain.search import check_search_bounds, trial_spec

    def searching(*values: float) -> d.SearchSettings:
        dimension = d.build_search_dimension(
            0, parameter="dpo.beta", distribution=d.Distribution.CHOICE, values=values, method=d.Method.LORA
        )
        return d.build_search(num_trials=2, metric="loss", dimensions=[dimension])

    spec = d.build_spec(
        **_build_arguments(
            objective=d.Objective.DPO, dpo=d.DpoSettings(0.1, d.DpoLoss.IPO), search=searching(0.05, 0.5)
        )
    )
    trial = trial_spec(spec, {"dpo.beta": 0.5})
    assert trial.dpo == d.DpoSettings(0.5, d.DpoLoss.IPO) and trial.search is None
    # Before the spec is resolved the dpo settings may be absent: the trial gets the defaults with its beta.
    assert trial_spec(replace(spec, dpo=None), {"dpo.beta": 0.05}).dpo == d.DpoSettings(0.05)
    with pytest.raises(InvalidArgumentError, match="dimension 'dpo.beta' reaches 20, which is not allowed"):
        check_search_bounds(replace(spec, search=searching(0.1, 20.0)))
    with pytest.raises(InvalidArgumentError, match="spec.search.dimensions searches dpo.beta") as sft:
        d.build_spec(**_build_arguments(objective=d.Objective.SFT, search=searching(0.1, 0.5)))
    assert sft.value.details["field"] == "spec.search.dimensions"
    # Objective left to the dataset version: a chat version (SFT) is refused, a preference version (DPO) resolves.
    resolver = _resolver(objects, tmp_path, search_enabled=True)  # as with the Ray runner
    with pytest.raises(InvalidArgumentError, match="objective sft does not"):
        resolver.resolve(_spec(tiny_llama, chat_version(objects), search=searching(0.1, 0.5)))
    resolved = resolver.resolve(_spec(tiny_llama, preference_version(objects), search=searching(0.1, 0.5)))
    assert resolved.spec.dpo == d.DpoSettings() and resolved.spec.search is not None


def test_dpo_settings_with_another_objective_are_refused_naming_the_field() -> None:
    for changes in (
        {"objective": d.Objective.SFT},
        {"objective": d.Objective.CLASSIFY},
        {"task": d.TaskType.TEXT_CLASSIFICATION},
        {"task": d.TaskType.CHAT},
    ):
        with pytest.raises(InvalidArgumentError, match="spec.dpo is only used by objective dpo") as caught:
            d.build_spec(**_build_arguments(dpo=d.DpoSettings(0.2), **changes))
        assert caught.value.details["field"] == "spec.dpo"
    sft = _proto(beta=0.2)
    sft.objective = pb.OBJECTIVE_SFT
    with pytest.raises(InvalidArgumentError, match="spec.dpo is only used by objective dpo, not sft"):
        convert.spec_from_proto(sft)
    # The objective and the task type are the preference task's: accepted.
    spec = d.build_spec(**_build_arguments(dpo=d.DpoSettings(0.2), task=d.TaskType.PREFERENCE))
    assert spec.dpo == d.DpoSettings(0.2) and spec.objective is None


def test_a_dpo_job_resolves_with_its_beta_template_and_metrics(
    objects: ObjectStore, preference_version: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    resolved = _resolver(objects, tmp_path).resolve(_spec(tiny_llama, preference_version(objects)))
    spec = resolved.spec
    assert spec.task is d.TaskType.PREFERENCE and spec.objective is d.Objective.DPO
    # The effective spec carries the default beta (GetJob shows it), the template and the Llama's LoRA targets.
    assert spec.dpo == d.DpoSettings(beta=0.1) and spec.chat_template == CHATML_TEMPLATE
    assert spec.lora is not None and spec.lora.target_modules == LLAMA_ATTENTION
    # The default validation metric is the DPO loss, minimised.
    assert (spec.hyper_parameters.early_stopping.metric, spec.hyper_parameters.early_stopping.goal) == (
        "loss",
        d.Goal.MINIMIZE,
    )
    flat = d.flatten_hyper_parameters(spec)
    assert flat["objective"] == "dpo" and flat["dpo.beta"] == "0.1"
    assert flat["chat_template.sha256"] == chat_template_sha256(CHATML_TEMPLATE)
    proto = convert.spec_to_proto(spec)
    assert proto.dpo.beta == pytest.approx(0.1) and proto.objective == pb.OBJECTIVE_DPO
    # A beta given in the spec is kept.
    given = _resolver(objects, tmp_path).resolve(_spec(tiny_llama, preference_version(objects), dpo=d.DpoSettings(2.0)))
    assert given.spec.dpo == d.DpoSettings(2.0)
    # The preference version trains a chat model.
    assert model_task_type(spec.task) is d.TaskType.CHAT and model_task_type(d.TaskType.CHAT) is d.TaskType.CHAT


def test_dpo_reports_reward_metrics_and_refuses_others() -> None:
    task = training_task("preference")
    assert task.metrics == ("loss", "reward_accuracy", "reward_margin")
    assert set(task.metrics) <= set(d.VALIDATION_METRICS)
    spec = d.build_spec(**_build_arguments(task=d.TaskType.PREFERENCE))
    for metric in ("reward_accuracy", "reward_margin"):
        chosen = replace(
            spec,
            hyper_parameters=replace(spec.hyper_parameters, early_stopping=d.build_early_stopping(metric=metric)),
        )
        stopping = with_objective_metrics(chosen, task).hyper_parameters.early_stopping
        assert (stopping.metric, stopping.goal) == (metric, d.Goal.MAXIMIZE)
        assert d.build_search(num_trials=2, metric=metric, dimensions=[_dimension()]).goal is d.Goal.MAXIMIZE
    perplexity = replace(
        spec,
        hyper_parameters=replace(spec.hyper_parameters, early_stopping=d.build_early_stopping(metric="perplexity")),
    )
    with pytest.raises(InvalidArgumentError, match="'perplexity' is not reported by objective dpo"):
        with_objective_metrics(perplexity, task)
    # Classification and SFT do not report rewards.
    rewarded = replace(
        spec,
        hyper_parameters=replace(
            spec.hyper_parameters, early_stopping=d.build_early_stopping(metric="reward_accuracy")
        ),
    )
    with pytest.raises(InvalidArgumentError, match="'reward_accuracy' is not reported by objective sft"):
        with_objective_metrics(rewarded, training_task("chat"))


def _dimension() -> d.SearchDimension:
    return d.build_search_dimension(
        0, parameter="learning_rate", distribution=d.Distribution.CHOICE, values=[1e-3, 1e-4], method=d.Method.LORA
    )


def test_objectives_datasets_and_templates_must_fit_dpo(
    objects: ObjectStore,
    preference_version: Any,
    chat_version: Any,
    tiny_llama: Path,
    templateless_llama: Path,
    tmp_path: Path,
) -> None:
    resolver = _resolver(objects, tmp_path)
    prefs, chats = preference_version(objects), chat_version(objects)
    with pytest.raises(InvalidArgumentError, match="spec.objective is dpo but dataset version chats/v1 is a") as a:
        resolver.resolve(_spec(tiny_llama, chats, objective=d.Objective.DPO))
    with pytest.raises(InvalidArgumentError, match="spec.objective is sft but dataset version prefs/v1 is a") as b:
        resolver.resolve(_spec(tiny_llama, prefs, objective=d.Objective.SFT))
    assert a.value.details["field"] == b.value.details["field"] == "spec.objective"
    # DPO settings on a chat version (objective unset: the version's, sft).
    with pytest.raises(InvalidArgumentError, match="spec.dpo is only used by objective dpo, not sft") as c:
        resolver.resolve(_spec(tiny_llama, chats, dpo=d.DpoSettings(0.5)))
    assert c.value.details["field"] == "spec.dpo"
    # A base without a chat template needs one in the spec, as for sft.
    with pytest.raises(InvalidArgumentError, match="has no chat template, and objective dpo") as e:
        resolver.resolve(_spec(templateless_llama, prefs))
    assert e.value.details["field"] == "spec.chat_template"
    resolved = resolver.resolve(_spec(templateless_llama, prefs, chat_template=CHATML_WITH_MARKERS))
    assert resolved.spec.chat_template == CHATML_WITH_MARKERS
    # A template that renders an earlier assistant turn differently once later turns follow cannot place the reply.
    with pytest.raises(InvalidArgumentError, match="not prefix-preserving") as f:
        resolver.resolve(_spec(tiny_llama, prefs, chat_template=NOT_PREFIX_PRESERVING))
    assert f.value.details["field"] == "spec.chat_template"
    # Prompts that fill the whole length leave no reply token.
    with pytest.raises(InvalidArgumentError, match="keeps a token of both replies") as g:
        resolver.resolve(_spec(tiny_llama, prefs, hyper={"max_sequence_length": 8}))
    assert g.value.details["field"] == "spec.hyper_parameters.max_sequence_length"


# --------------------------------------------------------------------------- rows


def test_a_preference_version_is_read_as_checked_pairs(objects: ObjectStore, preference_version: Any) -> None:
    resolved = DatasetCatalog(objects).resolve(preference_version(objects, train=12, held_out=4))
    assert resolved.task is d.TaskType.PREFERENCE and resolved.counts == {"train": 12, "validation": 4, "test": 4}
    assert resolved.label_map == ()
    first = resolved.splits.examples["train"][0]
    row = preference_rows(12, 1)[0]
    assert first == PreferencePair(row["prompt"], row["chosen"], row["rejected"])
    assert [m["role"] for m in first.prompt] == ["system", "user", "assistant", "user"]
    assert first.chosen == [{"role": "assistant", "content": first.prompt[-1]["content"].removeprefix("repeat ")}]


def test_an_item_with_several_pairs_counts_once(objects: ObjectStore) -> None:
    # Labeling publishes a row per pair a ranking orders, all with the item's id; the manifest counts items.
    a, b = preference_rows(2, 5)
    third = {**a, "rejected": b["rejected"]}
    ref = write_preference_version(
        objects,
        project_id="prefs",
        dataset_version_id="ranked",
        splits={"train": [{"id": "item-1", "pair": 0, **a}, {"id": "item-1", "pair": 1, **third}, b]},
    )
    resolved = DatasetCatalog(objects).resolve(ref)
    assert resolved.manifest.splits["train"].count == 2 and resolved.counts["train"] == 3


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "must end before"),
        ({"chosen": [{"role": "user", "content": "y"}]}, "field 'chosen': the reply must be one or more assistant"),
        ({"rejected": []}, "field 'rejected': the reply must be one or more assistant turns"),
        ({"rejected": "no"}, "needs a string 'id' and 'prompt', 'chosen' and 'rejected' message lists"),
    ],
)
def test_a_bad_preference_row_is_refused_naming_the_line(
    objects: ObjectStore, change: dict[str, Any], problem: str
) -> None:
    rows = preference_rows(3, 1)
    rows[2] = {**rows[2], **change}
    ref = write_preference_version(objects, project_id="prefs", dataset_version_id="bad", splits={"train": rows})
    with pytest.raises(FailedPreconditionError, match=f"datasets/prefs/bad/train.jsonl line 3.*{problem}"):
        DatasetCatalog(objects).resolve(ref)


def test_sft_rows_in_a_preference_version_are_refused(objects: ObjectStore) -> None:
    ref = write_chat_version(
        objects,
        project_id="prefs",
        dataset_version_id="sft",
        splits={"train": chat_rows(2, 1)},
        task_type="TASK_TYPE_PREFERENCE",
    )
    with pytest.raises(FailedPreconditionError, match="has 'sft-messages' rows, but objective dpo reads"):
        DatasetCatalog(objects).resolve(ref)


# --------------------------------------------------------------------------- encoding


def _trl_tokenisation(tokenizer: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    """What TRL's DPOTrainer._prepare_dataset computes for a conversational row."""
    from trl.data_utils import _tokenize, common_prefix_length

    prompt = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
    chosen = _tokenize(tokenizer, row["prompt"] + row["chosen"])["input_ids"]
    rejected = _tokenize(tokenizer, row["prompt"] + row["rejected"])["input_ids"]
    length = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt_ids": list(prompt[:length]), "chosen_ids": list(chosen[length:]), "rejected_ids": rejected[length:]}


def test_pairs_are_tokenised_as_trl_does_with_the_replies_as_completions(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    rows = preference_rows(8, 4)
    split = P.encode(tokenizer, _triples(rows), 512)
    assert len(split) == 8 and split.dropped == 0
    for row, example in zip(rows, split.examples, strict=True):
        assert example == {k: list(v) for k, v in _trl_tokenisation(tokenizer, row).items()}
    first = split.examples[0]
    # The completion is the reply with its end-of-turn token, never the header or the prompt's earlier reply.
    assert tokenizer.decode(first["chosen_ids"]) == rows[0]["chosen"][0]["content"] + "<|im_end|>\n"
    assert tokenizer.decode(first["rejected_ids"]) == rows[0]["rejected"][0]["content"] + "<|im_end|>\n"
    assert tokenizer.decode(first["prompt_ids"]).endswith("<|im_start|>assistant\n")
    # The same tokens as serving's apply_chat_template renders prompt + reply.
    rendered = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=True, return_dict=False)
    assert first["prompt_ids"] + first["chosen_ids"] == list(rendered)
    # A template with generation markers places the replies the same way.
    marked = P.encode(_tokenizer(tiny_llama, CHATML_WITH_MARKERS), _triples(rows), 512)
    assert marked.examples == split.examples


def test_long_pairs_keep_their_start_and_those_left_without_a_reply_are_dropped(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    rows = preference_rows(2, 4)
    full = P.encode(tokenizer, _triples(rows), 512).examples
    prompt = len(full[0]["prompt_ids"])
    cut = P.encode(tokenizer, _triples(rows[:1]), prompt + 2).examples[0]
    assert cut == {**full[0], "chosen_ids": full[0]["chosen_ids"][:2], "rejected_ids": full[0]["rejected_ids"][:2]}
    # The second row's prompt is shorter: it is kept when the first one is dropped.
    assert len(full[1]["prompt_ids"]) < prompt
    split = P.encode(tokenizer, _triples(rows), prompt)
    assert split.examples == [
        {**full[1], **{k: full[1][k][: prompt - len(full[1]["prompt_ids"])] for k in ("chosen_ids", "rejected_ids")}}
    ]
    assert split.dropped == 1
    with pytest.raises(P.NoPreferencePairsError, match="none of the 2 preference pairs keeps a token of both replies"):
        P.encode(tokenizer, _triples(rows), len(full[1]["prompt_ids"]))


def test_a_batch_is_chosen_then_rejected_with_labels_on_the_completions(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    split = P.encode(tokenizer, _triples(preference_rows(3, 4)), 512)
    batch = P.collate(split, [2, 0], tokenizer.pad_token_id)
    assert batch.size == 2 and batch.input_ids.shape[0] == 4 and batch.indices == (2, 0)
    # Tokens trained on: both pairs' chosen and rejected sequences, padding left out.
    assert batch.tokens == sum(
        len(split.examples[i]["prompt_ids"]) * 2
        + len(split.examples[i]["chosen_ids"] + split.examples[i]["rejected_ids"])
        for i in (2, 0)
    )
    assert batch.tokens < batch.input_ids.numel()
    for row, (index, side) in enumerate(
        [(2, "chosen_ids"), (0, "chosen_ids"), (2, "rejected_ids"), (0, "rejected_ids")]
    ):
        example = split.examples[index]
        ids = example["prompt_ids"] + example[side]
        assert batch.input_ids[row, : len(ids)].tolist() == ids
        assert int(batch.attention_mask[row].sum()) == len(ids)
        labelled = batch.labels[row][batch.labels[row] != P.IGNORE_INDEX].tolist()
        assert labelled == example[side]


# --------------------------------------------------------------------------- the loss, against TRL


def _perturbed_policy(model_dir: Path, lora: LoraSettings | None) -> torch.nn.Module:
    """A DPO policy that has moved away from its reference (as training would move it)."""
    torch.manual_seed(0)
    policy = PreferenceDpo().build_model(model_dir, (), lora)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if lora is None:
                parameter.add_(torch.randn_like(parameter) * 0.05)
            elif "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    return policy.eval()


def _trl_dpo(
    policy: torch.nn.Module, reference: torch.nn.Module | None, inputs: dict[str, Any], beta: float, loss_type: str
) -> Any:
    """TRL's DPOTrainer loss and logged metrics on ``inputs``, its own code run on a minimal trainer (one process)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    # TRL's metrics read more per-token outputs of the fused head than the loss needs.
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    patched: Any = policy.get_base_model() if reference is None else policy  # type: ignore[operator]
    add_fused_lm_head(patched, outputs=outputs)
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t, unwrap_model=lambda m: m
    )
    trainer = SimpleNamespace(
        model=policy,
        ref_model=reference,
        accelerator=accelerator,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)  # type: ignore[arg-type,no-untyped-call]
    return float(loss), trainer._metrics["eval"]


@pytest.mark.parametrize(
    ("method", "kind"),
    [(d.Method.LORA, d.DpoLoss.SIGMOID), (d.Method.FULL, d.DpoLoss.SIGMOID)]
    + [(method, kind) for method in (d.Method.LORA, d.Method.FULL) for kind in (d.DpoLoss.IPO, d.DpoLoss.HINGE)],
)
def test_the_loss_and_rewards_are_trls(tiny_llama: Path, method: d.Method, kind: d.DpoLoss) -> None:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    beta = 0.5
    tokenizer = _tokenizer(tiny_llama)
    policy = _perturbed_policy(tiny_llama, _lora() if method is d.Method.LORA else None)
    split = P.encode(tokenizer, _triples(preference_rows(6, 8)), 512)
    indices = list(range(6))
    with torch.no_grad():
        terms = P.pair_terms(policy, P.collate(split, indices, tokenizer.pad_token_id), beta, kind)
    margins = terms.chosen_rewards - terms.rejected_rewards
    # The policy moved: not the untrained value (log 2, 1 / (2 beta)^2 or 1).
    untrained = {d.DpoLoss.SIGMOID: math.log(2), d.DpoLoss.IPO: (1 / (2 * beta)) ** 2, d.DpoLoss.HINGE: 1.0}[kind]
    assert abs(float(terms.losses.mean()) - untrained) > 1e-3

    inputs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([split.examples[i] for i in indices])
    loss, metrics = _trl_dpo(policy, P.frozen_reference(policy), inputs, beta, kind.value)
    assert float(terms.losses.mean()) == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert float((margins > 0).float().mean()) == pytest.approx(metrics["rewards/accuracies"][0])
    assert float(margins.mean()) == pytest.approx(metrics["rewards/margins"][0], rel=1e-5, abs=1e-6)
    assert float(terms.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"][0], rel=1e-5, abs=1e-6)
    assert float(terms.rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"][0], rel=1e-5, abs=1e-6)


def test_completion_log_probabilities_are_the_sums_over_the_reply_tokens(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    policy = _perturbed_policy(tiny_llama, _lora())
    split = P.encode(tokenizer, _triples(preference_rows(2, 8)), 512)
    batch = P.collate(split, [0, 1], tokenizer.pad_token_id)
    with torch.no_grad():
        fused = P.policy_logps(policy, batch)
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    per_token = torch.gather(logits.log_softmax(-1), -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    naive = (per_token * (targets != P.IGNORE_INDEX)).sum(dim=1)
    assert torch.allclose(fused, naive, atol=1e-4)


def test_dpo_loss_matches_its_formula() -> None:
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    reference_chosen, reference_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    terms = P.dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=0.1)
    # Pair 1: margin (0.5 - (-1.0)) = 1.5; pair 2: (-1.0 - 1.0) = -2.0.
    expected = [-math.log(1 / (1 + math.exp(-0.1 * 1.5))), -math.log(1 / (1 + math.exp(0.1 * 2.0)))]
    assert terms.losses.tolist() == pytest.approx(expected)
    assert terms.chosen_rewards.tolist() == pytest.approx([0.05, -0.1])
    assert terms.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])
    hinge = P.dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=2.0, loss=d.DpoLoss.HINGE)
    # relu(1 - 2 * 1.5) = 0; relu(1 - 2 * (-2.0)) = 5.
    assert hinge.losses.tolist() == pytest.approx([0.0, 5.0])
    tokens = (torch.tensor([2, 4]), torch.tensor([1, 2]))
    ipo = P.dpo_loss(chosen, rejected, reference_chosen, reference_rejected, 0.5, d.DpoLoss.IPO, tokens)
    # Per token: pair 1: 0.5 / 2 - (-1.0) / 1 = 1.25; pair 2: -1.0 / 4 - 1.0 / 2 = -0.75; target 1 / (2 * 0.5) = 1.
    assert ipo.losses.tolist() == pytest.approx([(1.25 - 1) ** 2, (-0.75 - 1) ** 2])
    with pytest.raises(ValueError, match="token counts"):
        P.dpo_loss(chosen, rejected, reference_chosen, reference_rejected, 0.5, d.DpoLoss.IPO)


# --------------------------------------------------------------------------- the reference model


def test_the_lora_reference_is_the_base_with_the_adapter_disabled(tiny_llama: Path) -> None:
    tokenizer = _tokenizer(tiny_llama)
    policy = _perturbed_policy(tiny_llama, _lora())
    assert P.frozen_reference(policy) is None  # no second model
    base = P.prepare(modeling.load_causal_lm(tiny_llama)).eval()
    split = P.encode(tokenizer, _triples(preference_rows(4, 8)), 512)
    batch = replace(P.collate(split, [0, 1, 2, 3], tokenizer.pad_token_id), reference_cache=None)
    with torch.no_grad():
        before = P.policy_logps(policy, batch)
        reference = P.reference_logps(policy, batch)
        after = P.policy_logps(policy, batch)
        expected = P.policy_logps(base, batch)
    assert torch.allclose(reference, expected, atol=1e-5)
    # The adapter is active again after the reference pass, and it changes the log-probabilities.
    assert torch.equal(before, after) and not torch.allclose(before, reference, atol=1e-3)


def test_reference_log_probabilities_are_kept_by_the_split(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = _tokenizer(tiny_llama)
    policy = _perturbed_policy(tiny_llama, _lora())
    split = P.encode(tokenizer, _triples(preference_rows(4, 8)), 512)
    passes: list[int] = []
    original = P._reference_pass

    def counting(model: torch.nn.Module, batch: P.PreferenceBatch) -> torch.Tensor:
        passes.append(batch.pairs)
        return original(model, batch)

    monkeypatch.setattr(P, "_reference_pass", counting)
    with torch.no_grad():
        first = P.reference_logps(policy, P.collate(split, [0, 1], tokenizer.pad_token_id))
        P.reference_logps(policy, P.collate(split, [2, 3], tokenizer.pad_token_id))
        # Other batches of known pairs need no reference pass, whatever their padding.
        again = P.reference_logps(policy, P.collate(split, [1, 0], tokenizer.pad_token_id))
        P.reference_logps(policy, P.collate(split, [3, 0, 2], tokenizer.pad_token_id))
    assert passes == [2, 2]
    assert torch.allclose(again, torch.stack([first[1], first[0], first[3], first[2]]))


def _loop_config(model: Path, sink: ListSink, *, method: d.Method = d.Method.LORA, **hyper: Any) -> LoopConfig:
    settings: dict[str, Any] = {
        "learning_rate": 1e-2,
        "epochs": 2,
        "per_worker_batch_size": 8,
        "eval_every_steps": 3,
        "log_every_steps": 3,
        "warmup_ratio": 0.0,
        "early_stopping": d.build_early_stopping(metric="loss"),
    } | hyper
    return LoopConfig(
        job_id="job",
        model_dir=str(model),
        label_map=(),
        examples={
            "train": [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in preference_rows(48, 1)],
            "validation": [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in preference_rows(16, 2)],
            "test": [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in preference_rows(16, 3)],
        },
        method=method,
        lora=_lora() if method is d.Method.LORA else None,
        hyper=d.build_hyper_parameters(method=method, **settings),
        sink=sink,
        task="TASK_TYPE_PREFERENCE",
        chat_template=CHATML_TEMPLATE,
        dpo=d.DpoSettings(beta=0.5),
    )


def test_dpo_with_lora_raises_the_reward_accuracy_and_publishes_an_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sink = ListSink()
    session = DirectorySession(tmp_path)
    runner = LoopRunner(_loop_config(tiny_llama, sink), 0, 1, 0, session)
    assert isinstance(runner.task, PreferenceDpo) and runner.task.settings.beta == 0.5
    runner.run()
    started = next(r for r in sink.records if r["type"] == "started")
    assert started["trainable_parameters"] == 4096 and started["total_steps"] == 12
    validation = [r["metrics"] for r in sink.records if r["type"] == "eval" and r["split"] == "validation"]
    assert [set(m) for m in validation] == [{"loss", "reward_accuracy", "reward_margin"}] * 4
    first, last = validation[0], validation[-1]
    assert last["reward_accuracy"] >= 0.9 and last["reward_accuracy"] > first["reward_accuracy"], validation
    assert last["loss"] < first["loss"] < math.log(2) and last["reward_margin"] > first["reward_margin"] > 0, validation
    final = session.reports[-1]
    assert final["finished"] and {"test_loss", "test_reward_accuracy", "test_reward_margin"} <= set(final)
    assert final["test_reward_accuracy"] >= 0.9

    model_dir = session.checkpoints[-1]
    assert model_dir.name == FINAL_CHECKPOINT_NAME
    files = {p.name for p in model_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert "model.safetensors" not in files
    # Base + the published adapter reproduce the test metrics (the base with the adapter disabled is the reference).
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert tokenizer.chat_template == CHATML_TEMPLATE
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    tuned = P.as_policy(PeftModel.from_pretrained(base, str(model_dir))).eval()
    split = P.encode(tokenizer, _triples(preference_rows(16, 3)), 128)
    evaluation = P.PreferenceEvaluation(0.5, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        evaluation.add(tuned, P.collate(split, list(range(16)), tokenizer.pad_token_id))
    scores = evaluation.scores(evaluation.totals())
    assert scores["loss"] == pytest.approx(final["test_loss"], rel=1e-4)
    assert scores["reward_accuracy"] == pytest.approx(final["test_reward_accuracy"])


def test_a_full_dpo_fine_tune_keeps_a_frozen_reference_out_of_training_and_the_artifact(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    config = _loop_config(tiny_llama, ListSink(), method=d.Method.FULL, max_steps=3, learning_rate=1e-3)
    runner = LoopRunner(config, 0, 1, 0, DirectorySession(tmp_path))
    runner.run()
    policy = runner.model
    reference = P.frozen_reference(policy)
    assert reference is not None and reference is not policy
    base = modeling.load_causal_lm(tiny_llama)
    base_count = sum(p.numel() for p in base.parameters())
    # Not trained: no gradients, eval mode, the base's weights after the steps that moved the policy's.
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    for name, value in base.state_dict().items():
        assert torch.equal(reference.state_dict()[name], value), name
    assert any(not torch.equal(policy.state_dict()[n], v) for n, v in base.state_dict().items())
    # Neither a parameter of the policy nor in the optimizer: the counts are one model's.
    assert runner.trainable_parameters == runner.total_parameters == base_count
    optimised = {id(p) for group in runner.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in reference.parameters()}
    assert sum(p.numel() for group in runner.optimizer.param_groups for p in group["params"]) == base_count
    # The artifact is the policy alone.
    model_dir = runner.session.checkpoints[-1]  # type: ignore[attr-defined]
    saved = load_file(str(model_dir / "model.safetensors"))
    assert "adapter_config.json" not in {p.name for p in model_dir.iterdir()}
    assert sum(t.numel() for t in saved.values()) <= base_count
    assert torch.equal(saved["model.norm.weight"], policy.state_dict()["model.norm.weight"])


def test_a_merged_dpo_model_is_scored_against_the_kept_reference(tiny_llama: Path, tmp_path: Path) -> None:
    # The merged model has no adapter to disable: its test pairs' reference log-probabilities are the ones the
    # adapter model's test evaluation computed.
    config = replace(_loop_config(tiny_llama, ListSink(), max_steps=3), publish_merged=True)
    session = DirectorySession(tmp_path)
    LoopRunner(config, 0, 1, 0, session).run()
    final = session.reports[-1]
    assert final["test_merged_loss"] == pytest.approx(final["test_loss"], rel=1e-3, abs=1e-4)
    assert final["test_merged_reward_accuracy"] == pytest.approx(final["test_reward_accuracy"])
    assert (session.checkpoints[-1] / "merged" / "model.safetensors").is_file()


def test_the_loop_runs_the_jobs_beta() -> None:
    assert job_training_task("TASK_TYPE_PREFERENCE") is training_task("preference")
    configured = job_training_task("preference", dpo=d.DpoSettings(beta=2.0))
    assert isinstance(configured, PreferenceDpo) and configured.settings.beta == 2.0
    assert job_training_task("chat", dpo=d.DpoSettings(beta=2.0)) is training_task("chat")


# --------------------------------------------------------------------------- through the API


async def test_a_dpo_job_reports_rewards_and_publishes_a_chat_adapter(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_llama: Path, preference_version: Any
) -> None:
    app, stub = service
    objects = app.host.platform.objects
    preference_version(objects, "prefs", "v1", train=32, held_out=8)
    spec = pb.JobSpec(display_name="dpo", registered_model_name="dpo", method=pb.TRAINING_METHOD_LORA)
    spec.base_model.local_path = str(tiny_llama)
    spec.dataset_version.project_id, spec.dataset_version.dataset_version_id = "prefs", "v1"
    hp = spec.hyper_parameters
    hp.learning_rate, hp.per_worker_batch_size, hp.epochs, hp.eval_every_steps = 1e-2, 8, 1, 2
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    assert job.spec.objective == pb.OBJECTIVE_DPO and job.spec.task == common_pb2.TASK_TYPE_PREFERENCE
    assert job.spec.HasField("dpo") and job.spec.dpo.beta == pytest.approx(0.1)
    assert job.spec.chat_template == CHATML_TEMPLATE and job.spec.hyper_parameters.early_stopping.metric == "loss"

    events = await job_events(stub, job.job_id, after_sequence=0)
    states = [e.state_change.state for e in events if e.WhichOneof("event") == "state_change"]
    assert states == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED], events[-1]
    reported = {(m.name, m.split) for e in events if e.WhichOneof("event") == "metrics" for m in e.metrics.metrics}
    assert {
        ("reward_accuracy", common_pb2.DATASET_SPLIT_VALIDATION),
        ("reward_margin", common_pb2.DATASET_SPLIT_VALIDATION),
        ("reward_accuracy", common_pb2.DATASET_SPLIT_TEST),
    } <= reported

    done = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert done.spec.dpo.beta == pytest.approx(0.1)
    result = done.result
    finals = {(m.name, m.split) for m in result.metrics}
    assert {(name, common_pb2.DATASET_SPLIT_TEST) for name in ("loss", "reward_accuracy", "reward_margin")} <= finals
    assert result.signature == convert.signature_to_proto(CHAT_SIGNATURE) and list(result.label_map.labels) == []
    hyper = result.lineage.hyper_parameters
    assert hyper["objective"] == "dpo" and hyper["dpo.beta"] == "0.1"
    assert hyper["chat_template.sha256"] == chat_template_sha256(CHATML_TEMPLATE)
    manifest = ModelManifest.from_json(objects.get_bytes(result.manifest.key, expected_sha256=result.manifest.sha256))
    # A DPO-trained model is a chat model (what the registry registers).
    assert manifest.task_type == "TASK_TYPE_CHAT"
    assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja"} <= set(manifest.files)
    assert json.loads(objects.get_bytes(manifest.files["adapter_config.json"].key))["base_model_name_or_path"] == ""
    card = objects.get_bytes(manifest.files["model-card.md"].key).decode()
    assert "direct preference optimisation" in card and "| dpo.beta | 0.1 |" in card


def test_the_jobs_events_name_the_chat_task() -> None:
    job = Job(
        job_id="j",
        organization_id="o",
        spec=replace(d.build_spec(**_build_arguments(task=d.TaskType.PREFERENCE)), objective=d.Objective.DPO),
        state=JobState.QUEUED,
        create_time=datetime.now(UTC),
    )
    assert job_state_changed(job, None).task == common_pb2.TASK_TYPE_CHAT
