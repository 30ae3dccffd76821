"""JSON metrics of the generation evaluation (sft and dpo): a reply scored against a JSON reference (``json_valid``,
``json_match_<key>``), their accumulation over replies, ``spec.json_match_keys`` (refusals naming the field, nothing
stored; the proto and store round trips) and DPO's replies scored against the chosen reply, in a loop on the tiny
Llama."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.serialization import from_plain, to_plain
from gristmill.training.api import convert
from gristmill.training.app import TrainingApp
from gristmill.training.devtools import chat_rows
from gristmill.training.domain import spec as d
from gristmill.training.ml import chat, modeling
from gristmill.training.ml.loop import DirectorySession, ListSink, LoopRunner
from gristmill.training.tasks.preference import PreferenceDpo, PreferencePair
from services.training.tests.service_support import job_spec
from services.training.tests.unit.test_chat_sft import _build_arguments
from services.training.tests.unit.test_dpo import _loop_config as _dpo_loop_config
from services.training.tests.unit.test_sft_generation import (
    ScriptedModel,
    _no_autocast,
    _rendered_prompt,
    json_conversations,
)

SENTIMENT = '{"sentiment": "positive", "reason": "says good"}'


# --------------------------------------------------------------------------- one reply


@pytest.mark.parametrize(
    ("generation", "reference", "expected"),
    [
        # Same keys; values compared after strip + casefold ("reason" differs).
        (
            ' {"sentiment": " Positive", "reason": "other"}\n',
            SENTIMENT,
            {"json_valid": 1.0, "json_match_sentiment": 1.0, "json_match_reason": 0.0},
        ),
        # Not JSON: invalid, and every key a miss.
        ("positive", SENTIMENT, {"json_valid": 0.0, "json_match_sentiment": 0.0, "json_match_reason": 0.0}),
        # A markdown code fence is not JSON.
        (
            f"```json\n{SENTIMENT}\n```",
            SENTIMENT,
            {"json_valid": 0.0, "json_match_sentiment": 0.0, "json_match_reason": 0.0},
        ),
        # Another JSON value than an object.
        ('["positive"]', SENTIMENT, {"json_valid": 0.0, "json_match_sentiment": 0.0, "json_match_reason": 0.0}),
        # Other top-level keys: not valid, though the sentiment matches.
        (
            '{"sentiment": "positive", "reason": "says good", "extra": 1}',
            SENTIMENT,
            {"json_valid": 0.0, "json_match_sentiment": 1.0, "json_match_reason": 1.0},
        ),
        # A key the reply lacks is a miss.
        (
            '{"label": "positive"}',
            SENTIMENT,
            {"json_valid": 0.0, "json_match_sentiment": 0.0, "json_match_reason": 0.0},
        ),
        # A key the reference lacks is not scored (neither hit nor miss).
        ('{"sentiment": "positive"}', '{"sentiment": "positive"}', {"json_valid": 1.0, "json_match_sentiment": 1.0}),
        # A reference that is not a JSON object: no JSON metric at all.
        ('{"sentiment": "positive"}', "positive", {}),
        ('["a"]', '["a"]', {}),
        (SENTIMENT, f"```json\n{SENTIMENT}\n```", {}),
    ],
)
def test_a_reply_is_scored_against_a_json_reference(
    generation: str, reference: str, expected: dict[str, float]
) -> None:
    scores = chat.reply_scores(generation, reference, ("sentiment", "reason"))
    assert {k: v for k, v in scores.items() if k.startswith("json_")} == expected
    assert set(scores) - set(expected) == {"exact_match", "rouge_l"}
    assert scores["exact_match"] == chat.exact_match(generation, reference)


def test_json_values_compare_strings_case_and_space_insensitively_and_nothing_else() -> None:
    equal = chat.json_values_equal
    assert equal(" POSITIVE\n", "positive") and equal("Straße", "STRASSE")  # casefold, not lower
    assert equal({"a": [" X ", 1]}, {"a": ["x", 1.0]})
    assert not equal(["x", "y"], ["y", "x"]) and not equal({"a": 1}, {"a": 1, "b": 2})
    assert not equal(True, 1) and not equal(0, False) and equal(True, True)
    assert not equal("1", 1) and not equal(None, "") and equal(None, None)
    assert chat.json_object('\n {"a": 1} ') == {"a": 1}
    assert chat.json_object('{"a": 1') is None and chat.json_object("null") is None
    assert chat.json_object("[" * 100_000) is None  # too deep for the parser: not JSON, not a crash


# --------------------------------------------------------------------------- over replies


def test_json_metrics_are_means_over_the_replies_they_apply_to(tiny_llama: Path) -> None:
    tokenizer = modeling.load_tokenizer(tiny_llama)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversations = [*json_conversations(4), *chat_rows(2, 3)]
    generated = [
        '{"sentiment": "POSITIVE", "review": 0}',  # valid, right
        '{"sentiment": "positive", "review": 1}',  # valid, wrong
        '```json\n{"sentiment": "positive", "review": 2}\n```',  # fenced: invalid, a miss
        '{"sentiment": "negative"}',  # other keys: invalid, right
        "good bad",
        "good bad",
    ]
    replies = {
        _rendered_prompt(tokenizer, messages): [*tokenizer(text)["input_ids"], end]
        for messages, text in zip(conversations, generated, strict=True)
    }
    evaluation = chat.ChatGenerationEvaluation(
        tokenizer, torch.device("cpu"), _no_autocast, json_match_keys=("sentiment", "missing"), margin=64
    )
    evaluation.add(ScriptedModel(tokenizer, replies), conversations)
    scores = evaluation.scores(evaluation.totals())
    # json_valid and json_match_sentiment over the 4 JSON references; no reference holds "missing": not reported.
    assert scores["json_valid"] == pytest.approx(1 / 2) and scores["json_match_sentiment"] == pytest.approx(1 / 2)
    assert set(scores) == {"exact_match", "rouge_l", "json_valid", "json_match_sentiment"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    # Without a JSON reference, no JSON metric.
    plain = chat.ChatGenerationEvaluation(tokenizer, torch.device("cpu"), _no_autocast, json_match_keys=("sentiment",))
    plain.add(ScriptedModel(tokenizer, replies), conversations[4:])
    assert set(plain.scores(plain.totals())) == {"exact_match", "rouge_l"}


def test_dpo_replies_to_test_prompts_are_scored_against_the_chosen_reply(tiny_llama: Path) -> None:
    tokenizer = modeling.load_tokenizer(tiny_llama)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pairs = [
        PreferencePair(
            [{"role": "user", "content": f"classify review {n}"}],
            [{"role": "assistant", "content": json.dumps({"sentiment": label})}],
            [{"role": "assistant", "content": label}],
        )
        for n, label in enumerate(("positive", "negative"))
    ]
    replies = {
        _rendered_prompt(tokenizer, [*pair.prompt, *pair.chosen]): [*tokenizer(text)["input_ids"], end]
        for pair, text in zip(pairs, ('{"sentiment": "positive"}', '{"sentiment": "positive"}'), strict=True)
    }
    evaluation = PreferenceDpo().generation_evaluation(
        tokenizer, torch.device("cpu"), _no_autocast, json_match_keys=("sentiment",)
    )
    evaluation.add(ScriptedModel(tokenizer, replies), pairs)
    assert evaluation.scores(evaluation.totals()) == pytest.approx(
        # The second reply: 1 of 2 whitespace tokens right, ROUGE-L 1/2.
        {"exact_match": 0.5, "rouge_l": 0.75, "json_valid": 1.0, "json_match_sentiment": 0.5}
    )
    assert [s.reference for s in evaluation.samples()] == [pair.chosen[0]["content"] for pair in pairs]
    assert evaluation.samples()[0].prompt == pairs[0].prompt


def test_a_dpo_job_reports_generation_metrics_on_its_test_prompts(tiny_llama: Path, tmp_path: Path) -> None:
    config = _dpo_loop_config(tiny_llama, ListSink(), max_steps=2)
    test = [
        PreferencePair(m[:-1], m[-1:], [{"role": "assistant", "content": "no idea"}]) for m in json_conversations(6)
    ]
    config = replace(config, examples={**config.examples, "test": test}, json_match_keys=("sentiment",))
    session = DirectorySession(tmp_path)
    LoopRunner(config, 0, 1, 0, session).run()
    final = session.reports[-1]
    generated = ("test_exact_match", "test_rouge_l", "test_json_valid", "test_json_match_sentiment")
    assert set(generated) <= set(final) and all(0.0 <= final[name] <= 1.0 for name in generated), final
    assert {"test_loss", "test_reward_accuracy"} <= set(final)


# --------------------------------------------------------------------------- spec.json_match_keys


def _proto(keys: list[str], **fields: Any) -> pb.JobSpec:
    spec = pb.JobSpec(display_name="chat", json_match_keys=keys, **fields)
    spec.base_model.local_path = "/models/llama"
    spec.dataset_version.project_id, spec.dataset_version.dataset_version_id = "chats", "v1"
    return spec


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ([""], "entry 0 is empty"),
        (["sentiment", "a" * 65], "entry 1 ('aaaa"),
        (["a-b"], "entry 0 'a-b' is not a valid key"),
        (["with space"], "is not a valid key"),
        (["sentiment."], "is not a valid key"),
        (["stimmung_ä"], "is not a valid key"),
        (["sentiment", "reason", "sentiment"], "names 'sentiment' more than once"),
        ([f"k{n}" for n in range(17)], "has 17 keys; the limit is 16"),
    ],
)
def test_bad_json_match_keys_are_refused_naming_the_field(keys: list[str], problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^spec\.json_match_keys ") as caught:
        convert.spec_from_proto(_proto(keys))
    assert problem in caught.value.message and caught.value.details["field"] == "spec.json_match_keys"


def test_json_match_keys_are_for_generative_objectives_and_never_validation_metrics() -> None:
    with pytest.raises(InvalidArgumentError, match="only for generative objectives") as caught:
        convert.spec_from_proto(_proto(["sentiment"], objective=pb.OBJECTIVE_CLASSIFY))
    assert caught.value.details["field"] == "spec.json_match_keys"
    for metric in ("json_valid", "json_match_sentiment"):
        with pytest.raises(InvalidArgumentError, match="measured on the test split only"):
            d.build_early_stopping(metric=metric)
    limits = [f"k{n}" for n in range(15)] + ["a" * 64]
    assert convert.spec_from_proto(_proto(limits, objective=pb.OBJECTIVE_DPO)).json_match_keys == tuple(limits)


def test_json_match_keys_round_trip_through_proto_and_the_store_format() -> None:
    spec = convert.spec_from_proto(_proto(["sentiment", "Reason_2"], objective=pb.OBJECTIVE_SFT))
    assert spec.json_match_keys == ("sentiment", "Reason_2")
    assert list(convert.spec_to_proto(spec).json_match_keys) == ["sentiment", "Reason_2"]
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert from_plain(d.JobSpec, to_plain(spec)) == spec
    # A spec stored before the field existed reads as none.
    stored = to_plain(spec)
    del stored["json_match_keys"]
    assert from_plain(d.JobSpec, stored).json_match_keys == ()
    assert d.build_spec(**_build_arguments()).json_match_keys == ()


async def test_submit_refuses_bad_json_match_keys_and_stores_nothing(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_model: Path, sentiment_version: Any
) -> None:
    app, stub = service
    sentiment_version(app.host.platform.objects)
    refused = []
    for keys in ([""], ["a" * 65], ["a b"], ["k", "k"], [f"k{n}" for n in range(17)], ["sentiment"]):
        # The last is well formed, but the version trains a classifier: refused once the objective is known.
        spec = job_spec(tiny_model)
        spec.json_match_keys.extend(keys)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, keys
        refused.append(caught.value.details() or "")
    assert all(details.startswith("spec.json_match_keys ") for details in refused), refused
    assert "only for generative objectives" in refused[-1]
    assert not (await stub.ListJobs(pb.ListJobsRequest())).jobs
